"""Score predictions against a benchmark's references, bootstrap intervals, and compare two runs.

Contract
--------
:func:`score` ``(bench, predictions: {id: text})`` -> :class:`ScoreResult`: ``metrics`` with the
official names and scales (captions: ``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``
[, ``SPICE``] as pycocoevalcap's fractions; VQA/exact: ``overall`` + breakdowns in percent,
2 decimals; POPE: ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (fractions) and
``overall`` (percent)), one row per scored item (``{"id", "prediction", "scores", "stats",
"groups"}``, the content of ``per_item.jsonl``) and the bootstrap :class:`~.bootstrap.StatSpec`.
It raises :class:`EvalError` when no item has both a prediction and references.

:func:`stat_spec` rebuilds that spec from per-item rows alone (so another run's
``per_item.jsonl`` can be resampled); :func:`_intervals` gives percentile-bootstrap ``ci95``
intervals (breakdowns stratified by group, none for caption breakdowns) and
:func:`_bootstrap_note` the matching method notes; :func:`compare_runs` runs the paired bootstrap
against another run's ``metrics.json`` (:data:`METRICS_NAME`) and the per-item file it names
(default :data:`PER_ITEM_NAME`), pairing items by id; :func:`load_compared_run` reads and checks
that run (the runner calls it up front). Nothing here generates predictions or
writes files; see :mod:`.prediction` and :mod:`.runner`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import vqa_metrics as vm
from .benchmarks import Benchmark, Item
from .bootstrap import MetricKey, StatSpec, bootstrap_ci, nest, paired_bootstrap
from .caption_metrics import caption_stat_spec, score_captions
from .errors import EvalError

__all__ = ["ScoreResult", "PER_ITEM_NAME", "METRICS_NAME", "score", "stat_spec", "compare_runs", "load_compared_run"]

PER_ITEM_NAME = "per_item.jsonl"
METRICS_NAME = "metrics.json"
_VQA_DIGITS = 2


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


# benchmarks whose official evaluation has its own variant of the VQA accuracy (see .vqa_metrics)
_VQA_RULES = {
    "textvqa": (vm.textvqa_accuracy, "TextVQA's official accuracy (EvalAI answer processing of the prediction "
                                     "and every answer, leave-one-out min(#matches/3, 1))"),
    "vizwiz": (vm.vizwiz_accuracy, "VizWiz-VQA's official accuracy (normalized prediction vs the answers as "
                                   "written, leave-one-out min(#matches/3, 1))"),
}


def _score_vqa(bench: Benchmark, items: list[Item], preds: Mapping[str, str]) -> ScoreResult:
    accuracy, rule = _VQA_RULES.get(bench.name, (vm.vqa_accuracy, "official VQA accuracy (leave-one-out "
                                                                  "min(#matches/3, 1))"))
    rows = []
    accs = []
    for it in items:
        pred = preds[it.id]
        acc = accuracy(pred, it.references) if bench.scoring == "vqa" else vm.gqa_accuracy(pred, it.references)
        accs.append(acc)
        rows.append({"id": it.id, "prediction": pred, "scores": {"accuracy": acc}, "groups": dict(it.groups)})
    metrics = vm.vqa_report(accs, [r["groups"] for r in rows], ndigits=_VQA_DIGITS)
    info = {}
    if bench.scoring == "vqa":
        n_soft = sum(len(it.references) >= vm.MIN_SOFT_ANSWERS for it in items)
        info["accuracy_rule"] = (
            f"{rule} for {n_soft} item(s) with >= "
            f"{vm.MIN_SOFT_ANSWERS} answers; exact match after normalization for {len(items) - n_soft} item(s)"
        )
    else:
        info["accuracy_rule"] = ("GQA exact match as LLaVA scores it: the reply stripped, trailing '.' removed and "
                                 "lower-cased, compared with the gold answer as written (no VQA normalization)")
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
    extra: dict[str, float] = {}
    if "METEOR" in res.metrics:  # corpus METEOR / mean segment METEOR (see .caption_metrics)
        mean = float(np.mean([res.per_item[it.id]["METEOR"] for it in items]))
        extra["meteor_scale"] = res.metrics["METEOR"] / mean if mean > 0 else 1.0
    rows = [
        {"id": it.id, "prediction": preds[it.id], "scores": res.per_item[it.id],
         "stats": {"bleu": res.bleu_stats[it.id], **extra}, "groups": dict(it.groups)}
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


def _bootstrap_note(scoring: str, n_resamples: int, seed: int) -> dict[str, Any]:
    note: dict[str, Any] = {"resamples": n_resamples, "seed": seed, "confidence": 0.95,
                            "method": "percentile bootstrap over items"}
    if scoring == "caption":
        note["notes"] = ("Bleu_n recomputed exactly from per-item n-gram statistics; CIDEr with document "
                         "frequencies of the full reference set held fixed; METEOR interval from the mean "
                         "of per-segment scores rescaled to the corpus METEOR (approximation); no intervals "
                         "for breakdowns")
    else:
        note["notes"] = "breakdown intervals resample within each group (stratified)"
    return note


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


def load_compared_run(other_metrics: str | os.PathLike, scoring: str) -> tuple[Path, Path, list[dict[str, Any]]]:
    """The run that ``--compare`` names: (its metrics.json, its per-item file, its per-item rows).
    Raises :class:`EvalError` when the file is missing or invalid, was scored with another rule
    or has no per-item scores (the runner calls it before any work, so a bad ``--compare`` fails
    first, not after predicting and scoring)."""
    mpath = Path(other_metrics)
    if mpath.is_dir():
        mpath = mpath / METRICS_NAME
    if not mpath.is_file():
        raise EvalError(f"--compare: no such metrics file: {mpath}")
    try:
        other = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"--compare: {mpath} is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(other, dict) or other.get("scoring") != scoring:
        got = other.get("scoring") if isinstance(other, dict) else None
        raise EvalError(f"--compare: {mpath} was scored with {got!r}, this run with {scoring!r}")
    per_item = mpath.parent / ((other.get("files") or {}).get("per_item") or PER_ITEM_NAME)
    if not per_item.is_file():
        raise EvalError(f"--compare: per-item scores not found: {per_item}")
    rows = _read_rows(per_item)
    if not all(isinstance(r, dict) and "id" in r for r in rows):
        raise EvalError(f"--compare: {per_item} is not a per-item scores file (rows without 'id')")
    meteor = other.get("METEOR")
    if scoring == "caption" and isinstance(meteor, (int, float)) and rows and \
            all("METEOR" in (r.get("scores") or {}) and "meteor_scale" not in (r.get("stats") or {}) for r in rows):
        # a run written before rows carried METEOR's corpus/segment-mean ratio: derive it from its metrics.json
        mean = float(np.mean([r["scores"]["METEOR"] for r in rows]))
        for r in rows:
            r.setdefault("stats", {})["meteor_scale"] = meteor / mean if mean > 0 else 1.0
    return mpath, per_item, rows


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
    mpath, per_item, rows = load_compared_run(other_metrics, scoring)
    rows_b = {r["id"]: r for r in rows}
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
