"""The main job on the embedded default: synthetic data -> tiny model -> scores -> captions.

``run_quickstart(workdir)``:

1. builds the synthetic shapes dataset in ``WORKDIR/data`` (``data_pipelines.synthetic``);
2. trains the ``tiny`` preset in stages (:data:`RECIPES`, what each teaches in :data:`RECIPE_ROLES`;
   :func:`stage_summary` says both in words) through the same code as ``mmlm fit``, on the GPU when
   there is one, else the CPU, each stage from the previous stage's model. A stage's run directory
   is ``WORKDIR/<recipe name>``, the last one's ``WORKDIR`` itself (checkpoints/, logs/,
   preflight.json, model/); a killed quickstart resumes from the stage's ``last.ckpt``;
3. evaluates ``WORKDIR/model`` on the synthetic test split with ``mmlm.evaluation`` (the code
   behind ``mmlm eval``): VQA accuracy (official VQA rule) and caption metrics (CIDEr, BLEU,
   METEOR, ROUGE-L with pycocoevalcap), plus caption exact match;
4. describes four test images next to their ground truth;
5. writes ``WORKDIR/results.json`` and returns it.

A used WORKDIR is reused with the options it was made with: the data is kept and each stage resumes
from (or, done, skips past) its ``last.ckpt``. Other options are refused with what differs
(``WORKDIR/quickstart-settings.json`` records the stages, ``fit_args`` and seed; the data's own
manifest its sizes): a stage that resumes its checkpoint ignores the model the stage before it would
now give, so a quick look (``--max-steps 2``) continued as a full run would train later stages from
the quick look's models.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from mmlm.io import atomic_write_text

N_SHOWN = 4
RECIPES = ("tiny-cpu.yaml", "tiny-cpu-vqa.yaml", "tiny-cpu-color.yaml", "tiny-cpu-where.yaml", "tiny-cpu-review.yaml")
"""The quickstart's stages, in order (files in ``configs/``)."""
RECIPE_ROLES = ("captions", "questions and captions", "a drill of the colour questions",
                "a drill of the position questions", "questions and captions again")
"""What each of :data:`RECIPES` trains on."""


def stage_summary() -> str:
    """The stages in words: ``captions (configs/tiny-cpu.yaml), ...``."""
    return ", ".join(f"{role} (configs/{recipe})" for recipe, role in zip(RECIPES, RECIPE_ROLES, strict=True))


def default_config(name: str = "tiny-cpu.yaml") -> Path:
    """``configs/NAME`` of this checkout (the quickstart runs from an editable install)."""
    path = Path(__file__).resolve().parent.parent / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the quickstart from a checkout (pip install -e .) "
                                "or pass the recipe's path")
    return path


def normalize_caption(text: str) -> str:
    """Lower case, single spaces, no final period: the form exact match compares."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def caption_exact_match(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """Fraction of images whose caption equals one of its references (after normalization)."""
    if not references:
        return 0.0
    hits = sum(
        normalize_caption(predictions.get(i, "")) in {normalize_caption(r) for r in refs}
        for i, refs in references.items()
    )
    return hits / len(references)


def learning_curve(workdir: Path) -> list[dict[str, float]]:
    """Rows of the newest ``logs/version_*/metrics.csv`` that hold a loss or an eval metric."""
    versions = sorted((workdir / "logs").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows: list[dict[str, float]] = []
    for path in versions[-1:]:
        with path.open() as f:
            for row in csv.DictReader(f):
                keep = {k: float(v) for k, v in row.items()
                        if v not in ("", None) and (k in ("step", "train/loss", "val/loss") or k.startswith("eval/"))}
                if len(keep) > 1:
                    rows.append(keep)
    return rows


class TrainingFailed(RuntimeError):
    """``mmlm fit`` exited with ``exit_code``: a signal (>= 128; its ``last.ckpt`` is saved, a re-run resumes)
    or an error (its message is in the log above)."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        if exit_code >= 128:
            super().__init__(f"training stopped by signal {exit_code - 128}; re-run the same command to resume "
                             "from its last checkpoint")
        else:
            super().__init__(f"training failed (mmlm fit exit code {exit_code}); its log is above")


