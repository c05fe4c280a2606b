"""Run a benchmark: predict (with a resumable cache), score, bootstrap, write results.

Contract
--------
:func:`evaluate` ``(bench, predict_fn | None, out_dir, ...)`` is the one entry point the CLI
and the training callback use. A ``predict_fn(images: list[PIL.Image], prompts: list[str|None])
-> list[str]`` is the only thing it needs from a model (:func:`model_predict_fn` builds one from
a checkpoint with ``mmlm.load``/``mmlm.describe``; tests pass fakes); alternatively
``predictions_path`` scores an existing results file in the benchmark's submission format.

Files in ``out_dir`` (every final file written atomically: temporary name, then ``os.replace``):

* ``predictions.cache.jsonl`` - append-only cache; first line ``{"fingerprint": {...}}``, then
  one ``{"id", "prediction"}`` line per item, flushed and fsync-ed after every batch. A rerun
  with the same fingerprint skips the ids already there (an interrupted run resumes); a
  different fingerprint (other model/prompt/generation settings) is refused unless
  ``resume=False``, which starts the cache afresh. A torn last line is dropped.
* ``predictions.json`` (``predictions.jsonl`` for POPE) - the submission file (model mode).
* ``per_item.jsonl`` - ``{"id", "prediction", "scores", "stats", "groups"}`` per scored item:
  what :func:`stat_spec` needs to recompute every metric on a resample, and what
  ``--compare`` reads from another run (paired by ``id``).
* ``metrics.json`` - official metric names at top level (captions: ``Bleu_1``..``Bleu_4``,
  ``METEOR``, ``ROUGE_L``, ``CIDEr`` [, ``SPICE``] as pycocoevalcap's fractions; VQA: ``overall``,
  ``perAnswerType``, ``perQuestionType`` (percent, 2 decimals, as the official VQA evaluation);
  GQA: ``overall`` + ``perAnswerType`` (open/binary), ``perStructuralType``, ``perSemanticType``;
  POPE: ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (fractions) and
  ``overall`` (accuracy, percent)), plus ``ci95`` (same shape, ``[lo, hi]`` percentile bootstrap
  intervals), ``bootstrap`` (resamples, seed, method notes), counts, ``skipped_metrics``,
  ``notices`` and provenance.
* ``comparison.json`` - with ``compare=OTHER/metrics.json``: the paired bootstrap test.

Bootstrap: items are resampled (``n_resamples``, default 1000, 0 disables) and every metric is
recomputed from per-item statistics (see :mod:`.bootstrap` and :mod:`.caption_metrics` for
BLEU (exact), CIDEr (document frequencies held fixed), METEOR (mean of segment scores)).
Breakdown intervals (per question type, ...) resample within each group (stratified).

Bad images: an item whose image cannot be read is skipped and counted (``num_skipped``,
first reasons in ``notices``); more than ``max_bad_fraction`` of the items (at least 1) stops the
run with :class:`EvalError`. Greedy decoding is the default of :func:`model_predict_fn`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import vqa_metrics as vm
from .benchmarks import Benchmark, BenchmarkError, Item, atomic_write_json, atomic_write_text, load_image, read_predictions, write_predictions
from .bootstrap import MetricKey, StatSpec, bootstrap_ci, nest, paired_bootstrap
from .caption_metrics import caption_stat_spec, score_captions

__all__ = [
    "PredictFn",
    "EvalError",
    "ScoreResult",
    "CACHE_NAME",
    "PER_ITEM_NAME",
    "METRICS_NAME",
    "COMPARISON_NAME",
    "predict",
    "score",
    "stat_spec",
    "evaluate",
    "compare_runs",
    "model_predict_fn",
    "resolve_device",
]

PredictFn = Callable[[list, list], list]
CACHE_NAME = "predictions.cache.jsonl"
PER_ITEM_NAME = "per_item.jsonl"
METRICS_NAME = "metrics.json"
COMPARISON_NAME = "comparison.json"
_VQA_DIGITS = 2


class EvalError(ValueError):
    """A user-facing evaluation error (bad input, stale cache, too many bad images)."""


# --------------------------------------------------------------------------- prediction cache


def _read_cache(path: Path) -> tuple[dict | None, dict[str, str], bool]:
    """-> (fingerprint, {id: prediction}, clean). ``clean`` is False when a torn/invalid line was dropped."""
    fingerprint: dict | None = None
    done: dict[str, str] = {}
    clean = True
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        clean = False
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            clean = False
            continue
        if i == 0 and isinstance(obj, dict) and "fingerprint" in obj:
            fingerprint = obj["fingerprint"]
        elif isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("prediction"), str):
            done[obj["id"]] = obj["prediction"]
        else:
            clean = False
    return fingerprint, done, clean


def _cache_text(fingerprint: dict, done: Mapping[str, str]) -> str:
    lines = [json.dumps({"fingerprint": fingerprint}, ensure_ascii=False, sort_keys=True)]
    lines += [json.dumps({"id": k, "prediction": v}, ensure_ascii=False) for k, v in done.items()]
    return "\n".join(lines) + "\n"


def _open_cache(path: Path, fingerprint: dict, resume: bool) -> dict[str, str]:
    """Load (or start) the cache; returns the predictions already done."""
    fingerprint = json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists, ...)
    if path.exists() and resume:
        old, done, clean = _read_cache(path)
        if old is not None and old != fingerprint:
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise EvalError(
                f"{path} holds predictions of a different run (differs in: {', '.join(diff)}); "
                "use another --out or pass --no-resume to discard it"
            )
        if old is None or not clean:
            atomic_write_text(path, _cache_text(fingerprint, done))
        return done
    atomic_write_text(path, _cache_text(fingerprint, {}))
    return {}


def predict(
    items: Sequence[Item],
    predict_fn: PredictFn,
    *,
    batch_size: int = 16,
    cache_path: str | os.PathLike | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    max_bad_fraction: float = 0.01,
    desc: str = "eval",
) -> tuple[dict[str, str], dict[str, str]]:
    """Run ``predict_fn`` over ``items`` in batches; returns ``(predictions, skipped)``.

    ``predictions``: id -> text for every item that was predicted (from the cache or now);
    ``skipped``: id -> reason for items whose image could not be read. With ``cache_path`` the
    cache file is resumed/appended as described in the module docstring.
    """
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    done: dict[str, str] = {}
    cache = Path(cache_path) if cache_path is not None else None
    if cache is not None:
        done = _open_cache(cache, dict(fingerprint or {}), resume)
    todo = [it for it in items if it.id not in done]
    skipped: dict[str, str] = {}
    budget = max(1, int(max_bad_fraction * len(items)))
    fh = open(cache, "a", encoding="utf-8") if cache is not None else None
    try:
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                images, prompts, ok = [], [], []
                for it in batch:
                    try:
                        if it.image is None:
                            raise FileNotFoundError("no image (pass --images)")
                        images.append(load_image(it.image))
                    except Exception as e:  # unreadable image: skip and count
                        where = it.image if isinstance(it.image, str) else "<shard bytes>"
                        skipped[it.id] = f"{type(e).__name__}: {e} ({where})"
                        if len(skipped) > budget:
                            first = next(iter(skipped.items()))
                            raise EvalError(
                                f"{len(skipped)} items have unreadable images (budget {budget}); "
                                f"first: item {first[0]}: {first[1]}"
                            ) from None
                        continue
                    prompts.append(it.prompt)
                    ok.append(it)
                if not ok:
                    bar.update(len(batch))
                    continue
                outs = list(predict_fn(images, prompts))
                if len(outs) != len(ok):
                    raise EvalError(f"predict_fn returned {len(outs)} texts for {len(ok)} images")
                lines = []
                for it, text in zip(ok, outs):
                    text = text if isinstance(text, str) else str(text)
                    done[it.id] = text
                    lines.append(json.dumps({"id": it.id, "prediction": text}, ensure_ascii=False) + "\n")
                if fh is not None:
                    fh.write("".join(lines))
                    fh.flush()
                    os.fsync(fh.fileno())
                bar.update(len(batch))
    finally:
        if fh is not None:
            fh.close()
    return {it.id: done[it.id] for it in items if it.id in done}, skipped


# --------------------------------------------------------------------------- scoring


@dataclass
class ScoreResult:
    """Metrics (official names/scales, nested), per-item rows and the bootstrap spec."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    spec: StatSpec | None
    notices: list[str] = field(default_factory=list)
    skipped_metrics: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _acc_spec(rows: Sequence[Mapping[str, Any]]) -> StatSpec:
    values = np.array([[1.0, float(r["scores"]["accuracy"])] for r in rows]).reshape(len(rows), 2)

    def fn(t: np.ndarray) -> dict[MetricKey, np.ndarray]:
        return {"overall": 100.0 * t[:, 1] / t[:, 0]}

    return StatSpec(("n", "accuracy"), values, fn)


