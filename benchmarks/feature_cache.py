"""Frozen-encoder feature cache: a question stage with and without ``model.cache_image_features``.

Two runs of the same ``lightning.Trainer.fit(VLMModule(stage="instruct"), VLMDataModule)`` from the
same weights, data order and seed, as ``mmlm fit`` trains the quickstart's question stages (batch 32,
``sample_mode: mixed``, two loader workers, CPU): ``encoder`` runs the frozen vision encoder on every
batch (the baseline); ``cache`` keeps its output per image (``mmlm.training.feature_cache``) and
runs it only on images it has not seen. Printed: steady-state seconds per step and samples/s of
each (the steps after ``--warmup``), the ratio, the cache's hit rate, and how far apart the two runs'
losses and final weights are (the cache returns the encoder's own outputs: 0 when the encoder's
kernels give an image the same result in any batch, rounding-sized otherwise: 0 over 300 steps and
2e-7 over 600 on a 2-core AMD EPYC).

The hit rate, hence the gain, depends on how often the stream revisits its images: ``--steps`` x 32
samples over ``--images`` images (the quickstart's question stages: 1000 steps over 20000 images).

Usage::

    python benchmarks/feature_cache.py                              # from-scratch tiny, 2000 images
    python benchmarks/feature_cache.py --model runs/qs/tiny-cpu-where/model --data runs/qs/data/train \\
        --steps 300                                                 # a quickstart stage's model and data
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402

from _common import (add_common_args, machine_load, nonneg_int, positive_int, print_table,  # noqa: E402
                     script_parser, set_threads, synthetic_dataset, system_info, write_result)


class StepTimer(pl.Callback):
    """Wall time at the end of each training step (batch fetch included) and its loss."""

    def __init__(self):
        self.ends: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())
        self.losses.append(float(outputs["loss"]))


def run(args, data: str, cache: int) -> dict:
    import torch

    from mmlm.data import VLMDataModule
    from mmlm.training.module import VLMModule

    pl.seed_everything(0, verbose=False)
    source = {"init_from": args.model} if args.model else {"preset": "tiny"}
    module = VLMModule(**source, stage="instruct", lr=1e-3, projector_lr=2e-4, warmup=20,
                       cache_image_features=cache)
    dm = VLMDataModule(train=data, batch_size=args.batch_size, num_workers=args.workers, seed=0,
                       sample_mode="mixed", mixed_weights={"caption": 1, "conversation": 7}, prompt_loss_fraction=0.3)
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=args.warmup + args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
                         default_root_dir=args.cache_dir / "feature-cache-runs", callbacks=[timer])
    trainer.fit(module, dm)
    span = timer.ends[-1] - timer.ends[args.warmup - 1]
    weights = {k: v.detach().clone() for k, v in module.vlm.state_dict().items()}
    fc = module.feature_cache
    return {"mode": "cache" if cache else "encoder", "s_per_step": span / args.steps,
            "samples_per_s": args.steps * args.batch_size / span,
            "hit_rate": fc.hit_rate() if fc is not None else None, "cached_images": len(fc) if fc is not None else None,
            "losses": timer.losses, "weights": weights, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = script_parser(__doc__)
    p.add_argument("--model", default=None, help="an mmlm checkpoint directory to start from (default: a "
                                                 "from-scratch tiny model)")
    p.add_argument("--data", default=None, help="training shards (default: the cached synthetic set of --images)")
    p.add_argument("--images", type=positive_int, default=2000,
                   help="synthetic training images when --data is not given")
    p.add_argument("--steps", type=positive_int, default=150, help="timed steps per run (default 150)")
    p.add_argument("--warmup", type=positive_int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per step (default 32)")
    p.add_argument("--workers", type=nonneg_int, default=2, help="loader workers (default 2, as the quickstart)")
    add_common_args(p, device=False, threads=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    set_threads(args.threads)
    data = args.data or str(synthetic_dataset(args.cache_dir, train=args.images))
    load_at_start = machine_load()
    runs = [run(args, data, 0), run(args, data, 1 << 20)]
    load_at_end = machine_load()
    base, ours = runs
    loss_diff = max(abs(a - b) for a, b in zip(base["losses"], ours["losses"]))
    weight_diff = max(float((base["weights"][k] - v).abs().max()) for k, v in ours["weights"].items())
    ratio = base["s_per_step"] / ours["s_per_step"]
    columns = ["mode", "s_per_step", "samples_per_s", "hit_rate", "cached_images"]
    rows = [{k: r[k] for k in columns} for r in runs]
    print_table(rows, columns,
                title=f"question stage, {args.steps} steps of {args.batch_size} (after {args.warmup} warm-up)")
    print(f"speed-up (cache / encoder): {ratio:.3f}x    max |loss difference|: {loss_diff:.3g}    "
          f"max |weight difference|: {weight_diff:.3g}")
    if not args.no_save:
        info = {**system_info("cpu"), "load_at_start": load_at_start, "load_at_end": load_at_end}
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows, "speedup": ratio,
                   "max_loss_difference": loss_diff, "max_weight_difference": weight_diff}
        write_result("feature_cache", payload, info, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