def train(workdir: Path, data: Path, config: Path, extra_args: list[str]) -> float:
    """Run ``mmlm fit`` on the synthetic data; returns its wall time in seconds."""
    from mmlm.cli.fit import main as fit_main

    argv = [
        "--config", os.fspath(config),
        "--trainer.default_root_dir", os.fspath(workdir),
        "--trainer.accelerator", "auto",
        "--data.train", os.fspath(data / "train"),
        "--data.val", os.fspath(data / "val"),
        "--ckpt_path", "last",
        *extra_args,
    ]
    start = time.perf_counter()
    code = fit_main(argv)
    if code != 0:
        raise TrainingFailed(code)
    return time.perf_counter() - start


def evaluate(model_dir: Path, data: Path, out: Path, batch_size: int = 64) -> dict[str, Any]:
    """VQA and caption scores of ``model_dir`` on the synthetic test split."""
    from mmlm.evaluation.benchmarks import load_benchmark, read_predictions
    from mmlm.evaluation.runner import evaluate as run_eval
    from mmlm.evaluation.runner import model_predict_fn

    ann = data / "test" / "annotations"
    images = data / "test" / "images"
    vqa_bench = load_benchmark("vqa", "vqav2", questions=ann / "questions.json",
                               annotations=ann / "vqa_annotations.json", images=images,
                               prompt_suffix="")  # the synthetic questions are trained without a suffix
    vqa = run_eval(vqa_bench, model_predict_fn(os.fspath(model_dir), max_new_tokens=4), out / "vqa",
                   batch_size=batch_size, resume=False)
    cap_bench = load_benchmark("caption", "coco", annotations=ann / "captions.json", images=images)
    cap = run_eval(cap_bench, model_predict_fn(os.fspath(model_dir), max_new_tokens=48), out / "caption",
                   batch_size=batch_size, resume=False)
    preds = read_predictions(cap_bench, out / "caption" / cap_bench.submission.filename)
    refs = {it.id: list(it.references) for it in cap_bench.items}
    return {"vqa": vqa, "caption": cap, "caption_exact_match": caption_exact_match(preds, refs)}


def show_examples(model_dir: Path, data: Path, n: int = N_SHOWN) -> list[dict[str, str]]:
    """Captions of the first ``n`` test images next to their ground truth."""
    import mmlm

    captions = json.loads((data / "test" / "annotations" / "captions.json").read_text())
    truth = {a["image_id"]: a["caption"] for a in captions["annotations"]}
    files = {im["id"]: data / "test" / "images" / im["file_name"] for im in captions["images"]}
    ids = sorted(files)[:n]
    texts = mmlm.describe([files[i] for i in ids], model=os.fspath(model_dir), max_new_tokens=48)
    return [{"image": os.fspath(files[i]), "truth": truth[i], "model": t} for i, t in zip(ids, texts)]


def stage_dirs(workdir: Path, recipes: list[Path]) -> list[Path]:
    """Each stage's run directory: ``WORKDIR/<recipe name>``, the last stage's ``WORKDIR``."""
    names = [r.stem for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"the stage recipes need distinct file names (they name the run directories), got {names}")
    return [workdir / n for n in names[:-1]] + [workdir]


SETTINGS = "quickstart-settings.json"
"""What a WORKDIR was trained with (recipes, fit_args, seed): a re-run with others is refused."""