def _pope_spec(rows: Sequence[Mapping[str, Any]]) -> StatSpec:
    vals = []
    for r in rows:
        p, lab = int(r["stats"]["pred_yes"]), int(r["stats"]["label_yes"])
        vals.append([1.0, p * lab, p * (1 - lab), (1 - p) * (1 - lab), (1 - p) * lab])
    values = np.array(vals, dtype=np.float64).reshape(len(rows), 5)

    def fn(t: np.ndarray) -> dict[MetricKey, np.ndarray]:
        n, tp, fp, tn, fn_ = (t[:, i] for i in range(5))
        prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        rec = np.where(tp + fn_ > 0, tp / np.maximum(tp + fn_, 1e-300), 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0.0)
        acc = (tp + tn) / n
        return {"overall": 100 * acc, "accuracy": acc, "precision": prec, "recall": rec, "f1": f1,
                "yes_ratio": (tp + fp) / n}

    return StatSpec(("n", "tp", "fp", "tn", "fn"), values, fn)


def stat_spec(scoring: str, rows: Sequence[Mapping[str, Any]]) -> StatSpec:
    """The bootstrap :class:`StatSpec` for a scoring rule from per_item.jsonl rows."""
    if scoring == "caption":
        return caption_stat_spec(rows)
    if scoring in ("vqa", "exact"):
        return _acc_spec(rows)
    if scoring == "pope":
        return _pope_spec(rows)
    raise ValueError(f"unknown scoring {scoring!r}")


