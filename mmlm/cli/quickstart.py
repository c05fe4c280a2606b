"""``mmlm quickstart``: the main job on the embedded default (synthetic data, tiny preset)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="build the synthetic dataset, train the tiny preset, evaluate and describe test images",
        description=(
            "The main job on the embedded default: build the synthetic shapes dataset (WORKDIR/data), train "
            "the `tiny` preset from scratch in two stages, captions (configs/tiny-cpu.yaml, run directory "
            "WORKDIR/captions) then questions and captions (configs/tiny-cpu-vqa.yaml, run directory WORKDIR), "
            "on the GPU when there is one, else the CPU (about 9 minutes on 2 CPU cores), evaluate it on the "
            "synthetic test split (VQA accuracy with the official VQA rule, caption exact match, "
            "CIDEr/BLEU/METEOR/ROUGE-L), describe four test images next to their ground truth, and print a "
            "results table. Leaves WORKDIR/model (load it with mmlm.load, `mmlm describe --model`, "
            "`mmlm eval --model`) and WORKDIR/results.json. Running it again on the same WORKDIR reuses the "
            "data and resumes (or skips) the training."
        ),
        epilog="example:  mmlm quickstart --workdir mmlm-quickstart && "
               "mmlm describe mmlm-quickstart/data/test/images/0.png --model mmlm-quickstart/model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workdir", default="mmlm-quickstart", help="where data, logs, checkpoints, the model and results go")
    p.add_argument("--config", default=None,
                   help="stage-1 recipe, captions (default: configs/tiny-cpu.yaml of this checkout)")
    p.add_argument("--vqa-config", default=None,
                   help="stage-2 recipe, questions; its model.init_from is set to stage 1's model "
                        "(default: configs/tiny-cpu-vqa.yaml of this checkout)")
    p.add_argument("--train-images", type=int, default=20000, help="synthetic training images")
    p.add_argument("--test-images", type=int, default=500, help="synthetic test images (6 questions each)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="override the training steps of each stage (a quick look)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while building the data")
    p.set_defaults(run=run)


def run(args) -> int:
    from mmlm.quickstart import format_results, run_quickstart

    for name in ("train_images", "test_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    fit_args = ["--trainer.max_steps", str(args.max_steps)] if args.max_steps else []
    results = run_quickstart(args.workdir, config=args.config, vqa_config=args.vqa_config,
                             train_images=args.train_images, test_images=args.test_images, fit_args=fit_args,
                             progress=not args.no_progress)
    print(format_results(results))
    print(f"\nmodel: {results['model']}    results: {args.workdir}/results.json")
    return 0
