"""Evaluation: benchmark readers/writers, official caption and VQA metrics, bootstrap
intervals and paired tests, and the runner behind ``mmlm eval``.

Public entry points::

    from mmlm.evaluation import load_benchmark, evaluate, model_predict_fn
    bench = load_benchmark("vqa", "vqav2", questions=..., annotations=..., images=..., limit=500)
    report = evaluate(bench, model_predict_fn("mmlm-quickstart/model"), "results/vqav2")

``predict_fn(images, prompts) -> texts`` is the only thing the runner needs from a model.
The Lightning callback lives in :mod:`mmlm.evaluation.callback` (imported on demand, so this
package does not import lightning). Nothing here runs at import time.
"""

from .benchmarks import (
    CAPTION_BENCHMARKS,
    DEFAULT_VQA_SUFFIX,
    VQA_BENCHMARKS,
    Benchmark,
    BenchmarkError,
    Item,
    load_benchmark,
    read_predictions,
    write_predictions,
)
from .bootstrap import StatSpec, bootstrap_ci, paired_bootstrap
from .caption_metrics import CaptionScores, python_ptb_tokenize, score_captions
from .runner import EvalError, compare_runs, evaluate, model_predict_fn, predict, score
from .vqa_metrics import exact_match, gqa_accuracy, normalize_answer, pope_answer, pope_report, vqa_accuracy, vqa_report

__all__ = [
    "CAPTION_BENCHMARKS", "VQA_BENCHMARKS", "DEFAULT_VQA_SUFFIX", "Benchmark", "BenchmarkError", "Item",
    "load_benchmark", "read_predictions", "write_predictions", "StatSpec", "bootstrap_ci", "paired_bootstrap",
    "CaptionScores", "python_ptb_tokenize", "score_captions", "EvalError", "compare_runs", "evaluate",
    "model_predict_fn", "predict", "score", "exact_match", "gqa_accuracy", "normalize_answer", "pope_answer", "pope_report",
    "vqa_accuracy", "vqa_report",
]