def _score_vqa(bench: Benchmark, items: list[Item], preds: Mapping[str, str]) -> ScoreResult:
    rows = []
    accs = []
    for it in items:
        pred = preds[it.id]
        acc = vm.vqa_accuracy(pred, it.references) if bench.scoring == "vqa" else vm.exact_match(pred, it.references)
        accs.append(acc)
        rows.append({"id": it.id, "prediction": pred, "scores": {"accuracy": acc}, "groups": dict(it.groups)})
    metrics = vm.vqa_report(accs, [r["groups"] for r in rows], ndigits=_VQA_DIGITS)
    info = {}
    if bench.scoring == "vqa":
        n_soft = sum(len(it.references) >= vm.MIN_SOFT_ANSWERS for it in items)
        info["accuracy_rule"] = (
            f"official VQA accuracy (leave-one-out min(#matches/3, 1)) for {n_soft} item(s) with >= "
            f"{vm.MIN_SOFT_ANSWERS} answers; exact match after normalization for {len(items) - n_soft} item(s)"
        )
    else:
        info["accuracy_rule"] = "exact match after VQA answer normalization"
    return ScoreResult(metrics, rows, _acc_spec(rows), info=info)


def _score_pope(items: list[Item], preds: Mapping[str, str]) -> ScoreResult:
    rows = []
    for it in items:
        ans = vm.pope_answer(preds[it.id])
        label = it.references[0]
        rows.append({
            "id": it.id, "prediction": preds[it.id], "answer": ans,
            "scores": {"correct": float(ans == label)},
            "stats": {"pred_yes": int(ans == "yes"), "label_yes": int(label == "yes")},
            "groups": dict(it.groups),
        })
    metrics: dict[str, Any] = vm.pope_report([r["answer"] for r in rows], [it.references[0] for it in items])
    by: dict[str, dict[str, list[int]]] = {}
    for i, r in enumerate(rows):
        for g, v in r["groups"].items():
            if v is not None:
                by.setdefault(g, {}).setdefault(str(v), []).append(i)
    for g, values in by.items():
        metrics[g] = {
            v: vm.pope_report([rows[i]["answer"] for i in idx], [items[i].references[0] for i in idx])
            for v, idx in values.items()
        }
    return ScoreResult(metrics, rows, _pope_spec(rows))


