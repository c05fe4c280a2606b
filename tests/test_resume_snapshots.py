"""Resume snapshots of the training stream (``StreamConfig.snapshot_every``): a resume from any
batch continues exactly the uninterrupted stream, and reads a bounded number of samples however
long the run was; a shard that changed since the checkpoint is counted, not fatal."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from mmlm.data import stages
from mmlm.data.collate import PackCollate, PadCollate
from mmlm.data.sources import resolve_sources
from mmlm.data.stream import StreamConfig, VLMStream
from test_data_stream import caption_sample, make_processor, write_tar


@pytest.fixture(scope="module")
def proc():
    return make_processor()


def _shards(root, n_shards: int = 5, per_shard: int = 6) -> None:
    """Two sources of caption shards with a corrupt image in each shard and, in source b, a truncated shard."""
    for src in ("a", "b"):
        for s in range(n_shards):
            samples = [caption_sample(f"{src}{s}_{i:02d}", i + s, words=(i * 3 + s) % 5) for i in range(per_shard)]
            samples.insert(2, (f"{src}{s}_bad", {"png": b"junk", "txt": "a red star"}))
            path = write_tar(root / src / f"{src}-{s:06d}.tar", samples)
            if src == "b" and s == 1:  # cut inside its fifth sample: four samples, then a bad_shard error
                data = path.read_bytes()
                path.write_bytes(data[:len(data) * 5 // 8])


def _stream(root, proc, *, packing=False, **cfg) -> VLMStream:
    sources = resolve_sources([{"shards": str(root / "a"), "weight": 2}, {"shards": str(root / "b"), "weight": 1}])
    collate = PackCollate(proc, 128) if packing else PadCollate(proc)
    cfg = StreamConfig(split="train", batch_size=3, seed=5, max_bad_fraction=None, **cfg)
    return VLMStream(sources, proc, collate, cfg, rank=0, world_size=1)


def _batches(stream, n: int) -> list[dict]:
    it = iter(DataLoader(stream, batch_size=None, num_workers=0, collate_fn=lambda x: x))
    return [next(it) for _ in range(n)]


def _resume_after(batches: list[dict], k: int) -> dict:
    """The resume state after the first ``k`` batches, as ``VLMDataModule.record_consumed`` keeps it: the
    last batch's position and the newest snapshot a batch carried (only the batch reaching one carries it)."""
    state = copy.deepcopy(batches[k - 1]["loader_state"])
    snapshots = [b["loader_state"]["snapshot"] for b in batches[:k] if "snapshot" in b["loader_state"]]
    resume = {key: state[key] for key in ("position", "done", "emitted", "batches")}
    if snapshots:
        resume["snapshot"] = copy.deepcopy(snapshots[-1])
    return {state["worker"]: resume}


@pytest.mark.parametrize("bufsize,every,packing", [(0, 2, False), (5, 3, False), (12, 1, False), (7, 4, True)])
def test_a_resume_from_any_batch_continues_the_uninterrupted_stream(tmp_path, proc, bufsize, every, packing):
    _shards(tmp_path)
    ref = _batches(_stream(tmp_path, proc, packing=packing, shuffle_buffer=bufsize, snapshot_every=every), 30)
    carried = [b["loader_state"]["snapshot"]["position"] for b in ref if "snapshot" in b["loader_state"]]
    assert len(carried) > 3 and carried == sorted(set(carried))  # each new snapshot is carried once
    assert {"corrupt_image", "bad_shard"} <= set(sum((Counter(b["skipped"]) for b in ref), Counter()))
    for k in range(1, 26):
        stream = _stream(tmp_path, proc, packing=packing, shuffle_buffer=bufsize, snapshot_every=every)
        stream.set_resume(_resume_after(ref, k))
        tail = _batches(stream, 4)
        assert [b["keys"] for b in tail] == [b["keys"] for b in ref[k:k + 4]], f"resumed after batch {k}"
        assert [b["skipped"] for b in tail] == [b["skipped"] for b in ref[k:k + 4]], f"resumed after batch {k}"
        assert [b["loader_state"]["position"] for b in tail] == [b["loader_state"]["position"] for b in ref[k:k + 4]]


