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
  different fingerprint (other model/prompt/generation settings, other numerics: ``mmlm eval``
  records the resolved device type and dtype, not ``auto``; other data files: the benchmark's
  annotation/question files, image folder and shard pattern, as absolute paths, and the contents
  of the annotation/question files as SHA-256 digests, ``data_sha256``: a file edited in place is
  another run) is refused unless ``resume=False``, which starts the cache afresh. A torn last line
  is dropped.
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
run with :class:`EvalError`, and so does a run where no item could be predicted at all. Greedy decoding is the default of :func:`model_predict_fn`.

Layout
------
This module keeps only the orchestration (:func:`evaluate`, with :func:`check_run`, the checks it
makes before any work, and :func:`data_digests`, the data files' part of the cache fingerprint) and
``COMPARISON_NAME``; the rest
lives in modules that each do one thing and is re-exported here (see ``__all__``), so
``from mmlm.evaluation.runner import ...`` and ``runner.X`` keep working:

* :mod:`.errors` - :class:`EvalError`.
* :mod:`.prediction` - the prediction cache and :func:`predict` (``PredictFn``, ``CACHE_NAME``),
  and the model plumbing :func:`model_predict_fn` / :func:`resolve_device`.
* :mod:`.scoring` - :class:`ScoreResult`, :func:`score`, :func:`stat_spec`, the bootstrap
  intervals (``_intervals``, ``_bootstrap_note``) and :func:`compare_runs` (``PER_ITEM_NAME``,
  ``METRICS_NAME``).

:func:`evaluate` calls the re-exported names through this module's namespace, so patching
``runner.predict``/``runner.score``/``runner.compare_runs`` (tests) takes effect; callers of
``runner.model_predict_fn`` (CLI, callback) look it up here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .benchmarks import Benchmark, BenchmarkError, atomic_write_json, atomic_write_text, read_predictions, write_predictions
from .errors import EvalError
from .prediction import (
    CACHE_NAME,
    PredictFn,
    _cache_text,
    _open_cache,
    _read_cache,
    model_predict_fn,
    predict,
    resolve_device,
)
from .scoring import (
    _VQA_DIGITS,
    METRICS_NAME,
    PER_ITEM_NAME,
    ScoreResult,
    _acc_spec,
    _bootstrap_note,
    _intervals,
    _pope_spec,
    _read_rows,
    _round_tree,
    _score_caption,
    _score_pope,
    _score_vqa,
    compare_runs,
    load_compared_run,
    score,
    stat_spec,
)

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
    "check_run",
    "data_digests",
    "file_sha256",
    "compare_runs",
    "load_compared_run",
    "model_predict_fn",
    "resolve_device",
    # private helpers moved to .prediction / .scoring, re-exported so old imports keep resolving
    "_read_cache",
    "_cache_text",
    "_open_cache",
    "_VQA_DIGITS",
    "_acc_spec",
    "_pope_spec",
    "_score_vqa",
    "_score_pope",
    "_score_caption",
    "_round_tree",
    "_intervals",
    "_bootstrap_note",
    "_read_rows",
]

COMPARISON_NAME = "comparison.json"
CONTENT_HASHED_SOURCES = ("annotations", "questions")
"""The data files whose contents (not only their paths) go into the prediction cache's fingerprint."""
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- data fingerprint


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's contents, read in 1 MiB chunks (a VQAv2 questions file is tens of MB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_digests(bench: Benchmark) -> dict[str, str]:
    """``{source: sha256}`` of the benchmark's annotation/questions files (:data:`CONTENT_HASHED_SOURCES`):
    a file edited in place keeps its path, and its cached predictions must not be taken for the new items.
    Shard tars and image folders are fingerprinted by path only (hashing them would mean reading every image)."""
    if bench.name == "shards":  # --annotations is then a shard pattern, not a file read as annotations
        return {}
    return {k: file_sha256(v) for k, v in sorted(bench.sources.items())
            if k in CONTENT_HASHED_SOURCES and os.path.isfile(v)}


# --------------------------------------------------------------------------- evaluate


def check_run(bench: Benchmark, *, model: bool, compare: str | os.PathLike | None = None) -> None:
    """What :func:`evaluate` checks before any work (the CLI calls it before loading a model):
    a model run needs every item's image and, for VQA, its question (a ``None`` prompt would mean
    the checkpoint's caption prompt: the model would caption instead of answer); ``compare`` must
    name a readable run scored with the same rule. Raises :class:`EvalError`."""
    if model:
        if any(it.image is None for it in bench.items):
            raise EvalError(f"--images DIR is needed to run a model on {bench.name}")
        if bench.task == "vqa" and any(it.prompt is None for it in bench.items):
            raise EvalError(f"--questions FILE is needed to run a model on {bench.name} "
                            "(the annotations hold no question text)")
    if compare is not None:
        if not bench.has_references:
            raise EvalError("--compare needs a scored run (this benchmark has no references)")
        load_compared_run(compare, bench.scoring)


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
    check_run(bench, model=predict_fn is not None, compare=compare)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an earlier run's results go now, not when this one ends: a run that fails must not leave them next to
    # its own cache as if they were its results (a --predictions file in --out itself is this run's input)
    given = Path(predictions_path).resolve() if predictions_path is not None else None
    compared_here = compare is not None and Path(compare).resolve().parent == out.resolve()  # read at the end
    for name in (METRICS_NAME, PER_ITEM_NAME, COMPARISON_NAME, "predictions.json", "predictions.jsonl"):
        if (out / name).resolve() != given and not compared_here:
            (out / name).unlink(missing_ok=True)
    notices = list(bench.notices)
    files: dict[str, str] = {}
    skipped_items: dict[str, str] = {}

    if predict_fn is not None:
        # the data files belong to the run too: the same ids in other files (POPE's random/popular/
        # adversarial files all number their questions from 1) must not reuse cached answers
        data = {k: os.path.abspath(v) for k, v in sorted(bench.sources.items())}
        fp = {"benchmark": bench.name, "task": bench.task, "data": data, "data_sha256": data_digests(bench),
              **dict(fingerprint or {})}
        preds, skipped_items = predict(
            bench.items, predict_fn, batch_size=batch_size, cache_path=out / CACHE_NAME, fingerprint=fp,
            resume=resume, progress=progress, max_bad_fraction=max_bad_fraction, desc=f"eval {bench.name}",
        )
        # an item whose image cannot be read is answered with nothing, so scored as wrong: the score covers the
        # whole benchmark (as the official evaluations do) and the submission file holds every id (theirs assert it)
        preds.update({i: "" for i in skipped_items})
        write_predictions(bench, preds, out / bench.submission.filename)
        files["predictions"] = bench.submission.filename
        files["cache"] = CACHE_NAME
        if skipped_items:
            first = next(iter(skipped_items.items()))
            notices.append(f"{len(skipped_items)} item(s) with unreadable images are scored as wrong (an empty "
                           f"prediction); first: {first[0]}: {first[1]}")
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

    comparison = None
    if compare is not None:
        if result is None:
            raise EvalError("--compare needs a scored run (this benchmark has no references)")
        comparison = compare_runs(result.rows, bench.scoring, compare, n_resamples=n_resamples, seed=seed)
    # the result files last, after everything that can fail: per_item.jsonl, comparison.json, metrics.json
    if result is not None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows)
        atomic_write_text(out / PER_ITEM_NAME, text)
        files["per_item"] = PER_ITEM_NAME
    if comparison is not None:
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