def check_settings(workdir: Path, settings: dict[str, Any]) -> None:
    """Refuse to continue ``workdir`` with other ``settings`` than those it records (see the module
    docstring); a workdir without a record (new, or older than it) passes."""
    path = workdir / SETTINGS
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is unreadable; delete {workdir} or use another --workdir") from None
    diff = [f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
    if diff:
        raise ValueError(f"--workdir {workdir} was trained with other options ({'; '.join(diff)}); its stages would "
                         "resume from those models: use another --workdir, or delete it")


def run_quickstart(workdir: str | os.PathLike = "mmlm-quickstart", *,
                   recipes: list[str | os.PathLike] | None = None, train_images: int = 20000,
                   val_images: int = 200, test_images: int = 500, fit_args: list[str] | None = None,
                   progress: bool = True, seed: int | None = None) -> dict[str, Any]:
    """Build data, train the stages ``recipes`` (default :data:`RECIPES`; each stage after the first
    starts from the previous one's model; ``fit_args`` go to every stage), evaluate and describe;
    returns (and writes) ``WORKDIR/results.json``. ``seed``: every stage's ``--seed_everything`` (model
    init and data order; None: the recipes' own), recorded in the results."""
    import torch

    from data_pipelines._errors import BuildError
    from data_pipelines.synthetic import build

    paths = [Path(r) for r in recipes] if recipes else [default_config(n) for n in RECIPES]
    for recipe in paths:
        if not recipe.is_file():  # before minutes of data building and a first stage
            raise FileNotFoundError(f"--recipes {recipe}: no such recipe file")
    workdir = Path(workdir)
    dirs = stage_dirs(workdir, paths)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir {workdir} exists and is not a directory")
    fit_args = [*(fit_args or []), *(["--seed_everything", str(seed)] if seed is not None else [])]
    settings = {"recipes": [os.fspath(r.resolve()) for r in paths], "fit_args": fit_args}
    check_settings(workdir, settings)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    t0 = time.perf_counter()
    print(f"[1/4] synthetic dataset -> {data}", flush=True)
    try:
        build(data, train=train_images, val=val_images, test=test_images, seed=0, show_progress=progress)
    except BuildError as e:  # e.g. a workdir made with other --train-images: the builder's advice names its --out
        why = str(e).replace("use another --out", "use another --workdir")
        raise ValueError(f"--workdir {workdir}: {why}") from None
    data_seconds = time.perf_counter() - t0
    atomic_write_text(workdir / SETTINGS, json.dumps(settings, indent=2))
    stage_seconds: dict[str, float] = {}
    for i, (recipe, run_dir) in enumerate(zip(paths, dirs)):
        print(f"[2/4] training the tiny preset, stage {i + 1}/{len(paths)}: {recipe.name} -> {run_dir}", flush=True)
        init = ["--model.init_from", os.fspath(dirs[i - 1] / "model")] if i else []
        stage_seconds[recipe.stem] = train(run_dir, data, recipe, [*init, *fit_args])
    train_seconds = sum(stage_seconds.values())
    model_dir = workdir / "model"
    print(f"[3/4] evaluating {model_dir} on the synthetic test split", flush=True)
    t1 = time.perf_counter()
    scores = evaluate(model_dir, data, workdir / "eval")
    eval_seconds = time.perf_counter() - t1
    print("[4/4] describing test images", flush=True)
    examples = show_examples(model_dir, data)
    vqa, cap = scores["vqa"], scores["caption"]
    results = {
        "vqa_accuracy": round(vqa["overall"] / 100.0, 4),
        "vqa_per_question_type": vqa.get("perQuestionType", {}),
        "caption_exact_match": round(scores["caption_exact_match"], 4),
        "cider": cap.get("CIDEr"),
        "bleu_4": cap.get("Bleu_4"),
        "meteor": cap.get("METEOR"),
        "rouge_l": cap.get("ROUGE_L"),
        "ci95": {"vqa": vqa.get("ci95", {}).get("overall"), "cider": cap.get("ci95", {}).get("CIDEr")},
        "train_seconds": round(train_seconds, 1),
        "train_seconds_per_stage": {k: round(v, 1) for k, v in stage_seconds.items()},
        "data_seconds": round(data_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "seed": seed,
        "model": os.fspath(model_dir),
        "examples": examples,
        "learning_curve": {r.stem: learning_curve(d) for r, d in zip(paths, dirs)},
    }
    atomic_write_text(workdir / "results.json", json.dumps(results, indent=2))
    return results


def format_results(results: dict[str, Any]) -> str:
    """The table ``mmlm quickstart`` prints."""
    lines = ["", "results on the synthetic test split", "-" * 36]
    per_type = results.get("vqa_per_question_type") or {}
    lines.append(f"{'VQA accuracy':<24}{results['vqa_accuracy']:>10.1%}")
    for qtype, acc in sorted(per_type.items()):
        lines.append(f"{'  ' + qtype:<24}{acc / 100:>10.1%}")
    lines.append(f"{'caption exact match':<24}{results['caption_exact_match']:>10.1%}")
    for key, label in (("cider", "CIDEr"), ("bleu_4", "BLEU-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L")):
        if results.get(key) is not None:
            lines.append(f"{label:<24}{results[key]:>10.3f}")
    lines.append(f"{'training time':<24}{results['train_seconds'] / 60:>9.1f}m")
    lines.append(f"{'total time':<24}{results['total_seconds'] / 60:>9.1f}m")
    lines.append(f"{'device':<24}{results['device']:>10}")
    lines += ["", "test images described:"]
    for ex in results["examples"]:
        mark = "ok" if normalize_caption(ex["model"]) == normalize_caption(ex["truth"]) else "  "
        lines += [f"  {ex['image']}", f"     truth: {ex['truth']}", f"  {mark} model: {ex['model']}"]
    return "\n".join(lines)
