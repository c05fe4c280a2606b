"""``mmlm eval caption|vqa``: score a model (or a predictions file) on standard benchmarks.

Thin layer: parse arguments, call :mod:`mmlm.evaluation` (``load_benchmark`` -> ``evaluate``),
print a small results table. Bad input prints one ``error: ...`` line to stderr and returns 2,
before any model is loaded: ``--skip-metrics`` and ``--tokenizer ptb`` (Java) are checked with the
arguments, ``--device``/``--dtype`` as ``mmlm describe`` checks them (``check_model_args``: CUDA
asked for but absent is an error, not a traceback). The resume fingerprint holds the resolved
device type and dtype (``auto`` -> e.g. ``cuda``/``bfloat16``), so a cached run is never continued
with other numerics, and (added by the runner) the SHA-256 of the ``--questions``/``--annotations`` files, so
one edited in place is refused ("differs in: data_sha256.questions"; ``--no-resume`` starts afresh).
A run in which no item could be predicted fails (exit 2).
Outputs (all written atomically) in ``--out``: ``predictions.json`` (``.jsonl`` for POPE) in the
benchmark's submission format, ``metrics.json`` (official metric names and scales, 95% bootstrap
intervals under ``ci95``), ``per_item.jsonl`` (per-item scores, read by ``--compare``),
``predictions.cache.jsonl`` (resume cache) and, with ``--compare``, ``comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

_EPILOG_CAPTION = """\
benchmarks and files:
  coco-karpathy  --annotations dataset_coco.json --images DIR (holding val2014/, train2014/) [--split test|val]
  flickr30k      --annotations dataset_flickr30k.json --images flickr30k-images/ [--split test|val]
  coco           --annotations captions_val2014.json --images val2014/
  nocaps         --annotations nocaps_val_4500_captions.json --images DIR  (adds perDomain scores)
  shards         --shards 'data/test-{000000..000003}.tar' (samples with "captions" or a caption,
                 KEY.txt or "caption": the references; images inside)

metrics (pycocoevalcap scorers, its PTB tokenizer; fractions as pycocoevalcap reports them):
  Bleu_1..Bleu_4, METEOR (needs Java), ROUGE_L, CIDEr, SPICE (only when Stanford CoreNLP 3.6.0 is
  in pycocoevalcap/spice/lib; never downloaded). Without Java: a pure-Python PTB tokenizer and no METEOR,
  both stated in metrics.json.

examples:
  mmlm eval caption --model mmlm-quickstart/model --benchmark coco-karpathy \\
      --annotations karpathy/dataset_coco.json --images coco/ --out results/coco-test
  mmlm eval caption --predictions results.json --benchmark coco --annotations captions_val2014.json --out scored/
  mmlm eval caption ... --out results/b --compare results/a/metrics.json   # paired bootstrap test
"""

_EPILOG_VQA = """\
benchmarks and files:
  vqav2, okvqa  --questions OpenEnded_mscoco_val2014_questions.json --annotations mscoco_val2014_annotations.json
                --images val2014/   (without --annotations, e.g. test-dev: predictions only)
  vizwiz        --annotations val.json --images val/
  textvqa       --annotations TextVQA_0.5.1_val.json --images train_images/
  gqa           --questions testdev_balanced_questions.json --images images/
  pope          --questions coco_pope_adversarial.json (jsonl: question_id, image, text, label) --images val2014/
  shards        --shards 'data/vqa-{000000..000003}.tar' (samples with "question"/"answers")