def _score_caption(items: list[Item], preds: Mapping[str, str], tokenizer: str, skip: Sequence[str]) -> ScoreResult:
    refs = {it.id: list(it.references) for it in items}
    groups = {it.id: dict(it.groups) for it in items if it.groups}
    res = score_captions(refs, {k: preds[k] for k in refs}, tokenizer=tokenizer, skip=skip, groups=groups or None)
    rows = [
        {"id": it.id, "prediction": preds[it.id], "scores": res.per_item[it.id],
         "stats": {"bleu": res.bleu_stats[it.id]}, "groups": dict(it.groups)}
        for it in items
    ]
    metrics: dict[str, Any] = dict(res.metrics)
    metrics.update(res.per_group)
    info = {"tokenizer": res.tokenizer}
    return ScoreResult(metrics, rows, caption_stat_spec(rows), list(res.notices), dict(res.skipped), info)


def score(
    bench: Benchmark,
    predictions: Mapping[str, str],
    *,
    items: Sequence[Item] | None = None,
    tokenizer: str = "auto",
    skip_metrics: Sequence[str] = (),
) -> ScoreResult:
    """Score ``predictions`` (id -> text) on ``items`` (default: all of the benchmark's items
    that have a prediction and references)."""
    pool = list(items if items is not None else bench.items)
    scored = [it for it in pool if it.id in predictions and it.references]
    if not scored:
        raise EvalError(f"{bench.name}: nothing to score (no item has both a prediction and references)")
    if bench.scoring == "caption":
        return _score_caption(scored, predictions, tokenizer, skip_metrics)
    if bench.scoring in ("vqa", "exact"):
        return _score_vqa(bench, scored, predictions)
    if bench.scoring == "pope":
        return _score_pope(scored, predictions)
    raise ValueError(f"unknown scoring {bench.scoring!r}")


# --------------------------------------------------------------------------- intervals


