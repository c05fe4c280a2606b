"""Set-up and training loops of ``train_throughput.py`` (benchmark internals, not a public API).

Contract: :class:`Setup` builds the model once from the script's parsed ``args`` (and fills in
``args.sample_mode`` and ``args.precision`` when they are None); :func:`run_mode` trains one mode
(``plain_pad``, ``plain_packed`` or ``mmlm``) for ``steps`` optimizer steps from the same initial
weights, calls ``on_step(i)`` after step i (0-based) when given, and returns :func:`summarize`'s
steady-state figures over the steps after ``args.warmup`` (samples/s, real tokens/s, ms/step, ...).
:func:`plain_loader` is the hand-written baseline's data path (tar reader -> decode ->
``processor.encode`` -> pad to longest). The method is described in ``train_throughput.py``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import tempfile
import time
from pathlib import Path

import _common as C


# ---------------------------------------------------------------------------------- set-up
def data_shards(args) -> Path:
    if args.sample_mode is None:
        args.sample_mode = "mixed" if args.data == "synthetic" else "auto"
    if args.data == "synthetic":
        return C.synthetic_dataset(args.cache_dir)
    if args.data == "lognormal":
        from padding import write_lognormal_shards

        out = Path(args.cache_dir) / "lognormal-2000-m12-s0.9"
        if not (out / "done.json").exists():
            write_lognormal_shards(out, count=2000, median_words=12.0, sigma=0.9, shards=8)
            (out / "done.json").write_text("{}")
        return out
    path = Path(args.data)
    if not path.is_dir() or not C.shard_paths(path):
        raise SystemExit(f"error: --data {args.data}: not synthetic, lognormal or a directory of .tar shards")
    return path


class Setup:
    """The model (built once), its processor, the data and the run options."""

    def __init__(self, args):
        import torch

        from mmlm.training.module import VLMModule

        self.args = args
        self.device = C.resolve_device(args.device)
        self.shards = data_shards(args)
        syn = self.shards if args.data == "synthetic" else C.synthetic_dataset(args.cache_dir)
        torch.manual_seed(0)
        self.module = VLMModule(preset=args.preset, model_overrides=C.offline_overrides(args.preset),
                                max_length=args.max_length, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98),
                                warmup=0.05, min_lr_ratio=0.1, tokenizer_max_records=5000)
        self.module.build(train_shards=[str(syn)])  # the tokenizer always learns the synthetic texts
        self.vlm = self.module.vlm
        self.base_attn = self.vlm.lm.config._attn_implementation
        self.processor = self.module.processor
        self.init_state = copy.deepcopy(self.vlm.state_dict())
        self.total_steps = args.warmup + args.steps
        if args.precision is None:
            args.precision = "bf16-mixed" if self.device == "cuda" else "32-true"
        self.pack_length = args.pack_length or args.max_length
        self.mean_length = None
        self.pack_rows = args.pack_rows or self._matching_rows()

    def _matching_rows(self) -> int:
        """Packed rows per batch that hold about ``batch_size`` samples (mean sample length measured
        on a few padded batches of the same stream)."""
        dm = self.datamodule(packing=False, num_workers=0)
        it = iter(dm.train_dataloader())
        real = samples = 0
        for _ in range(8):
            b = next(it)
            real += b["real_tokens"]
            samples += b["num_samples"]
        del it, dm
        self.mean_length = real / samples
        return max(1, round(self.args.batch_size * self.mean_length / self.pack_length))

    def datamodule(self, *, packing: bool, num_workers: int | None = None):
        from mmlm.data import VLMDataModule

        a = self.args
        dm = VLMDataModule(train=str(self.shards), batch_size=self.pack_rows if packing else a.batch_size,
                           num_workers=a.num_workers if num_workers is None else num_workers, packing=packing,
                           max_length=self.pack_length if packing else a.max_length, seed=0, sample_mode=a.sample_mode)
        dm.attach_processor(self.processor)
        return dm

    def fresh_model(self, packed: bool = False):
        """The model at its initial weights; packed modes get ``--attn-implementation`` if given
        (the baseline keeps the preset's, SDPA)."""
        self.vlm.load_state_dict(self.init_state)
        self.vlm.to(self.device)
        self.vlm.train()
        if self.args.attn_implementation:
            self.vlm.lm.set_attn_implementation(self.args.attn_implementation if packed else self.base_attn)
        return self.vlm

    def optimizer(self, fused: bool | None = None):
        from mmlm.training.optim import build_optimizer, build_scheduler

        hp = self.module.hparams
        opt = build_optimizer(self.vlm, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas), eps=hp.eps,
                              fused=fused)
        return opt, build_scheduler(opt, self.total_steps, hp.warmup, hp.min_lr_ratio)


