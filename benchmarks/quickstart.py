"""Benchmark ``mmlm quickstart`` against its targets: at most 10 minutes end to end on a 2-core
CPU, VQA accuracy >= 95% and caption exact match >= 80% on the synthetic test split.

It runs ``python -m mmlm.cli.main quickstart --workdir DIR`` in a subprocess (the real command,
data build + training + evaluation), measures its wall time, reads ``DIR/results.json``, prints
a target-vs-measured table and writes ``benchmarks/results/quickstart-<date>.json`` with the
scores, the timings, the learning curve (when the quickstart records one), the VQA accuracy per
question type and expected answer (where the misses are: e.g. a count question answered "1" whatever
the count), the device (CPU model,
cores, GPU if any), the library versions and the machine load when the run started (a busy machine
makes the timings meaningless: check ``load_at_start``).

Usage::

    python benchmarks/quickstart.py                          # fresh workdir under /tmp, removed afterwards
    python benchmarks/quickstart.py --workdir runs/qs --keep # keep data, model and logs
    python benchmarks/quickstart.py --from-results runs/qs/results.json   # re-score an existing run
    python benchmarks/quickstart.py -- --max-steps 50        # extra arguments go to `mmlm quickstart`
    python benchmarks/quickstart.py --seeds 0 1 2            # one run per seed, and the worst of them

``--seeds`` runs the benchmark once per seed (``mmlm quickstart --seed S``: another from-scratch
initialisation and data order; each in ``WORKDIR/seed-S``, each with its own result file), then
prints a row per seed and writes ``quickstart-<date>-seeds.json``: a recipe meets the targets only
when every seed does (one seed's figure is one draw).

Exit code: 0 when every target is met, 1 when one is missed, 2 when the quickstart itself failed.
A fresh workdir is used by default: a reused one resumes or skips training, which is not a benchmark.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"

# (key, label, target, direction): direction "max" = measured must be <= target, "min" = >= target
TARGETS = (
    ("total_minutes", "total time (min)", 10.0, "max"),
    ("vqa_accuracy", "VQA accuracy", 0.95, "min"),
    ("caption_exact_match", "caption exact match", 0.80, "min"),
)


def cpu_info() -> dict:
    """CPU model and core counts (from /proc/cpuinfo on Linux)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "usable_cpus": usable}


def gpu_info() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - information only
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "lightning", "timm", "mmlm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", os.fspath(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", os.fspath(ROOT), "status", "--porcelain"], capture_output=True,
                               text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: Path, doc: dict) -> None:
    """``doc`` as JSON at ``path``, written to a temporary name and renamed: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def run_quickstart(workdir: Path, extra: list[str]) -> tuple[int, float]:
    """Run the real command; returns (exit code, wall seconds). Its output streams through."""
    cmd = [sys.executable, "-m", "mmlm.cli.main", "quickstart", "--workdir", os.fspath(workdir), *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    return code, time.perf_counter() - start


def measured(results: dict, wall_seconds: float | None) -> dict:
    total = wall_seconds if wall_seconds is not None else results.get("total_seconds")
    return {
        "total_minutes": None if total is None else total / 60.0,
        "vqa_accuracy": results.get("vqa_accuracy"),
        "caption_exact_match": results.get("caption_exact_match"),
    }


def check(values: dict) -> list[dict]:
    rows = []
    for key, label, target, direction in TARGETS:
        value = values.get(key)
        ok = value is not None and (value <= target if direction == "max" else value >= target)
        rows.append({"metric": key, "label": label, "target": target, "direction": direction,
                     "measured": value, "ok": ok})
    return rows


def _scored_questions(workdir: Path) -> list[tuple[str, str, int, float]] | None:
    """``(question type, expected answer, image id, accuracy)`` per test question, from the evaluation's
    per-item scores and the test split's VQAv2 annotations; None when the workdir lacks either."""
    items = workdir / "eval" / "vqa" / "per_item.jsonl"
    ann = workdir / "data" / "test" / "annotations" / "vqa_annotations.json"
    if not (items.is_file() and ann.is_file()):
        return None
    truth = {str(a["question_id"]): (a["question_type"], a["multiple_choice_answer"], a["image_id"])
             for a in json.loads(ann.read_text())["annotations"]}
    scored = []
    for line in items.read_text().splitlines():
        item = json.loads(line)
        if str(item["id"]) in truth:
            scored.append((*truth[str(item["id"])], item["scores"]["accuracy"]))
    return scored


def _percent(groups: dict[str, dict]) -> dict[str, dict]:
    return {g: {k: [round(100 * sum(v) / len(v), 1), len(v)] for k, v in sorted(by.items())}
            for g, by in sorted(groups.items())}


