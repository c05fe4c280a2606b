"""``mmlm quickstart``: the main job on the embedded default (synthetic data, tiny preset)."""

from __future__ import annotations

import argparse
import sys


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)", except for options whose default is None/False (their help says it)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def add_parser(sub) -> None:
    from mmlm.quickstart import RECIPES, stage_summary  # light: the training stack loads only when the command runs

    p = sub.add_parser(
        "quickstart",
        help="build the synthetic dataset, train the tiny preset, evaluate and describe test images",
        description=(
            "The main job on the embedded default: build the synthetic shapes dataset (WORKDIR/data), train "
            f"the `tiny` preset from scratch in {len(RECIPES)} stages, each from the previous stage's model: "
            f"{stage_summary()}; a stage's run directory is WORKDIR/<recipe name>, the last one's "
            "WORKDIR. It trains on the GPU when there is one, else the CPU (about 9 minutes on 2 CPU cores; "
            "11-12 on a slower pair), "
            "then evaluates the model on the "
            "synthetic test split (VQA accuracy with the official VQA rule, caption exact match, "
            "CIDEr/BLEU/METEOR/ROUGE-L), describes four test images next to their ground truth, and prints a "
            "results table. Leaves WORKDIR/model (load it with mmlm.load, `mmlm describe --model`, "
            "`mmlm eval --model`) and WORKDIR/results.json. Running it again on the same WORKDIR with the same "
            "options reuses the data and resumes (or skips) the training; other options (--recipes, --max-steps, "
            "--seed, image counts) on a used WORKDIR are refused, since its stages would resume from models "
            "trained with the old ones."
        ),
        epilog="example:  mmlm quickstart --workdir mmlm-quickstart && "
               "mmlm describe mmlm-quickstart/data/test/images/0.png --model mmlm-quickstart/model",
        formatter_class=_DefaultsShown,
    )
    p.add_argument("--workdir", default="mmlm-quickstart", help="where data, logs, checkpoints, the model and results go")
    p.add_argument("--recipes", nargs="+", default=None, metavar="RECIPE",
                   help="the stage recipes in order (mmlm fit configs with distinct file names); each stage after "
                        "the first starts from the previous one's model (its model.init_from is set) "
                        f"(default: {' '.join('configs/' + r for r in RECIPES)} of this checkout)")
    p.add_argument("--train-images", type=int, default=20000, help="synthetic training images")
    p.add_argument("--test-images", type=int, default=500, help="synthetic test images (6 questions each)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="override the training steps of each stage (a quick look)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of every stage (model init, data order; --seed_everything of each mmlm fit) instead "
                        "of the recipes' own (0): how much the scores vary from run to run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while building the data")
    p.set_defaults(run=run)


def run(args) -> int:
    from mmlm.quickstart import TrainingFailed, format_results, run_quickstart

    for name in ("train_images", "test_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError("--max-steps must be >= 1")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")  # Lightning would pick a random one
    fit_args = ["--trainer.max_steps", str(args.max_steps)] if args.max_steps else []
    try:
        results = run_quickstart(args.workdir, recipes=args.recipes,
                                 train_images=args.train_images, test_images=args.test_images, fit_args=fit_args,
                                 progress=not args.no_progress, seed=args.seed)
    except TrainingFailed as e:
        print(("" if e.exit_code >= 128 else "error: ") + str(e), file=sys.stderr)
        return e.exit_code
    print(format_results(results))
    print(f"\nmodel: {results['model']}    results: {args.workdir}/results.json")
    return 0