metrics: VQA accuracy as the official vqaEval.py (answer normalization; mean over the 10 leave-one-out
  subsets of min(#matches/3, 1)) in percent: overall, perAnswerType, perQuestionType; TextVQA and VizWiz
  with their own official answer processing (TextVQA: EvalAI's, on the answers too; VizWiz: answers as
  written); GQA: exact match as LLaVA scores it (reply stripped, trailing "." removed, lower-cased,
  compared with the gold answer as written; no VQA normalization), perAnswerType open/binary;
  POPE: accuracy, precision, recall, f1, yes_ratio (fractions) and overall (accuracy, percent).
  Submission files: VQAv2/OK-VQA/TextVQA/shards [{question_id, answer}], VizWiz [{image, answer}],
  GQA [{questionId, prediction}], POPE jsonl {question_id, prompt, text}.

examples:
  mmlm eval vqa --model mmlm-quickstart/model --benchmark vqav2 --questions q.json --annotations a.json \\
      --images val2014/ --out results/vqav2 --limit 500
  mmlm eval vqa --predictions answers.json --benchmark gqa --questions testdev_balanced_questions.json --out scored/
"""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _common(p: argparse.ArgumentParser, task: str) -> None:
    from mmlm.evaluation.benchmarks import CAPTION_BENCHMARKS, VQA_BENCHMARKS

    names = CAPTION_BENCHMARKS if task == "caption" else VQA_BENCHMARKS
    p.add_argument("--benchmark", required=True, choices=names, help="which benchmark format to read (see below)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="checkpoint directory to evaluate (mmlm.load)")
    src.add_argument("--predictions", metavar="FILE",
                     help="score this existing predictions file (the benchmark's submission format, ids typed "
                          "as in its files: e.g. integer question_id for VQAv2, string questionId for GQA) instead "
                          "of a model")
    p.add_argument("--annotations", metavar="FILE", help="annotation file (references / human answers; see below)")
    if task == "vqa":
        p.add_argument("--questions", metavar="FILE", help="questions file (VQAv2/OK-VQA questions, GQA, POPE)")
    p.add_argument("--images", metavar="DIR", help="image folder (needed with --model; not for --predictions)")
    p.add_argument("--shards", metavar="PATTERN",
                   help="for --benchmark shards: tar files, folders of *.tar or brace patterns (a{0..3}.tar)")
    if task == "caption":
        p.add_argument("--split", default=None,
                       help="Karpathy split for coco-karpathy/flickr30k: test (default), val, train, restval, all")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: metrics.json, per_item.jsonl, predictions file, resume cache")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N items (a quick look)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per generation batch")
    p.add_argument("--device", default="auto",
                   help="torch device for the model: auto (the GPU when there is one), cpu, mps, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="model dtype: auto (bf16 on a GPU that supports it, else fp32), fp32, bf16, fp16; a cached "
                        "run resumes only with the same resolved device type and dtype")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help=f"generation length limit (default {48 if task == 'caption' else 16})")
    p.add_argument("--num-beams", type=_positive_int, default=1, help="beam width (1 = greedy decoding, the default)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (static KV cache; CUDA graphs on a GPU): each new batch size "
                        "compiles first (seconds); same predictions as eager greedy decoding; on a CPU batches of 16 "
                        "gain little (3,000 quickstart VQA questions: 9.3 s instead of 10.5 s)")
    p.add_argument("--bootstrap", type=_non_negative_int, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% intervals and --compare (0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    p.add_argument("--compare", metavar="METRICS_JSON",
                   help="another run's metrics.json (or its folder): paired bootstrap test on the common items")
    p.add_argument("--no-resume", action="store_true",
                   help="discard predictions cached in --out by an earlier run instead of resuming from them")
    p.add_argument("--allow-missing", action="store_true",
                   help="with --predictions: score only the items that have a prediction instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` (with ``caption`` and ``vqa``) on an argparse subparsers object."""
    from mmlm.evaluation.benchmarks import DEFAULT_VQA_SUFFIX

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "eval", help="score a model or predictions on captioning / VQA benchmarks (official metrics)",
        description=(
            "Evaluate a checkpoint (--model) or an existing predictions file (--predictions) on standard "
            "captioning and VQA benchmarks with the official metrics. Writes metrics.json (official names and "
            "scales, 95% bootstrap intervals), per_item.jsonl and the predictions in the benchmark's "
            "submission format. Predictions are cached per batch: rerunning the same command resumes (a changed "
            "model, option or data file, contents included, is refused: pass --no-resume to start afresh)."
        ),
        formatter_class=fmt,
    )
    p.set_defaults(run=_help_run(p))
    sub = p.add_subparsers(dest="eval_task", metavar="TASK")
    c = sub.add_parser(
        "caption", help="image captioning: BLEU, METEOR, ROUGE-L, CIDEr (SPICE when available)",
        description=(
            "Caption every test image with the model (greedy decoding; the checkpoint's own caption prompt "
            "unless --prompt) or read --predictions ([{image_id, caption}]), and score with pycocoevalcap."
        ),
        epilog=_EPILOG_CAPTION, formatter_class=fmt,
    )
    _common(c, "caption")
    c.add_argument("--prompt", default=None, help="caption prompt (default: the one stored with the checkpoint)")
    c.add_argument("--tokenizer", choices=("auto", "ptb", "python"), default="auto",
                   help="auto: Java PTBTokenizer when Java is installed, else the pure-Python approximation; "
                        "ptb: Java's (an error without Java)")
    c.add_argument("--skip-metrics", default="", metavar="LIST",
                   help="metrics not to compute: METEOR, SPICE or METEOR,SPICE (saves the Java start-ups; "
                        "the other metrics are always computed)")
    c.set_defaults(run=run, eval_task="caption")
    v = sub.add_parser(
        "vqa", help="visual question answering: VQA accuracy, GQA exact match (as LLaVA), POPE",
        description=(
            "Answer every question with the model (greedy decoding; prompt = question, a newline and "
            "--prompt-suffix; the checkpoint's chat template is applied by mmlm.describe) or read "
            "--predictions, and score with the benchmark's official rule."
        ),
        epilog=_EPILOG_VQA, formatter_class=fmt,
    )
    _common(v, "vqa")
    v.add_argument("--prompt-suffix", default=None, metavar="TEXT",
                   help="appended to each question on a new line (\"\" for none; default: the suffix the "
                        "checkpoint's VQA training appended, data.vqa_suffix, recorded in its processor_config.json; "
                        f'for a checkpoint that records none, LLaVA\'s "{DEFAULT_VQA_SUFFIX}")')
    v.set_defaults(run=run, eval_task="vqa")
    return p


def _help_run(parser: argparse.ArgumentParser):
    def show(args) -> int:
        parser.print_help(sys.stderr)
        print("error: choose a task: mmlm eval caption ... or mmlm eval vqa ...", file=sys.stderr)
        return 2

    return show


# --------------------------------------------------------------------------- run


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(ci: Any, digits: int = 4) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return ""


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _print_results(report: dict[str, Any], out: Path) -> None:
    from mmlm.evaluation.caption_metrics import CAPTION_METRICS

    ci = report.get("ci95") or {}
    head = (f"{report['benchmark']} ({report['task']}): {report['num_items']} items, "
            f"{report.get('num_scored', 0)} scored, {report.get('num_skipped', 0)} skipped")
    print(head)
    rows: list[tuple[str, ...]] = [("metric", "value", "95% CI")]
    if report["scoring"] == "caption":
        for m in CAPTION_METRICS:
            if m in report:
                rows.append((m, _fmt(report[m]), _ci(ci.get(m))))
    elif report["scoring"] == "pope":
        for m in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            if m in report:
                rows.append((m, _fmt(report[m]), _ci(ci.get(m))))
    elif "overall" in report:
        rows.append(("overall", _fmt(report["overall"], 2), _ci(ci.get("overall"), 2)))
        for group in ("perAnswerType",):
            for k, v in (report.get(group) or {}).items():
                rows.append((f"  {k}", _fmt(v, 2), _ci((ci.get(group) or {}).get(k), 2)))
        if report.get("perQuestionType"):
            rows.append(("perQuestionType", f"{len(report['perQuestionType'])} types", "(metrics.json)"))
    if len(rows) > 1:
        print(_table(rows))
    for name, reason in (report.get("skipped_metrics") or {}).items():
        print(f"note: {name} not computed: {reason}", file=sys.stderr)
    for n in report.get("notices") or []:
        print(f"note: {n}", file=sys.stderr)
    comp = report.get("comparison")
    if comp:
        print(f"paired bootstrap vs {comp['against']} ({comp['common_items']} common items, {comp['resamples']} resamples)")
        crow: list[tuple[str, ...]] = [("metric", "this", "other", "delta", "95% CI of delta", "p")]
        for k, v in comp["metrics"].items():
            crow.append((k, _fmt(v["a"]), _fmt(v["b"]), f"{v['delta']:+.4f}", _ci(v.get("ci")), f"{v['p_value']:.4f}"))
        print(_table(crow))
    print(f"wrote {out / 'metrics.json'}")


def _numerics(args):
    """``(torch.device, torch.dtype)`` the model will run with, or a one-line error: ``--device`` is
    checked as ``mmlm describe`` checks it (CUDA asked for but absent), ``--dtype`` by name."""
    from mmlm.api import resolve_device, resolve_dtype
    from mmlm.cli.describe import check_model_args
    from mmlm.evaluation.benchmarks import BenchmarkError

    try:
        check_model_args(args)
    except (ValueError, OSError) as e:
        raise BenchmarkError(str(e)) from None
    device = resolve_device(args.device)
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as e:
        raise BenchmarkError(f"--dtype: {e}") from None
    return device, dtype


def recorded_vqa_suffix(model_dir: Path | None) -> str:
    """The suffix a checkpoint's VQA training appended to questions (``vqa_suffix`` in its
    processor_config.json), or LLaVA's short-answer instruction when it records none."""
    from mmlm.processing import DEFAULT_VQA_SUFFIX, PROCESSOR_CONFIG

    try:
        recorded = json.loads((Path(model_dir) / PROCESSOR_CONFIG).read_text()).get("vqa_suffix")
    except (TypeError, OSError, ValueError, AttributeError):  # no model, or a file the model load will refuse
        recorded = None
    return DEFAULT_VQA_SUFFIX if not isinstance(recorded, str) else recorded


def _fingerprint(args, model_dir: Path, device, dtype) -> dict[str, Any]:
    from mmlm.checkpoint import model_fingerprint

    return {
        **model_fingerprint(model_dir),
        "device": device.type,  # resolved: "auto" on a GPU machine and on a CPU one are different runs
        "dtype": str(dtype).removeprefix("torch."),
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "prompt": getattr(args, "prompt", None),
        "prompt_suffix": getattr(args, "prompt_suffix", None),
    }


def run(args) -> int:
    """Run ``mmlm eval caption|vqa`` from parsed ``args``; returns the exit code."""
    from mmlm.evaluation import runner
    from mmlm.evaluation.benchmarks import BenchmarkError, load_benchmark
    from mmlm.generation import GenerationConfig

    task = args.eval_task
    if args.max_new_tokens is None:
        args.max_new_tokens = 48 if task == "caption" else 16
    shards = args.shards
    if args.benchmark == "shards" and shards is None:
        shards = args.annotations
    skip: tuple[str, ...] = ()
    try:
        if task == "caption":  # before any model runs: the scorers are needed at the end
            from mmlm.evaluation.caption_metrics import check_skip_metrics, require_pycocoevalcap, resolve_tokenizer

            try:
                require_pycocoevalcap()
            except ImportError as e:
                raise BenchmarkError(str(e)) from None
            try:
                skip = check_skip_metrics(args.skip_metrics or "")
            except ValueError as e:
                raise BenchmarkError(f"--skip-metrics: {e}") from None
            try:
                resolve_tokenizer(args.tokenizer)  # --tokenizer ptb without Java
            except (RuntimeError, ValueError) as e:
                raise BenchmarkError(str(e)) from None
        if args.model is not None:
            model_dir = Path(args.model)
            from mmlm.checkpoint import check_model_dir

            try:
                check_model_dir(model_dir)
            except FileNotFoundError as e:
                raise BenchmarkError(f"--model: {e}") from None
            device, dtype = _numerics(args)
        if task == "vqa" and args.prompt_suffix is None:
            args.prompt_suffix = recorded_vqa_suffix(model_dir if args.model is not None else None)
        bench = load_benchmark(
            task, args.benchmark, annotations=args.annotations, questions=getattr(args, "questions", None),
            images=args.images, shards=shards, split=getattr(args, "split", None), limit=args.limit, caption_prompt=getattr(args, "prompt", None),
            prompt_suffix=getattr(args, "prompt_suffix", None),
        )
        predict_fn = None
        fingerprint = None
        provenance: dict[str, Any] = {}
        if args.benchmark in ("coco-karpathy", "flickr30k"):
            provenance["split"] = getattr(args, "split", None) or "test"
        if args.model is not None:
            if args.images is None and args.benchmark != "shards":
                raise BenchmarkError(f"--images DIR is needed to run a model on {args.benchmark}")
            fingerprint = _fingerprint(args, model_dir, device, dtype)
            provenance["model"] = fingerprint["model"]
            provenance["device"] = str(device)
            provenance["dtype"] = fingerprint["dtype"]
            try:  # the decoding options' own checks (e.g. --compile with --num-beams), before any work
                GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, compile=args.compile)
            except ValueError as e:
                raise BenchmarkError(str(e)) from None
            provenance["generation"] = {"do_sample": False, "num_beams": args.num_beams,
                                        "max_new_tokens": args.max_new_tokens, "compile": args.compile}
            if task == "vqa":
                provenance["prompt_suffix"] = args.prompt_suffix
            runner.check_run(bench, model=True, compare=args.compare)  # before the (slow) model load
            predict_fn = runner.model_predict_fn(
                model_dir, device=device, dtype=dtype, max_new_tokens=args.max_new_tokens,
                num_beams=args.num_beams, compile=args.compile,
            )
        report = runner.evaluate(
            bench, predict_fn, args.out, predictions_path=args.predictions, batch_size=args.batch_size,
            n_resamples=args.bootstrap, seed=args.seed, compare=args.compare, resume=not args.no_resume,
            fingerprint=fingerprint, tokenizer=getattr(args, "tokenizer", "auto"), skip_metrics=skip,
            allow_missing=args.allow_missing, progress=not args.no_progress, provenance=provenance,
        )
    except (BenchmarkError, runner.EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_results(report, Path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m mmlm.cli.eval caption ...``)."""
    parser = argparse.ArgumentParser(prog="mmlm")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
