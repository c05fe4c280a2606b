"""Training throughput: mmlm's Lightning training step vs a plain PyTorch loop, side by side.

Three ways to train the same model (one ``VLMModule`` built once; every run starts from the same
initial weights) with the same optimizer maths (mmlm's AdamW groups + warmup/cosine schedule; the
baseline steps it with torch's default foreach implementation, the other two with the fused kernel
that ``mmlm.training.optim.build_optimizer`` picks on CPU and CUDA), gradient
clipping (1.0), precision and number of loader workers, on variable-length samples from the synthetic
shards (sample mode ``mixed``: a caption or a 3-5 turn VQA conversation per image; ``--data
lognormal``: long-tailed caption lengths, as in ``padding.py``):

``plain_pad`` (the baseline)
    A plain loop as one writes it by hand: a minimal tar reader (``iter_tar_records``) -> decode ->
    ``processor.encode`` (float pixel values, normalised in the workers) in a ``DataLoader``
    (``--batch-size`` samples, pad to the longest), eager model, ``loss.backward(); clip;
    opt.step(); sched.step()``.
``plain_packed`` (equally optimised plain loop)
    The same plain loop fed by mmlm's packed stream (``VLMDataModule(packing=True)``; uint8 pixel
    values, which the model normalises on its device to the same floats), so that
    ``mmlm / plain_packed`` is the cost of Lightning and mmlm's per-step bookkeeping.
``mmlm``
    ``lightning.Trainer.fit(VLMModule, VLMDataModule(packing=True))`` as ``mmlm fit`` runs it: CSV
    logger, ``TrainingMonitor``, ``record_consumed``, non-finite guard (no progress bar, no
    checkpoint: neither fires in a short run).

Packed batches hold ``--pack-rows`` rows of ``--pack-length`` tokens; by default the rows are
chosen so that a packed batch holds about as many samples as a padded one (the mean sample length
is measured first), so the two train on the same number of samples per optimizer step.

Throughput is steady state: samples (and real tokens) of the ``--steps`` steps after ``--warmup``
untimed ones, over the wall time from the end of the last warm-up step to the end of the last step
(data loading included).
Modes run one after another in this process (``--repeats`` rounds, median reported).

Peak memory (``--memory``, default on) runs each mode again in its own subprocess (so one mode's
freed-but-cached allocations cannot hide another's): on CPU the peak resident set size of the
training process over ``--memory-steps`` steps (``VmHWM`` from ``/proc/self/status``, reset through
``/proc/self/clear_refs`` after the warm-up steps) minus its resident size then, i.e. what a step
adds on top of model, optimizer state and library initialisation: activations, gradients, logits,
batches. The subprocess runs with glibc told to mmap every allocation above 64 KiB and return
freed memory at once (``MALLOC_MMAP_THRESHOLD_`` & co.), so its resident set follows live tensor
memory rather than what the allocator keeps cached. DataLoader worker processes are not counted.
On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the same point.
(``tracemalloc`` does not see torch's allocations, so it is not used.)

Targets (issue 8): mmlm >= 1.5x plain_pad samples/s on variable-length data; mmlm peak memory
<= 0.8x plain_pad's; Lightning overhead (1 - mmlm / plain_packed) <= 3%.

Usage::

    python benchmarks/train_throughput.py                          # tiny preset, CPU, ~1 minute
    python benchmarks/train_throughput.py --steps 50 --repeats 3 --batch-size 32
    python benchmarks/train_throughput.py --preset small --device cuda --batch-size 16 --max-length 512
    python benchmarks/train_throughput.py --no-memory --modes plain_packed mmlm   # overhead only
    python benchmarks/train_throughput.py --data lognormal                         # long-tailed lengths
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

MODES = ("plain_pad", "plain_packed", "mmlm")
TARGET_SPEEDUP = 1.5
TARGET_MEMORY = 0.8
TARGET_OVERHEAD = 0.03


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

    def fresh_model(self):
        self.vlm.load_state_dict(self.init_state)
        self.vlm.to(self.device)
        self.vlm.train()
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


def summarize(times: list[float], samples: list[int], real: list[int], total: list[int], warmup: int) -> dict:
    """Steady state over the steps after the first ``warmup`` (>= 1): the clock runs from the end
    of the last warm-up step to the end of the last step."""
    if warmup < 1 or len(times) <= warmup:
        raise RuntimeError(f"{len(times)} steps recorded with warmup={warmup}: need warmup >= 1 and more steps")
    dt = times[-1] - times[warmup - 1]
    s, r, t = sum(samples[warmup:]), sum(real[warmup:]), sum(total[warmup:])
    steps = len(times) - warmup
    return {"steps_timed": steps, "seconds": dt, "samples": s, "real_tokens": r, "batch_tokens": t,
            "samples_per_s": s / dt, "real_tokens_per_s": r / dt, "batch_tokens_per_s": t / dt,
            "step_ms": 1000 * dt / steps, "samples_per_step": s / steps, "real_fraction": r / t}


def run_plain(setup: Setup, packed: bool, steps: int, on_step=None) -> dict:
    import torch

    from mmlm.training.module import VLMModule

    model_inputs = VLMModule.model_inputs  # batch.get: a padded batch has no position_ids

    a, device = setup.args, setup.device
    vlm = setup.fresh_model()
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
    times, samples, real, total = [], [], [], []
    it = iter(loader)
    for i in range(steps):
        batch = next(it)
        b = _to(batch, device)
        if amp is not None:
            with amp:
                loss = vlm(**model_inputs(b)).loss
        else:
            loss = vlm(**model_inputs(b)).loss
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
    return summarize(times, samples, real, total, a.warmup)


def run_mmlm(setup: Setup, steps: int, on_step=None) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from mmlm.training.callbacks import TrainingMonitor

    a, device = setup.args, setup.device
    setup.fresh_model()
    module = setup.module
    dm = setup.datamodule(packing=True)

    class StepClock(pl.Callback):
        def __init__(self):
            self.times, self.samples, self.real, self.total = [], [], [], []

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
    return summarize(clock.times, clock.samples, clock.real, clock.total, a.warmup)


def run_mode(setup: Setup, mode: str, steps: int, on_step=None) -> dict:
    """Train ``steps`` steps in ``mode``; ``on_step(i)`` after step i (0-based)."""
    if mode == "mmlm":
        return run_mmlm(setup, steps, on_step)
    return run_plain(setup, packed=(mode == "plain_packed"), steps=steps, on_step=on_step)


# ---------------------------------------------------------------------------------- memory (subprocess)
def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


# glibc: give every allocation above 64 KiB its own mmap and return freed memory at once, so that the
# resident set follows live (tensor) memory instead of what the allocator keeps cached
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_TOP_PAD_": "0",
              "MALLOC_ARENA_MAX": "2"}


def memory_child(args) -> int:
    """Run one mode and print its peak memory as one JSON line (``MEMORY {...}``).

    The baseline is taken after the warm-up steps (library first-call initialisation, optimizer
    state and the first batches are then in place), the peak over the following steps."""
    import resource

    import torch

    setup = Setup(args)
    mark: dict = {}

    def on_step(i: int) -> None:
        if i != args.warmup - 1:
            return
        gc.collect()
        if setup.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            mark["base"] = torch.cuda.memory_allocated()
            mark["method"] = "torch.cuda.max_memory_allocated over the timed steps - allocated after warm-up"
            return
        mark["base"] = (_status_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            mark["method"] = ("peak VmHWM over the timed steps - VmRSS after warm-up, main process, glibc "
                              "allocations > 64 KiB mmapped and freed at once (" +
                              " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + ")")
        except OSError:
            mark["method"] = "ru_maxrss - VmRSS after warm-up, main process (the peak may predate the steps)"

    stats = run_mode(setup, args.child, args.memory_steps + args.warmup, on_step)
    if setup.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    elif "VmHWM" in mark["method"]:
        peak = (_status_kb("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("MEMORY " + json.dumps({"mode": args.child, "peak_bytes": peak, "base_bytes": mark["base"],
                                  "delta_bytes": peak - mark["base"], "method": mark["method"],
                                  "steps": args.memory_steps, "samples_per_s": stats["samples_per_s"]}))
    return 0


def measure_memory(args, mode: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--no-save"] + args.passthrough
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.memory_timeout,
                          env={**os.environ, **MALLOC_ENV})
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    raise RuntimeError(f"memory run of {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------- main
def quiet_lightning() -> None:
    """No Lightning banners or tips between the benchmark's lines."""
    import logging
    import warnings

    importlib.import_module("lightning.pytorch")  # it sets its loggers' levels on import: import it first

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def make_parser() -> argparse.ArgumentParser:
    p = C.script_parser(__doc__)
    p.add_argument("--preset", default="tiny", help="model preset, random weights (default tiny)")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per mode (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per padded batch (default 16)")
    p.add_argument("--max-length", type=int, default=256, help="longest sample in tokens (default 256)")
    p.add_argument("--pack-length", type=int, default=None, help="packed row length (default --max-length)")
    p.add_argument("--pack-rows", type=int, default=None,
                   help="packed rows per batch (default: as many as hold ~--batch-size samples)")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of every mode (default 1)")
    p.add_argument("--precision", default=None, help="32-true (CPU default) or bf16-mixed (CUDA default)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the modes; medians are reported (default 1)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (default: shapes, caption or 3-5 turn VQA per image), lognormal (long-tailed "
                        "caption lengths, built once in the cache dir) or a shard directory")
    p.add_argument("--sample-mode", default=None,
                   help="what a record trains (VLMDataModule.sample_mode; default mixed for synthetic, else auto)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes to run (default all)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure peak memory, each mode in a subprocess (default on)")
    p.add_argument("--memory-steps", type=int, default=5, help="steps after warm-up in the memory runs (default 5)")
    p.add_argument("--memory-timeout", type=int, default=300, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    C.add_common_args(p)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("error: --warmup and --steps must be >= 1")
    # what a memory subprocess gets: every option but the ones that drive this process
    args.passthrough = [a for a in argv if a not in ("--memory", "--no-memory", "--no-save")]
    C.set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning()
    if args.child:
        return memory_child(args)

    t_start = time.perf_counter()
    setup = Setup(args)
    info = C.system_info(setup.device)
    info["load_at_start"] = C.machine_load()
    print(f"{args.preset} preset, {setup.vlm.num_parameters() / 1e6:.1f}M parameters, device {info['device']}, "
          f"{args.precision}, batch {args.batch_size} samples padded | {setup.pack_rows} rows x {setup.pack_length} "
          f"tokens packed (mean sample {setup.mean_length or float('nan'):.0f} tokens), {args.num_workers} loader "
          f"worker(s), {args.threads or 'default'} thread(s); {args.steps} timed steps after {args.warmup} warm-up",
          flush=True)

    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for r in range(args.repeats):
        for mode in args.modes:
            stats = run_mode(setup, mode, args.warmup + args.steps)
            runs[mode].append(stats)
            print(f"  round {r + 1} {mode:<12} {stats['samples_per_s']:8.1f} samples/s  "
                  f"{stats['step_ms']:7.0f} ms/step  load {os.getloadavg()[0]:.2f}", flush=True)

    def med(mode, key):
        vals = [s[key] for s in runs.get(mode, [])]
        return statistics.median(vals) if vals else None

    memory: dict[str, dict] = {}
    if args.memory:
        for mode in args.modes:
            memory[mode] = measure_memory(args, mode)
            print(f"  memory {mode:<12} +{memory[mode]['delta_bytes'] / 2**20:8.1f} MiB", flush=True)
    info["load_at_end"] = C.machine_load()

    rows = []
    base = med("plain_pad", "samples_per_s")
    for mode in args.modes:
        mem = memory.get(mode, {}).get("delta_bytes")
        rows.append({"mode": mode, "samples/s": med(mode, "samples_per_s"),
                     "real tok/s": med(mode, "real_tokens_per_s"), "ms/step": med(mode, "step_ms"),
                     "samples/step": med(mode, "samples_per_step"), "real frac": med(mode, "real_fraction"),
                     "peak mem MiB": mem / 2**20 if mem is not None else None,
                     "vs plain_pad": med(mode, "samples_per_s") / base if base else None})
    C.print_table(rows, ["mode", "samples/s", "real tok/s", "ms/step", "samples/step", "real frac", "peak mem MiB",
                         "vs plain_pad"], title="training throughput (steady state, medians over rounds)")

    ratios, checks = {}, []
    if base and "mmlm" in runs:
        ratios["mmlm_over_plain_pad_samples_per_s"] = med("mmlm", "samples_per_s") / base
        checks.append(("mmlm / plain_pad samples/s", ratios["mmlm_over_plain_pad_samples_per_s"], TARGET_SPEEDUP, "min"))
        ratios["mmlm_over_plain_pad_real_tokens_per_s"] = med("mmlm", "real_tokens_per_s") / med("plain_pad",
                                                                                                   "real_tokens_per_s")
    if "plain_packed" in runs and "mmlm" in runs:
        ratios["lightning_overhead"] = 1 - med("mmlm", "samples_per_s") / med("plain_packed", "samples_per_s")
        # per step: the sample counts of packed batches differ between runs only by stream position
        ratios["lightning_overhead_step_time"] = med("mmlm", "step_ms") / med("plain_packed", "step_ms") - 1
        checks.append(("Lightning overhead (1 - mmlm/plain_packed)", ratios["lightning_overhead"], TARGET_OVERHEAD, "max"))
    if base and "plain_packed" in runs:
        ratios["plain_packed_over_plain_pad_samples_per_s"] = med("plain_packed", "samples_per_s") / base
    if "mmlm" in memory and "plain_pad" in memory and memory["plain_pad"]["delta_bytes"] > 0:
        ratios["mmlm_over_plain_pad_peak_memory"] = memory["mmlm"]["delta_bytes"] / memory["plain_pad"]["delta_bytes"]
        checks.append(("mmlm / plain_pad peak memory", ratios["mmlm_over_plain_pad_peak_memory"], TARGET_MEMORY, "max"))
    C.print_table([{"check": n, "measured": v, "target": ("<= " if d == "max" else ">= ") + str(t),
                    "verdict": C.verdict(v, t, d)} for n, v, t, d in checks],
                  ["check", "measured", "target", "verdict"], title="targets")
    payload = {
        "config": {"preset": args.preset, "parameters": setup.vlm.num_parameters(), "steps": args.steps,
                   "warmup": args.warmup, "batch_size": args.batch_size, "max_length": args.max_length,
                   "pack_length": setup.pack_length, "pack_rows": setup.pack_rows,
                   "mean_sample_length": setup.mean_length, "num_workers": args.num_workers,
                   "precision": args.precision, "repeats": args.repeats, "threads": args.threads,
                   "sample_mode": args.sample_mode, "data": args.data, "shards": str(setup.shards)},
        "targets": {"mmlm_over_plain_pad_samples_per_s_min": TARGET_SPEEDUP,
                    "mmlm_over_plain_pad_peak_memory_max": TARGET_MEMORY, "lightning_overhead_max": TARGET_OVERHEAD},
        "ratios": ratios,
        "met": {n: C.verdict(v, t, d) == "met" for n, v, t, d in checks},
        "runs": runs,
        "memory": memory,
        "memory_method": next(iter(memory.values()))["method"] if memory else None,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    if not args.no_save:
        name = "train_throughput" if args.data == "synthetic" else f"train_throughput-{Path(args.data).name}"
        C.write_result(name, payload, info, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