def _samples_read(monkeypatch) -> Counter:
    """Counts the samples read from tars (every item ``iter_tar_groups`` makes)."""
    counts: Counter = Counter()
    real = stages.iter_tar_groups

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            counts["read"] += 1
            yield item

    monkeypatch.setattr(stages, "iter_tar_groups", counting)
    return counts


def test_a_resume_from_a_snapshot_reads_a_bounded_number_of_samples(tmp_path, proc, monkeypatch):
    per_shard, bufsize, every = 6, 8, 5
    _shards(tmp_path, per_shard=per_shard)
    ref = {e: _batches(_stream(tmp_path, proc, shuffle_buffer=bufsize, snapshot_every=e), 90) for e in (0, every)}
    assert [b["keys"] for b in ref[0]] == [b["keys"] for b in ref[every]]  # snapshots do not change the stream
    read = _samples_read(monkeypatch)

    def resume_cost(e: int, k: int) -> int:
        read.clear()
        stream = _stream(tmp_path, proc, shuffle_buffer=bufsize, snapshot_every=e)
        stream.set_resume(_resume_after(ref[e], k))
        assert _batches(stream, 1)[0]["keys"] == ref[e][k]["keys"]
        return read["read"]

    # snapshot to frontier (< every samples plus a batch's), the rest of the shard the snapshot stood in,
    # the shards holding the buffered samples (at most one per buffered sample), and the next batch
    bound = every + 3 * 3 + per_shard * (bufsize + 2)
    with_snapshots = [resume_cost(every, k) for k in (20, 50, 89)]
    assert max(with_snapshots) <= bound, with_snapshots
    without = [resume_cost(0, k) for k in (20, 50, 89)]
    assert without[0] < without[1] < without[2] and without[2] > 2 * bound, without  # a replay from the start


def test_a_shard_changed_since_the_checkpoint_is_counted_not_fatal(tmp_path, proc):
    _shards(tmp_path)
    ref = _batches(_stream(tmp_path, proc, shuffle_buffer=10, snapshot_every=2), 12)
    resume = _resume_after(ref, len(ref))
    assert resume[0]["snapshot"]["buffer"]
    for src in ("a", "b"):  # every shard now holds a single sample
        for s in range(5):
            write_tar(tmp_path / src / f"{src}-{s:06d}.tar", [caption_sample(f"{src}{s}_new", s)])
    stream = _stream(tmp_path, proc, shuffle_buffer=10, snapshot_every=2)
    stream.set_resume(resume)
    skipped = sum((Counter(b["skipped"]) for b in _batches(stream, 6)), Counter())
    assert skipped["bad_shard"] >= 1


def test_snapshot_every_must_not_be_negative(tmp_path, proc):
    with pytest.raises(ValueError, match="snapshot_every must be >= 0"):
        StreamConfig(snapshot_every=-1)
    from mmlm.data.datamodule import VLMDataModule

    with pytest.raises(ValueError, match="snapshot_every must be >= 0"):
        VLMDataModule(train=str(tmp_path), snapshot_every=-2)


def test_a_snapshot_holds_only_plain_values(tmp_path, proc):
    """Checkpoints load with ``torch.load(weights_only=True)``: lists, ints and None only."""
    _shards(tmp_path)
    batches = _batches(_stream(tmp_path, proc, shuffle_buffer=4, snapshot_every=2), 6)
    snap = next(b["loader_state"]["snapshot"] for b in batches if "snapshot" in b["loader_state"])

    def plain(x) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (int, float, str))

    assert set(snap) == {"position", "draw", "index", "buffer", "rng"} and plain(snap)
    assert len(snap["buffer"]) == 4
