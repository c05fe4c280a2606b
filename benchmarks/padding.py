"""Real-token fraction of training batches: padding (pad to the longest sample, the naive loader)
vs packing (``mmlm.data.PackCollate``), through mmlm's own training stream.

Both collates run in this process over the same shards, the same processor and the same model
geometry (the preset's tokens per image), through ``VLMDataModule.train_dataloader()`` (in-process,
``num_workers=0``): real tokens / batch tokens (rows x row length) summed over ``--batches``
batches. Two data sets:

- ``synthetic``: the synthetic shapes training shards (``data_pipelines.synthetic``), sample mode
  ``mixed``: a caption or a 3-5 turn VQA conversation per image (two length modes);
- ``lognormal``: a long-tailed mix written as a few small shards in a temporary directory:
  captions whose word counts are lognormal (median ``--median-words``, sigma ``--sigma``); a
  sample longer than ``max_length`` is dropped by the stream (``on_overflow="drop"``), on both sides.

"pad to max_length" (every row padded to the maximum length, as fixed-shape loaders do) is shown
for reference. Target: packing keeps >= 0.95 of the batch tokens real.

Usage::

    python benchmarks/padding.py                         # tiny preset, max_length 256
    python benchmarks/padding.py --preset small --max-length 512 --batches 50
    python benchmarks/padding.py --batch-size 32 --pack-rows 8 --no-save
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import _common as C

TARGET = 0.95


def write_lognormal_shards(out: Path, *, count: int, median_words: float, sigma: float, shards: int,
                           seed: int = 0) -> dict:
    """``count`` 64x64 JPEG + caption samples whose caption lengths (in words) are lognormal."""
    import numpy as np
    from PIL import Image

    from data_pipelines.synthetic import COLORS, SHAPES
    from mmlm.data.writer import ShardWriter

    rng = np.random.default_rng(seed)
    words = list(SHAPES) + list(COLORS) + ["a", "small", "large", "on", "the", "left", "right", "and", "at",
                                           "top", "bottom", "in", "center", "with", "next", "to"]
    lengths = np.clip(np.rint(np.exp(rng.normal(np.log(median_words), sigma, size=count))), 1, 2000).astype(int)
    per = -(-count // shards)
    with ShardWriter(out, "shard", max_count=per) as w:
        for i, n in enumerate(lengths):
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), colour).save(buf, "JPEG", quality=85)
            w.write_members(f"s{i:06d}", {"jpg": buf.getvalue(), "txt": " ".join(rng.choice(words, size=n)).encode()})
    return {"samples": count, "words_median": float(np.median(lengths)), "words_p90": float(np.percentile(lengths, 90)),
            "words_p99": float(np.percentile(lengths, 99)), "words_max": int(lengths.max())}


def fractions(shards, processor, *, packing: bool, batch_size: int, max_length: int, batches: int,
              sample_mode: str) -> dict:
    from mmlm.data import VLMDataModule

    dm = VLMDataModule(train=shards, batch_size=batch_size, num_workers=0, packing=packing, max_length=max_length,
                       shuffle_buffer=256, seed=0, sample_mode=sample_mode, min_samples=10 ** 9)
    dm.attach_processor(processor)
    it = iter(dm.train_dataloader())
    real = total = samples = 0
    longest = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        real += b["real_tokens"]
        total += b["total_tokens"]
        samples += b["num_samples"]
        longest = max(longest, b["input_ids"].shape[1])
    seconds = time.perf_counter() - t0
    return {"real_tokens": real, "batch_tokens": total, "samples": samples, "batches": batches,
            "real_fraction": real / total if total else None, "samples_per_batch": samples / batches,
            "longest_row": longest, "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    p = C.script_parser(__doc__)
    p.add_argument("--preset", default="tiny", type=C.preset_name,
                   help="model preset: its tokens per image (default tiny)")
    p.add_argument("--max-length", type=C.positive_int, default=256,
                   help="longest sample / packed row length (default 256)")
    p.add_argument("--batch-size", type=C.positive_int, default=16, help="samples per padded batch (default 16)")
    p.add_argument("--pack-rows", type=C.positive_int, default=8, help="rows per packed batch (default 8)")
    p.add_argument("--batches", type=C.positive_int, default=30,
                   help="batches measured per configuration (default 30)")
    p.add_argument("--lognormal-samples", type=C.positive_int, default=1200,
                   help="samples of the long-tailed set (default 1200)")
    p.add_argument("--median-words", type=C.positive_float, default=12.0,
                   help="median caption words of the long-tailed set")
    p.add_argument("--sigma", type=C.positive_float, default=0.9,
                   help="lognormal sigma of the caption words (default 0.9)")
    C.add_common_args(p, device=False)
    args = p.parse_args(argv)
    C.set_threads(args.threads)

    syn = C.synthetic_dataset(args.cache_dir)
    tok = C.bench_tokenizer(syn)
    # the processor needs only the model's geometry (image transform, tokens per image): build the preset
    # small enough to be quick (its vision tower and projector are what count)
    vlm, processor = C.build_pair(args.preset, tok, max_length=args.max_length,
                                  overrides={"text": {"hf_config": {"num_hidden_layers": 1}}})
    del vlm
    info = C.system_info("cpu")
    info["load_at_start"] = C.machine_load()

    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="mmlm-bench-lognormal-") as tmp:
        ln_stats = write_lognormal_shards(Path(tmp), count=args.lognormal_samples, median_words=args.median_words,
                                          sigma=args.sigma, shards=4)
        sets = {"synthetic": ([str(syn)], "mixed"), "lognormal": ([tmp], "caption")}
        for name, (shards, mode) in sets.items():
            pad = fractions(shards, processor, packing=False, batch_size=args.batch_size, max_length=args.max_length,
                            batches=args.batches, sample_mode=mode)
            pack = fractions(shards, processor, packing=True, batch_size=args.pack_rows, max_length=args.max_length,
                             batches=args.batches, sample_mode=mode)
            # pad-to-max_length: the same samples, every row max_length long
            fixed = pad["real_tokens"] / (pad["samples"] * args.max_length)
            results[name] = {"pad_to_longest": pad, "packed": pack, "pad_to_max_length_fraction": fixed,
                             "sample_mode": mode,
                             "packing_over_padding": pack["real_fraction"] / pad["real_fraction"]}
            rows.append({"data": name, "pad to max_length": fixed, "pad to longest (baseline)": pad["real_fraction"],
                         "packed (mmlm)": pack["real_fraction"], "ratio": results[name]["packing_over_padding"],
                         "samples/row packed": pack["samples"] / (args.batches * args.pack_rows),
                         "target": f">= {TARGET}", "verdict": C.verdict(pack["real_fraction"], TARGET)})
    results["lognormal"]["length_stats"] = ln_stats
    info["load_at_end"] = C.machine_load()

    C.print_table(rows, ["data", "pad to max_length", "pad to longest (baseline)", "packed (mmlm)", "ratio",
                         "samples/row packed", "target", "verdict"],
                  title=f"real-token fraction of batch tokens ({args.preset}: {processor.config.num_image_tokens} tokens "
                        f"per image, max_length {args.max_length}, {args.batches} batches each)")
    payload = {
        "config": {"preset": args.preset, "max_length": args.max_length, "batch_size": args.batch_size,
                   "pack_rows": args.pack_rows, "batches": args.batches, "num_image_tokens":
                   processor.config.num_image_tokens, "median_words": args.median_words, "sigma": args.sigma},
        "target": {"packed_real_fraction_min": TARGET},
        "results": results,
        "ratios": {name: {"packed_real_fraction": r["packed"]["real_fraction"],
                          "padded_real_fraction": r["pad_to_longest"]["real_fraction"],
                          "packing_over_padding": r["packing_over_padding"]}
                   for name, r in results.items()},
        "met": all(r["packed"]["real_fraction"] >= TARGET for r in results.values()),
    }
    if not args.no_save:
        C.write_result("padding", payload, info, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
