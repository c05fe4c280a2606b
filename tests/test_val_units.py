"""A small val set under several processes: the val loader lowers its worker count so that every rank (and
every loader unit) gets a sample -- a rank without a validation batch hangs multi-process validation -- or
says why it cannot. Ranks are simulated (RANK/WORLD_SIZE), no process group is started."""

from __future__ import annotations

import logging

import pytest

from mmlm.data.datamodule import VLMDataModule
from mmlm.data.val_units import count_shard_items, val_worker_count
from mmlm.data.stages import StreamContext, expand_tar
from test_data_stream import caption_sample, keys_of, make_processor, write_tar


@pytest.fixture(scope="module")
def proc():
    return make_processor()


def _val_dm(root, proc, monkeypatch, rank: int, world: int, num_workers: int = 2) -> VLMDataModule:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dm = VLMDataModule(val=str(root), batch_size=1, num_workers=num_workers, persistent_workers=False,
                       max_bad_fraction=None)
    dm.attach_processor(proc)
    return dm


def _three_samples(root) -> list[str]:
    write_tar(root / "v-000000.tar", [caption_sample("a0", 0), caption_sample("a1", 1)])
    write_tar(root / "v-000001.tar", [caption_sample("b0", 2)])
    return ["a0", "a1", "b0"]


def test_small_val_set_lowers_the_workers_and_every_rank_gets_a_batch(tmp_path, proc, monkeypatch, caplog):
    keys = _three_samples(tmp_path)  # 3 samples, 2 shards < 2 ranks x 2 workers = 4 units
    seen = []
    for rank in range(2):
        dm = _val_dm(tmp_path, proc, monkeypatch, rank, 2)
        with caplog.at_level(logging.INFO, logger="mmlm.data"):
            loader = dm.val_dataloader()
        assert loader.num_workers == 1  # 2 x 1 units <= 3 samples < 2 x 2
        assert "num_workers=1" in caplog.text
        batches = list(loader)
        assert len(batches) >= 1, f"rank {rank} got no validation batch"
        seen += keys_of(batches)
    assert sorted(seen) == sorted(keys)  # every sample exactly once over the 2 ranks


def test_fewer_samples_than_processes_is_a_clear_error(tmp_path, proc, monkeypatch):
    write_tar(tmp_path / "v-000000.tar", [caption_sample("only", 0)])
    dm = _val_dm(tmp_path, proc, monkeypatch, 0, 2)
    with pytest.raises(ValueError, match=r"data\.val has 1 sample\(s\) for 2 processes.*hang.*at least 2 samples"):
        dm.val_dataloader()


def test_one_process_and_enough_samples_leave_the_workers_alone(tmp_path, proc, monkeypatch):
    _three_samples(tmp_path)
    dm = _val_dm(tmp_path, proc, monkeypatch, 0, 1)
    assert dm.val_dataloader().num_workers == 2  # one process never hangs: nothing counted
    write_tar(tmp_path / "v-000001.tar", [caption_sample(f"b{i}", i) for i in range(2)])  # 4 samples: 4 units
    dm = _val_dm(tmp_path, proc, monkeypatch, 1, 2)
    assert dm.val_dataloader().num_workers == 2
    assert val_worker_count(["x1", "x2", "x3", "x4"], 2, 2) == 2  # as many shards as units: nothing read


def test_the_count_is_what_the_eval_stream_enumerates(tmp_path):
    """Good samples, a schema problem, an empty tar, a truncated and a corrupt shard: one item per key plus one
    bad_shard item, like expand_tar (what split_samples splits)."""
    good = write_tar(tmp_path / "good.tar", [caption_sample(f"g{i}", i) for i in range(3)]
                     + [("noext", {"": b"x"}), ("skipme", {"pth": b"x"})])
    empty = write_tar(tmp_path / "empty.tar", [])
    data = good.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 10)
    missing = tmp_path / "missing.tar"
    ctx = StreamContext(split="eval")
    for url in map(str, (good, empty, cut, junk, missing)):
        items = list(expand_tar([url], ctx, allow_pipes=False, allow_remote=False, max_member_size=None))
        assert count_shard_items(url) == len(items), url
        assert count_shard_items(url, limit=2) == min(2, len(items))


def test_shard_level_split_after_lowering_needs_no_empty_shard_per_rank(tmp_path):
    a = write_tar(tmp_path / "a.tar", [caption_sample("a0", 0)])
    e = write_tar(tmp_path / "e.tar", [])
    b = write_tar(tmp_path / "b.tar", [caption_sample("b0", 0)])
    # 3 shards < 4 units, 2 samples: at 2 units the stream splits whole shards: rank 0 {a, b}, rank 1 {e}
    with pytest.raises(ValueError, match="only empty shards"):
        val_worker_count([str(a), str(e), str(b)], 2, 2)
    assert val_worker_count([str(a), str(b), str(e)], 2, 2) == 1  # rank 0 {a, e}, rank 1 {b}
