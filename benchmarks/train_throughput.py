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
    values, which the model normalises on its device to the same floats) and making the model call
    ``VLMModule`` makes (``return_logits=False``: the output layer on labelled positions only), so that
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
(data loading included). ``data wait ms``: per timed step, the time spent waiting for the batch (the
plain loops: inside ``next(loader)``; mmlm: from one step's end to the next one's start, i.e.
Lightning's fetch and hooks), so a loader that cannot keep up shows there.
Modes run one after another in this process (``--repeats`` rounds, median reported); round r starts
at the r-th mode (plain_pad, plain_packed, mmlm; then plain_packed, mmlm, plain_pad; ...), so that
costs of the first run in a process that the warm-up steps do not cover land on every mode in turn
(with one round the baseline runs first).

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
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import _common as C
import _memory as M
import _train_loops as T

MODES = ("plain_pad", "plain_packed", "mmlm")
PRECISIONS = ("32-true", "bf16-mixed")
TARGET_SPEEDUP = 1.5
TARGET_MEMORY = 0.8
TARGET_OVERHEAD = 0.03


# ---------------------------------------------------------------------------------- memory (subprocess)
def memory_child(args) -> int:
    """The ``--child MODE`` process: train ``MODE`` and print its peak memory (``_memory.memory_child``)."""
    setup = T.Setup(args)

    def run(on_step) -> dict:
        return T.run_mode(setup, args.child, args.memory_steps + args.warmup, on_step)

    return M.memory_child(args.child, run, device=setup.device, warmup=args.warmup, steps=args.memory_steps)


def measure_memory(args, mode: str) -> dict:
    """Peak memory of ``mode``: this script re-run as ``--child MODE`` in a subprocess."""
    return M.measure_memory([str(Path(__file__).resolve()), "--child", mode, "--no-save"] + args.passthrough,
                            name=mode, timeout=args.memory_timeout)


# ---------------------------------------------------------------------------------- main
def round_order(modes, r: int) -> list:
    """The modes of round ``r`` (0-based): rotated by ``r``, so that first-run costs the warm-up steps do
    not cover (a cold allocator, kernel selection, page cache) do not always fall on the same mode."""
    modes = list(modes)
    k = r % len(modes) if modes else 0
    return modes[k:] + modes[:k]


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
    p.add_argument("--preset", default="tiny", type=C.preset_name, help="model preset, random weights (default tiny)")
    p.add_argument("--steps", type=C.positive_int, default=12, help="timed optimizer steps per mode (default 12)")
    p.add_argument("--warmup", type=C.positive_int, default=2, help="untimed steps before them (default 2)")
    p.add_argument("--batch-size", type=C.positive_int, default=16, help="samples per padded batch (default 16)")
    p.add_argument("--max-length", type=C.positive_int, default=256, help="longest sample in tokens (default 256)")
    p.add_argument("--pack-length", type=C.positive_int, default=None, help="packed row length (default --max-length)")
    p.add_argument("--pack-rows", type=C.positive_int, default=None,
                   help="packed rows per batch (default: as many as hold ~--batch-size samples)")
    p.add_argument("--num-workers", type=C.nonneg_int, default=1, help="DataLoader workers of every mode (default 1)")
    # only the two precisions the plain loops reproduce (fp32, or bf16 autocast over fp32 weights): with any
    # other, Lightning would train in one precision and the plain loops in another
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="32-true (CPU default) or bf16-mixed (CUDA default): the same on every mode")
    p.add_argument("--repeats", type=C.positive_int, default=1,
                   help="rounds over the modes, each round starting at the next mode (so that no mode is always "
                        "the first to run in the process); medians are reported (default 1; 3 or more to drop a "
                        "cold round)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (default: shapes, caption or 3-5 turn VQA per image), lognormal (long-tailed "
                        "caption lengths, built once in the cache dir) or a shard directory")
    p.add_argument("--sample-mode", default=None,
                   help="what a record trains (VLMDataModule.sample_mode; default mixed for synthetic, else auto)")
    p.add_argument("--attn-implementation", default=None,
                   help="the LM's attention in the packed modes (plain_packed, mmlm), e.g. flex_attention (block-"
                        "sparse masks of the packed samples on a GPU); the baseline keeps the preset's (sdpa)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes to run (default all)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure peak memory, each mode in a subprocess (default on)")
    p.add_argument("--memory-steps", type=C.positive_int, default=5, help="steps after warm-up in the memory runs (default 5)")
    p.add_argument("--memory-timeout", type=int, default=300, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    C.add_common_args(p)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.memory_steps < 1:
        raise SystemExit("error: --warmup, --steps and --memory-steps must be >= 1")
    if args.attn_implementation == "flex_attention" and C.resolve_device(args.device) == "cpu":
        raise SystemExit("error: --attn-implementation flex_attention trains on a GPU only (torch has no "
                         "FlexAttention backward on a CPU)")
    # what a memory subprocess gets: every option but the ones that drive this process
    args.passthrough = [a for a in argv if a not in ("--memory", "--no-memory", "--no-save")]
    C.set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning()
    if args.child:
        return memory_child(args)

    t_start = time.perf_counter()
    setup = T.Setup(args)
    info = C.system_info(setup.device)
    info["load_at_start"] = C.machine_load()
    print(f"{args.preset} preset, {setup.vlm.num_parameters() / 1e6:.1f}M parameters, device {info['device']}, "
          f"{args.precision}, batch {args.batch_size} samples padded | {setup.pack_rows} rows x {setup.pack_length} "
          f"tokens packed (mean sample {setup.mean_length or float('nan'):.0f} tokens), {args.num_workers} loader "
          f"worker(s), {args.threads or 'default'} thread(s); {args.steps} timed steps after {args.warmup} warm-up",
          flush=True)

    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for r in range(args.repeats):
        for mode in round_order(args.modes, r):
            stats = T.run_mode(setup, mode, args.warmup + args.steps)
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
                     "data wait ms": med(mode, "data_wait_ms"),
                     "samples/step": med(mode, "samples_per_step"), "real frac": med(mode, "real_fraction"),
                     "peak mem MiB": mem / 2**20 if mem is not None else None,
                     "vs plain_pad": med(mode, "samples_per_s") / base if base else None})
    C.print_table(rows, ["mode", "samples/s", "real tok/s", "ms/step", "data wait ms", "samples/step", "real frac",
                         "peak mem MiB", "vs plain_pad"], title="training throughput (steady state, medians over rounds)")

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
                   "round_orders": [round_order(args.modes, r) for r in range(args.repeats)],
                   "sample_mode": args.sample_mode, "data": args.data, "shards": str(setup.shards),
                   "attn_implementation_packed": args.attn_implementation or setup.base_attn},
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