def per_answer(workdir: Path) -> dict[str, dict[str, list]] | None:
    """VQA accuracy per question type and expected answer, ``{type: {answer: [accuracy %, n]}}``, for
    the types whose answers are few (count, exists, size, position); None without an evaluation."""
    scored = _scored_questions(workdir)
    if scored is None:
        return None
    groups: dict[str, dict[str, list[float]]] = {}
    for qtype, answer, _, acc in scored:
        if qtype in ("count", "exists", "size", "position"):
            groups.setdefault(qtype, {}).setdefault(answer, []).append(acc)
    return _percent(groups)


def per_scene_size(workdir: Path) -> dict[str, dict[str, list]] | None:
    """VQA accuracy per question type and number of objects in the image, ``{type: {"2": [accuracy %,
    n]}}``: a question about one object of several tests whether the model finds the object it names
    (chance, if it picks one of them at random: 50% with 2, 33% with 3). The number of objects is read
    from the test captions, which name every object ("a ..., a ... and a ...")."""
    scored = _scored_questions(workdir)
    captions = workdir / "data" / "test" / "annotations" / "captions.json"
    if scored is None or not captions.is_file():
        return None
    objects = {a["image_id"]: 1 + a["caption"].count(", ") + a["caption"].count(" and ")
               for a in json.loads(captions.read_text())["annotations"]}
    groups: dict[str, dict[str, list[float]]] = {}
    for qtype, _, image_id, acc in scored:
        groups.setdefault(qtype, {}).setdefault(str(objects[image_id]), []).append(acc)
    return _percent(groups)


