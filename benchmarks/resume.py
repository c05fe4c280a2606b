"""Resume cost: time to the first batch of a resumed training stream, replay from the start vs snapshots.

One training stream (``VLMStream``, in-process, the ``--preset`` processor, photo-like JPEG shards
of ``--size``) runs to each of the ``--at`` sample counts; at each, the loader position is kept the
way ``VLMDataModule.record_consumed`` keeps it. Then, in this process, one after another:

``replay`` (the baseline, ``snapshot_every=0``)
    The resumed stream re-reads its stream from the start, skipping (not decoding) every position
    consumed: the cost grows with the run.
``snapshot`` (``snapshot_every``, 1000 by default)
    The resumed stream restores its shard draw, shuffle buffer and RNG from the newest snapshot,
    re-reading only the shards the buffer referenced and the samples since the snapshot.

Both yield the same next batch (checked). Printed per sample count: seconds to the first batch and
the samples read from tars (counted in ``mmlm.data.stages.iter_tar_groups``), and their ratio. The
samples read do not depend on the machine; with ``pipe:``/remote shards every one is a re-download.

Usage::

    python benchmarks/resume.py                          # at 2000, 8000 and 20000 samples
    python benchmarks/resume.py --at 5000 50000 --shuffle-buffer 2000 --snapshot-every 500
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter

import _common as C


def _resume_state(batches_states: list[dict]) -> dict:
    """The worker's resume entry after these batches' loader states (as ``record_consumed`` keeps it)."""
    last = batches_states[-1]
    out = {k: copy.deepcopy(last[k]) for k in ("position", "done", "emitted", "batches")}
    snaps = [s["snapshot"] for s in batches_states if "snapshot" in s]
    if snaps:
        out["snapshot"] = copy.deepcopy(snaps[-1])
    return out


def main(argv=None) -> int:
    p = C.script_parser(__doc__)
    p.add_argument("--preset", default="tiny", type=C.preset_name, help="model preset: the processor (default tiny)")
    p.add_argument("--at", type=C.positive_int, nargs="+", default=[2000, 8000, 20000],
                   help="resume after this many samples (default 2000 8000 20000)")
    p.add_argument("--batch-size", type=C.positive_int, default=32, help="samples per batch (default 32)")
    p.add_argument("--shuffle-buffer", type=C.positive_int, default=1000, help="shuffle buffer (default 1000)")
    p.add_argument("--snapshot-every", type=C.positive_int, default=1000, help="snapshot interval (default 1000)")
    p.add_argument("--images", type=C.positive_int, default=2048, help="JPEGs in the cached shards (default 2048)")
    p.add_argument("--shards", type=C.positive_int, default=16, help="shards they are written to (default 16)")
    p.add_argument("--size", default="160x120", type=C.jpeg_size, help="JPEG size WxH (default 160x120: a quick run; the bytes "
                                                     "re-read scale with it)")
    C.add_common_args(p, device=False)
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    w, h = args.size

    from mmlm.data import stages
    from mmlm.data.collate import PadCollate
    from mmlm.data.sources import resolve_sources
    from mmlm.data.stream import StreamConfig, VLMStream

    shard_dir = C.jpeg_dataset(args.cache_dir, count=args.images, size=(w, h), shards=args.shards)
    tok = C.bench_tokenizer(C.synthetic_dataset(args.cache_dir))
    vlm, processor = C.build_pair(args.preset, tok)
    del vlm
    sources = resolve_sources(str(shard_dir))
    info = C.system_info("cpu")
    info["load_at_start"] = C.machine_load()

    def stream(every: int, resume: dict | None = None) -> VLMStream:
        cfg = StreamConfig(split="train", batch_size=args.batch_size, seed=0, shuffle_buffer=args.shuffle_buffer,
                           sample_mode="caption", snapshot_every=every)
        return VLMStream(sources, processor, PadCollate(processor), cfg, rank=0, world_size=1,
                         resume={0: resume} if resume else None)

    read = Counter()
    real = stages.iter_tar_groups

    def counting(*a, **kw):
        for item in real(*a, **kw):
            read["samples"] += 1
            yield item

    stages.iter_tar_groups = counting

    # one run past the largest count, keeping the loader states at each --at and the batch after it
    targets = sorted(set(args.at))
    states, saved, nxt = [], {}, {}
    t0 = time.perf_counter()
    for b in stream(args.snapshot_every):
        for n in saved:
            if n not in nxt:
                nxt[n] = b["keys"]
        if len(nxt) == len(targets):
            break
        states.append(b["loader_state"])
        for n in targets:
            if n not in saved and b["loader_state"]["emitted"] >= n:
                saved[n] = _resume_state(states)
    print(f"ran the stream to {max(targets)} samples in {time.perf_counter() - t0:.1f} s "
          f"({w}x{h} JPEGs, {args.shards} shards of {args.images // args.shards}, buffer {args.shuffle_buffer})",
          flush=True)

    def first_batch(every: int, resume: dict) -> tuple[float, int, list]:
        read.clear()
        t = time.perf_counter()
        keys = next(iter(stream(every, resume)))["keys"]
        return time.perf_counter() - t, read["samples"], keys

    rows, results = [], {}
    for n in targets:
        state = saved[n]
        replay_state = {k: v for k, v in state.items() if k != "snapshot"}
        t_replay, r_replay, k_replay = first_batch(0, replay_state)
        t_snap, r_snap, k_snap = first_batch(args.snapshot_every, state)
        assert k_replay == k_snap == nxt[n], "a resumed stream did not continue the interrupted one"
        results[n] = {"replay_s": t_replay, "snapshot_s": t_snap, "replay_samples_read": r_replay,
                      "snapshot_samples_read": r_snap, "position": state["position"],
                      "snapshot_position": state.get("snapshot", {}).get("position")}
        rows.append({"resumed after": n, "replay s": t_replay, "snapshot s": t_snap,
                     "speed-up": t_replay / t_snap if t_snap else None,
                     "samples read (replay)": r_replay, "samples read (snapshot)": r_snap})
    stages.iter_tar_groups = real
    info["load_at_end"] = C.machine_load()
    C.print_table(rows, ["resumed after", "replay s", "snapshot s", "speed-up", "samples read (replay)",
                         "samples read (snapshot)"],
                  title="time to the first batch of a resumed training stream (same batch both ways)")
    payload = {"config": {"preset": args.preset, "batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer,
                          "snapshot_every": args.snapshot_every, "images": args.images, "shards": args.shards,
                          "jpeg_size": [w, h], "threads": args.threads},
               "results": {str(n): r for n, r in results.items()}}
    if not args.no_save:
        C.write_result("resume", payload, info, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