# ---------------------------------------------------------------------------------- the plain loader
def plain_loader(setup: Setup):
    """What a hand-written loop uses: a torch IterableDataset over the tar shards, pad to longest."""
    import dataclasses

    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    from mmlm.data.decode import decode_image
    from mmlm.data.schema import iter_tar_records
    from mmlm.data.stream import record_to_conversation

    proc = copy.copy(setup.processor)
    proc.config = dataclasses.replace(proc.config, max_length=setup.args.max_length, on_overflow="drop")
    shards = C.shard_paths(setup.shards)

    class Shards(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
            rng = random.Random(1000 + wid)
            mine = shards[wid::n] or shards
            while True:
                order = list(mine)
                rng.shuffle(order)
                for url in order:
                    for rec in iter_tar_records(url, check=False):
                        conv = record_to_conversation(rec, setup.args.sample_mode, rng, caption_conversation=proc.caption_conversation)
                        enc = proc.encode(conv, [decode_image(b) for b in rec.images])
                        if enc is not None:
                            yield enc

    def collate(samples):
        out = proc.pad(samples, padding_side="right")
        out["num_samples"] = len(samples)
        out["real_tokens"] = int(out["attention_mask"].sum())
        out["total_tokens"] = int(out["input_ids"].numel())
        return out

    kw = {"num_workers": setup.args.num_workers}
    if setup.args.num_workers:
        kw["prefetch_factor"] = 2
        kw["persistent_workers"] = True
    return DataLoader(Shards(), batch_size=setup.args.batch_size, collate_fn=collate,
                      pin_memory=setup.device == "cuda", **kw), proc


# ---------------------------------------------------------------------------------- runs
def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _to(batch: dict, device: str) -> dict:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def summarize(times: list[float], samples: list[int], real: list[int], total: list[int], warmup: int,
              waits: list[float] | None = None) -> dict:
    """Steady state over the steps after the first ``warmup`` (>= 1): the clock runs from the end
    of the last warm-up step to the end of the last step. ``waits``: seconds each step waited for
    its batch (the loader not keeping up; ``data_wait_ms`` per timed step)."""
    if warmup < 1 or len(times) <= warmup:
        raise RuntimeError(f"{len(times)} steps recorded with warmup={warmup}: need warmup >= 1 and more steps")
    dt = times[-1] - times[warmup - 1]
    s, r, t = sum(samples[warmup:]), sum(real[warmup:]), sum(total[warmup:])
    steps = len(times) - warmup
    return {"steps_timed": steps, "seconds": dt, "samples": s, "real_tokens": r, "batch_tokens": t,
            "samples_per_s": s / dt, "real_tokens_per_s": r / dt, "batch_tokens_per_s": t / dt,
            "step_ms": 1000 * dt / steps, "samples_per_step": s / steps, "real_fraction": r / t,
            "data_wait_ms": 1000 * sum(waits[warmup:]) / steps if waits else None}


def run_plain(setup: Setup, packed: bool, steps: int, on_step=None) -> dict:
    import torch

    from mmlm.training.module import VLMModule

    model_inputs = VLMModule.model_inputs  # batch.get: a padded batch has no position_ids

    a, device = setup.args, setup.device
    vlm = setup.fresh_model(packed=packed)
    # the hand-written baseline steps torch's default AdamW (foreach); the equally optimised loop
    # uses mmlm's choice (the fused kernel on CPU and CUDA), so mmlm / plain_packed stays Lightning's cost
    opt, sched = setup.optimizer(fused=None if packed else False)
    if packed:
        dm = setup.datamodule(packing=True)
        loader = dm.train_dataloader()
    else:
        loader, _ = plain_loader(setup)
    params = [p for p in vlm.parameters() if p.requires_grad]
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16) if a.precision.startswith("bf16") else None
    times, samples, real, total, waits = [], [], [], [], []
    it = iter(loader)
    for i in range(steps):
        w0 = time.perf_counter()
        batch = next(it)
        waits.append(time.perf_counter() - w0)
        b = _to(batch, device)
        # the equally optimised loop makes VLMModule's call (no full logits: the output layer runs on the
        # labelled positions only); the hand-written baseline computes the logits as one writes it by hand
        with amp if amp is not None else contextlib.nullcontext():
            loss = vlm(**model_inputs(b), return_logits=not packed).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss.detach().item()  # log the loss (a sync, as a real loop's logging does)
        _sync(device)
        times.append(time.perf_counter())
        samples.append(int(batch["num_samples"]))
        real.append(int(batch["real_tokens"]))
        total.append(int(batch["total_tokens"]))
        del batch, b, loss
        if on_step:
            on_step(i)
    del it, loader
    gc.collect()
    return summarize(times, samples, real, total, a.warmup, waits)


def run_mmlm(setup: Setup, steps: int, on_step=None) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from mmlm.training.callbacks import TrainingMonitor

    a, device = setup.args, setup.device
    setup.fresh_model(packed=True)
    module = setup.module
    dm = setup.datamodule(packing=True)

    class StepClock(pl.Callback):
        def __init__(self):
            self.times, self.samples, self.real, self.total, self.waits = [], [], [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # from the last step's end: Lightning fetching this batch (and its hooks)
            self.waits.append(time.perf_counter() - self.times[-1] if self.times else 0.0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            self.times.append(time.perf_counter())
            self.samples.append(int(batch["num_samples"]))
            self.real.append(int(batch["real_tokens"]))
            self.total.append(int(batch["total_tokens"]))
            if on_step:
                on_step(len(self.times) - 1)

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="mmlm-bench-fit-") as root:
        trainer = pl.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=a.precision,
            max_steps=steps, gradient_clip_val=1.0, log_every_n_steps=10, check_val_every_n_epoch=None,
            val_check_interval=10 ** 9, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            logger=CSVLogger(root, name="logs"), callbacks=[TrainingMonitor(), clock], default_root_dir=root,
        )
        trainer.fit(module, datamodule=dm)
        del trainer
    gc.collect()
    return summarize(clock.times, clock.samples, clock.real, clock.total, a.warmup, clock.waits)


def run_mode(setup: Setup, mode: str, steps: int, on_step=None) -> dict:
    """Train ``steps`` steps in ``mode``; ``on_step(i)`` after step i (0-based)."""
    if mode == "mmlm":
        return run_mmlm(setup, steps, on_step)
    return run_plain(setup, packed=(mode == "plain_packed"), steps=steps, on_step=on_step)