def table(rows: list[dict], results: dict, breakdown: dict | None = None, by_objects: dict | None = None) -> str:
    def fmt(key, v):
        if v is None:
            return "-"
        return f"{v:.2f}" if key == "total_minutes" else f"{v:.1%}"

    lines = [f"{'':<22}{'target':>10}{'measured':>12}  ", "-" * 48]
    for r in rows:
        sign = "<=" if r["direction"] == "max" else ">="
        lines.append(f"{r['label']:<22}{sign + ' ' + fmt(r['metric'], r['target']):>10}"
                     f"{fmt(r['metric'], r['measured']):>12}  {'ok' if r['ok'] else 'MISSED'}")
    per_type = results.get("vqa_per_question_type") or {}
    for qtype, acc in sorted(per_type.items()):
        lines.append(f"{'  VQA ' + qtype:<22}{'':>10}{acc / 100:>12.1%}")
    for qtype, by_answer in (breakdown or {}).items():
        lines.append(f"{'    by answer':<22}  {qtype}: " + ", ".join(f"{a} {acc:.0f}% (n={n})" for a, (acc, n) in by_answer.items()))
    for qtype, by_n in (by_objects or {}).items():
        lines.append(f"{'    by objects':<22}  {qtype}: " + ", ".join(f"{k} {acc:.0f}% (n={n})" for k, (acc, n) in by_n.items()))
    for key, label in (("cider", "CIDEr"), ("data_seconds", "data (s)"), ("train_seconds", "training (s)"),
                       ("eval_seconds", "evaluation (s)"), ("total_seconds", "quickstart total (s)")):
        if results.get(key) is not None:
            lines.append(f"{label:<22}{'':>10}{results[key]:>12.1f}" if isinstance(results[key], (int, float))
                         else f"{label:<22}{'':>10}{results[key]!s:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="quickstart workdir (default: a fresh temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--from-results", default=None, help="score an existing results.json instead of running")
    p.add_argument("--out", default=None, help="where the benchmark JSON goes "
                                               "(default: benchmarks/results/quickstart-<date>.json)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S",
                   help="one run per seed (mmlm quickstart --seed S, in WORKDIR/seed-S), then a row per seed: "
                        "the targets count as met only when every seed meets them")
    args = p.parse_args(argv)
    if args.seeds:
        if args.from_results:
            p.error("--seeds runs the quickstart; it does not combine with --from-results")
        if len(set(args.seeds)) != len(args.seeds):
            p.error(f"--seeds must be distinct, got {args.seeds}")
        return bench_seeds(args, extra)

    started = _dt.datetime.now()
    load_at_start = load_average()
    wall = None
    code = 0
    tmp = None
    if args.from_results:
        results_path = Path(args.from_results)
        workdir = results_path.parent
        if not results_path.is_file():
            print(f"error: --from-results {results_path}: no such file", file=sys.stderr)
            return 2
    else:
        if args.workdir:
            workdir = Path(args.workdir)
            if (workdir / "results.json").exists() or (workdir / "checkpoints").exists():
                print(f"warning: {workdir} holds a previous run; the quickstart will resume or skip training, "
                      "so the timing is not a fresh run", file=sys.stderr)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="mmlm-quickstart-bench-"))
            workdir = tmp
        results_path = workdir / "results.json"
        if results_path.exists():
            results_path.unlink()  # never read a stale one
        code, wall = run_quickstart(workdir, extra)
    if code != 0 or not results_path.is_file():
        print(f"error: the quickstart failed (exit code {code}; {results_path} "
              f"{'exists' if results_path.is_file() else 'missing'})", file=sys.stderr)
        return 2
    results = json.loads(results_path.read_text())
    rows = check(measured(results, wall))
    breakdown, by_objects = per_answer(workdir), per_scene_size(workdir)
    print()
    print(table(rows, results, breakdown, by_objects))
    record = {
        "benchmark": "quickstart",
        "date": started.isoformat(timespec="seconds"),
        "command": ["mmlm", "quickstart", "--workdir", os.fspath(workdir), *extra] if not args.from_results else None,
        "wall_seconds": None if wall is None else round(wall, 1),
        "targets": rows,
        "all_ok": all(r["ok"] for r in rows),
        "results": {k: v for k, v in results.items() if k != "examples"},
        "vqa_per_answer": breakdown,
        "vqa_per_scene_size": by_objects,
        "examples": results.get("examples"),
        "device": {**cpu_info(), "gpu": gpu_info(), "torch_threads": results.get("threads"),
                   "quickstart_device": results.get("device"), "platform": platform.platform()},
        "versions": versions(),
        "git_commit": git_commit(),
        "load_at_start": load_at_start,
        "load_at_end": load_average(),
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"quickstart-{started:%Y-%m-%d-%H%M%S}.json"
    write_json(out, record)
    print(f"\nwritten: {out}")
    if load_at_start and load_at_start[0] > 0.5 * (cpu_info()["usable_cpus"] or 1):
        print(f"note: the machine was busy at start (load {load_at_start[0]}): timings are pessimistic",
              file=sys.stderr)
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if record["all_ok"] else 1


def bench_seeds(args, extra: list[str]) -> int:
    """One benchmark run per seed (``main`` with ``--seed S`` passed to the quickstart), then a summary."""
    started = _dt.datetime.now()
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mmlm-quickstart-seeds-"))
    out = Path(args.out) if args.out else RESULTS_DIR / f"quickstart-{started:%Y-%m-%d-%H%M%S}-seeds.json"
    rows, codes = [], []
    for seed in args.seeds:
        seed_out = out.with_name(f"{out.stem}-seed{seed}.json")
        sub = ["--workdir", os.fspath(base / f"seed-{seed}"), "--out", os.fspath(seed_out)]
        codes.append(main([*sub, "--keep", "--", *extra, "--seed", str(seed)]))
        if not seed_out.is_file():
            rows.append({"seed": seed, "failed": True})
            continue
        record = json.loads(seed_out.read_text())
        values = {r["metric"]: r["measured"] for r in record["targets"]}
        rows.append({"seed": seed, "file": seed_out.name, "all_ok": record["all_ok"], **values,
                     "vqa_per_question_type": record["results"].get("vqa_per_question_type")})
    done = [r for r in rows if not r.get("failed")]
    lines = ["", f"{'seed':>4}  {'minutes':>7}  {'VQA':>6}  {'caption EM':>10}  targets", "-" * 44]
    for r in rows:
        if r.get("failed"):
            lines.append(f"{r['seed']:>4}  the quickstart failed")
            continue
        lines.append(f"{r['seed']:>4}  {r['total_minutes']:7.2f}  {100 * r['vqa_accuracy']:5.1f}%  "
                     f"{100 * r['caption_exact_match']:9.1f}%  {'ok' if r['all_ok'] else 'MISSED'}")
    if done:
        worst = {k: (max if k == "total_minutes" else min)(r[k] for r in done)
                 for k in ("total_minutes", "vqa_accuracy", "caption_exact_match")}
        mean_vqa = sum(r["vqa_accuracy"] for r in done) / len(done)
        lines.append(f"{'worst':>5} {worst['total_minutes']:7.2f}  {100 * worst['vqa_accuracy']:5.1f}%  "
                     f"{100 * worst['caption_exact_match']:9.1f}%    (mean VQA {100 * mean_vqa:.1f}%)")
    print("\n".join(lines))
    summary = {"benchmark": "quickstart over seeds", "date": started.isoformat(timespec="seconds"),
               "seeds": args.seeds, "extra_args": extra, "runs": rows,
               "all_ok": bool(done) and len(done) == len(rows) and all(r["all_ok"] for r in done),
               "git_commit": git_commit(), "device": {**cpu_info(), "gpu": gpu_info()}, "versions": versions()}
    write_json(out, summary)
    print(f"\nwritten: {out}")
    if not args.workdir and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    if any(c == 2 for c in codes):
        return 2
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