def _round_tree(obj: Any, ndigits: int | None) -> Any:
    if ndigits is None:
        return obj
    if isinstance(obj, dict):
        return {k: _round_tree(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_tree(v, ndigits) for v in obj]
    if isinstance(obj, float):
        return round(obj, ndigits)
    return obj


def _intervals(result: ScoreResult, scoring: str, n_resamples: int, seed: int) -> dict[str, Any]:
    """Bootstrap intervals for the overall metrics and (stratified) for each breakdown value."""
    if result.spec is None or n_resamples <= 0:
        return {}
    flat: dict[MetricKey, Any] = {}
    for k, v in bootstrap_ci(result.spec, n_resamples, seed).items():
        flat[k] = None if v is None else [v[0], v[1]]
    if scoring != "caption":  # caption breakdowns are re-scored corpora: no per-group interval
        by: dict[str, dict[str, list[int]]] = {}
        for i, r in enumerate(result.rows):
            for g, v in (r.get("groups") or {}).items():
                if v is not None:
                    by.setdefault(g, {}).setdefault(str(v), []).append(i)
        for g, values in by.items():
            for v, idx in values.items():
                sub = bootstrap_ci(result.spec.subset(np.asarray(idx)), n_resamples, seed)
                if scoring == "pope":
                    for k, ci in sub.items():
                        flat[(g, v, str(k))] = None if ci is None else [ci[0], ci[1]]
                else:
                    ci = sub.get("overall")
                    flat[(g, v)] = None if ci is None else [ci[0], ci[1]]
    tree = nest(flat)
    return _round_tree(tree, _VQA_DIGITS) if scoring in ("vqa", "exact") else tree


# --------------------------------------------------------------------------- compare


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise EvalError(f"{path}:{i}: not valid JSON") from None
    return rows


def compare_runs(
    rows_a: Sequence[Mapping[str, Any]],
    scoring: str,
    other_metrics: str | os.PathLike,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap of this run (``rows_a``) against the run whose ``metrics.json`` is
    ``other_metrics`` (its per-item rows are read from the ``per_item`` file it names).

    Items are paired by id; only ids present in both are used. Returns a JSON-ready dict with
    ``metrics[name] = {a, b, delta, ci, p_value, resamples}`` (a = this run). Per-item CIDEr
    values carry the document frequencies of the run they come from, so compare runs made on
    the same item set (same ``--limit``) for an exact CIDEr pairing."""
    mpath = Path(other_metrics)
    if mpath.is_dir():
        mpath = mpath / METRICS_NAME
    if not mpath.is_file():
        raise EvalError(f"--compare: no such metrics file: {mpath}")
    try:
        other = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"--compare: {mpath} is not valid JSON ({e.msg})") from None
    if other.get("scoring") != scoring:
        raise EvalError(f"--compare: {mpath} was scored with {other.get('scoring')!r}, this run with {scoring!r}")
    per_item = mpath.parent / ((other.get("files") or {}).get("per_item") or PER_ITEM_NAME)
    if not per_item.is_file():
        raise EvalError(f"--compare: per-item scores not found: {per_item}")
    rows_b = {r["id"]: r for r in _read_rows(per_item)}
    common = [r for r in rows_a if r["id"] in rows_b]
    if not common:
        raise EvalError(f"--compare: no item ids in common with {per_item}")
    spec_a = stat_spec(scoring, common)
    spec_b = stat_spec(scoring, [rows_b[r["id"]] for r in common])
    if n_resamples <= 0:
        n_resamples = 1000
    res = paired_bootstrap(spec_a, spec_b, n_resamples, seed)
    metrics = {k: v for k, v in res.items() if isinstance(k, str)}
    return {
        "against": str(mpath),
        "common_items": len(common),
        "only_here": len(rows_a) - len(common),
        "only_there": len(rows_b) - len(common),
        "method": "paired bootstrap over items; p = two-sided, from the centred resampled differences",
        "resamples": n_resamples,
        "seed": seed,
        "metrics": metrics,
    }


# --------------------------------------------------------------------------- evaluate


def evaluate(
    bench: Benchmark,
    predict_fn: PredictFn | None,
    out_dir: str | os.PathLike,
    *,
    predictions_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    n_resamples: int = 1000,
    seed: int = 0,
    compare: str | os.PathLike | None = None,
    resume: bool = True,
    fingerprint: Mapping[str, Any] | None = None,
    tokenizer: str = "auto",
    skip_metrics: Sequence[str] = (),
    allow_missing: bool = False,
    progress: bool = True,
    max_bad_fraction: float = 0.01,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict (or read ``predictions_path``), score, bootstrap and write ``out_dir``.

    Returns the metrics.json content (plus ``"comparison"`` when ``compare`` is given).
    Exactly one of ``predict_fn`` / ``predictions_path`` must be given.
    """
    if (predict_fn is None) == (predictions_path is None):
        raise EvalError("give exactly one of a model (predict_fn) or --predictions FILE")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notices = list(bench.notices)
    files: dict[str, str] = {}
    skipped_items: dict[str, str] = {}

    if predict_fn is not None:
        if any(it.image is None for it in bench.items):
            raise EvalError(f"--images DIR is needed to run a model on {bench.name}")
        fp = {"benchmark": bench.name, "task": bench.task, **dict(fingerprint or {})}
        preds, skipped_items = predict(
            bench.items, predict_fn, batch_size=batch_size, cache_path=out / CACHE_NAME, fingerprint=fp,
            resume=resume, progress=progress, max_bad_fraction=max_bad_fraction, desc=f"eval {bench.name}",
        )
        write_predictions(bench, preds, out / bench.submission.filename)
        files["predictions"] = bench.submission.filename
        files["cache"] = CACHE_NAME
        if skipped_items:
            first = next(iter(skipped_items.items()))
            notices.append(f"skipped {len(skipped_items)} item(s) with unreadable images; first: {first[0]}: {first[1]}")
    else:
        try:
            preds = read_predictions(bench, predictions_path)
        except BenchmarkError as e:
            raise EvalError(str(e)) from None
        ids = {it.id for it in bench.items}
        missing = [it.id for it in bench.items if it.id not in preds]
        extra = sum(1 for k in preds if k not in ids)
        if missing and not allow_missing:
            raise EvalError(
                f"{predictions_path} has no prediction for {len(missing)} of {len(bench.items)} items "
                f"(first: {bench.submission.key_field} {missing[0]}); pass --allow-missing to score only those present"
            )
        if missing:
            notices.append(f"{len(missing)} item(s) without a prediction were not scored (--allow-missing)")
        if extra:
            notices.append(f"ignored {extra} prediction(s) for items outside the evaluated set")
        preds = {k: v for k, v in preds.items() if k in ids}
        files["predictions"] = str(Path(predictions_path).resolve())

    report: dict[str, Any] = {
        "benchmark": bench.name,
        "task": bench.task,
        "scoring": bench.scoring,
        "num_items": len(bench.items),
        "num_predicted": len(preds),
        "num_skipped": len(skipped_items),
    }
    result: ScoreResult | None = None
    unscored = sum(1 for it in bench.items if it.id in preds and not it.references)
    if not bench.has_references:
        notices.append("no references/answers in the annotations: predictions written, nothing scored")
        report["num_scored"] = 0
    else:
        try:
            result = score(bench, preds, tokenizer=tokenizer, skip_metrics=skip_metrics)
        except (ValueError, RuntimeError) as e:
            raise EvalError(str(e)) from None
        if unscored:
            notices.append(f"{unscored} predicted item(s) have no references and were not scored")
        notices.extend(result.notices)
        report["num_scored"] = len(result.rows)
        report.update(result.metrics)
        report["ci95"] = _intervals(result, bench.scoring, n_resamples, seed)
        report["bootstrap"] = _bootstrap_note(bench.scoring, n_resamples, seed)
        report.update(result.info)
        if result.skipped_metrics:
            report["skipped_metrics"] = dict(result.skipped_metrics)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows)
        atomic_write_text(out / PER_ITEM_NAME, text)
        files["per_item"] = PER_ITEM_NAME

    comparison = None
    if compare is not None:
        if result is None:
            raise EvalError("--compare needs a scored run (this benchmark has no references)")
        comparison = compare_runs(result.rows, bench.scoring, compare, n_resamples=n_resamples, seed=seed)
        atomic_write_json(out / COMPARISON_NAME, comparison)
        files["comparison"] = COMPARISON_NAME

    report["notices"] = notices
    report["files"] = files
    report["sources"] = dict(bench.sources)
    if provenance:
        report.update({k: v for k, v in provenance.items() if k not in report})
    atomic_write_json(out / METRICS_NAME, report)
    if comparison is not None:
        return {**report, "comparison": comparison}
    return report


def _bootstrap_note(scoring: str, n_resamples: int, seed: int) -> dict[str, Any]:
    note: dict[str, Any] = {"resamples": n_resamples, "seed": seed, "confidence": 0.95,
                            "method": "percentile bootstrap over items"}
    if scoring == "caption":
        note["notes"] = ("Bleu_n recomputed exactly from per-item n-gram statistics; CIDEr with document "
                         "frequencies of the full reference set held fixed; METEOR interval from the mean "
                         "of per-segment scores (approximation); no intervals for breakdowns")
    else:
        note["notes"] = "breakdown intervals resample within each group (stratified)"
    return note


# --------------------------------------------------------------------------- model


def resolve_device(device: str | None = "auto"):
    """``"auto"``/None -> the GPU when there is one, else the CPU; anything else -> ``torch.device``."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EvalError(f"bad --device {device!r}: {e}") from None


def model_predict_fn(
    model: str | os.PathLike | tuple,
    *,
    device: str | None = "auto",
    dtype: str | None = "auto",
    max_new_tokens: int = 32,
    num_beams: int = 1,
    do_sample: bool = False,
) -> PredictFn:
    """A ``predict_fn`` from a checkpoint directory (``mmlm.load(path, device, dtype)``) or a
    ``(vlm, processor)`` pair (used where it is, e.g. inside training).

    Generation is greedy by default (``do_sample=False, num_beams=1``). Prompts are passed to
    ``mmlm.describe`` untouched: the checkpoint's chat template is applied there, and a ``None``
    prompt means the checkpoint's captioning prompt.
    """
    import torch

    import mmlm

    if isinstance(model, tuple):
        vlm, processor = model
    else:
        path = Path(model)
        if not path.is_dir():
            raise EvalError(f"--model: no such checkpoint directory: {path}")
        vlm, processor = mmlm.load(os.fspath(path), device=resolve_device(device), dtype=dtype)
    vlm.eval()

    def predict_fn(images: list, prompts: list) -> list[str]:
        with torch.no_grad():
            return list(mmlm.describe(
                images, model=(vlm, processor), prompt=list(prompts), batch_size=max(1, len(images)),
                max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
            ))

    return predict_fn
