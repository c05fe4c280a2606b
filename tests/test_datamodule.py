"""VLMDataModule: skip counts through batches and the module, the error budget, exact resume
(2 workers, padding and packing, plain and through Lightning checkpoints), the finite val pass,
pickling, and its constructor as CLI arguments."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import pytest
import torch

from mmlm.data.datamodule import VLMDataModule
from mmlm.data.errors import DataErrorBudgetExceeded
from test_data_stream import caption_sample, keys_of, make_processor, png, write_caption_shards, write_tar


@pytest.fixture(scope="module")
def proc():
    return make_processor()


def _shards_with_bad(root, n_shards: int = 4, per_shard: int = 8) -> None:
    """Caption shards of mixed lengths with a corrupt image and an empty caption in each shard."""
    for s in range(n_shards):
        samples = [caption_sample(f"s{s}_{i:02d}", i + s, words=(i * 3 + s) % 5) for i in range(per_shard)]
        samples.insert(3, (f"s{s}_bad", {"png": b"junk", "txt": "a red star"}))
        samples.insert(6, (f"s{s}_empty", {"png": png(), "txt": ""}))
        write_tar(root / f"s-{s:06d}.tar", samples)


def _dm(root, proc, **kw) -> VLMDataModule:
    args = dict(train=str(root), batch_size=2, num_workers=2, shuffle_buffer=6, seed=3, max_bad_fraction=None,
                persistent_workers=True)
    args.update(kw)
    dm = VLMDataModule(**args)
    dm.attach_processor(proc)
    return dm


def _consume(dm: VLMDataModule, n: int, loader=None) -> list[dict]:
    loader = dm.train_dataloader() if loader is None else loader
    it = iter(loader)
    out = []
    for _ in range(n):
        b = next(it)
        dm.record_consumed(b)
        out.append(b)
    del it
    return out


@pytest.mark.parametrize("packing,group,every", [(False, 1, 1000), (True, 1, 1000), (False, 3, 1000), (False, 1, 3),
                                                 (True, 1, 2), (False, 3, 1), (False, 1, 0)])
def test_exact_resume_with_two_workers(tmp_path, proc, packing, group, every):
    """``every``: snapshot_every (1000: none is taken in so short a run; 0: off; else resumed from a snapshot)."""
    _shards_with_bad(tmp_path)
    kw = dict(packing=packing, max_length=128 if packing else None, group_by_length=group, snapshot_every=every)
    ref_dm = _dm(tmp_path, proc, **kw)
    ref = _consume(ref_dm, 11)
    first = _dm(tmp_path, proc, **kw)
    head = _consume(first, 5)  # an odd count: the resumed loader must start with worker 1
    assert [b["keys"] for b in head] == [b["keys"] for b in ref[:5]]
    state = first.state_dict()
    snapshots = [w.get("snapshot") for w in state["ranks"]["0"]["workers"].values()]
    assert all(snapshots) if every in (1, 2, 3) else not any(snapshots)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    resumed = _dm(tmp_path, proc, **kw)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    tail = _consume(resumed, 6)
    assert [b["keys"] for b in tail] == [b["keys"] for b in ref[5:]]
    assert resumed.skipped_counts() == ref_dm.skipped_counts()
    assert {"corrupt_image", "empty_caption"} <= set(ref_dm.skipped_counts())
    assert resumed.consumed_samples == ref_dm.consumed_samples == sum(b["num_samples"] for b in ref)
    if packing:
        assert any(b["num_samples"] > b["input_ids"].shape[0] for b in ref)  # rows hold several samples


def test_group_by_length_pads_less_and_trains_every_sample(tmp_path, proc):
    """Grouped batches: the same samples (each once) as stream order over a finite stretch, far less padding."""
    for s in range(2):
        write_tar(tmp_path / f"s-{s:06d}.tar",
                  [caption_sample(f"s{s}_{i:02d}", i, words=(i * 7 + s) % 9) for i in range(24)])
    def run(group, n):
        dm = _dm(tmp_path, proc, batch_size=4, num_workers=0, shuffle_buffer=1, group_by_length=group)
        batches = _consume(dm, n)
        real = sum(b["real_tokens"] for b in batches) / sum(b["total_tokens"] for b in batches)
        return [k for b in batches for k in b["keys"]], real
    plain, real_plain = run(1, 44)
    grouped, real_grouped = run(4, 40)
    assert plain[:160] != grouped and real_grouped > real_plain + 0.1
    # a bounded reordering (the endless stream repeats keys: compare multisets): the 160 grouped samples
    # are among the first 160 + 16 (the buffer) of stream order, and a sample waits at most 15 batches
    # (of 4) for being the oldest, so the first 100 of stream order are all among them
    assert len(grouped) == 160 and len(plain) == 176
    assert not Counter(grouped) - Counter(plain[:176]) and not Counter(plain[:100]) - Counter(grouped)
    with pytest.raises(ValueError, match="group_by_length"):
        VLMDataModule(train=str(tmp_path), group_by_length=0)
    with pytest.raises(ValueError, match="packing"):
        VLMDataModule(train=str(tmp_path), packing=True, group_by_length=2)


def test_resume_refuses_a_different_worker_count(tmp_path, proc):
    _shards_with_bad(tmp_path, 2, 4)
    dm = _dm(tmp_path, proc, num_workers=0)
    _consume(dm, 2)
    other = _dm(tmp_path, proc, num_workers=2)
    other.load_state_dict(dm.state_dict())
    with pytest.raises(ValueError, match=r"num_workers=0 or 1.*num_workers=2.*--data.strict_resume false"):
        other.train_dataloader()
    lenient = _dm(tmp_path, proc, num_workers=0, strict_resume=False, seed=9)
    lenient.load_state_dict(dm.state_dict())
    lenient.train_dataloader()
    assert lenient.epoch == 1


def test_a_lenient_resume_keeps_the_curriculum_s_place_and_every_rank_s_samples(tmp_path, proc):
    """strict_resume false starts a fresh stream (positions from 0): the caption_first_samples curriculum goes on
    where it stood instead of starting over, and a changed world size shares out every rank's consumed samples."""
    _shards_with_bad(tmp_path, 2, 4)
    dm = _dm(tmp_path, proc, num_workers=0, caption_first_samples=6)
    _consume(dm, 2)  # 4 samples of the curriculum's 6
    state = dm.state_dict()
    state["world_size"] = 2  # as if two ranks had trained: rank 1 consumed 10 more
    state["ranks"]["1"] = {**state["ranks"]["0"], "samples": 10}
    lenient = _dm(tmp_path, proc, num_workers=0, caption_first_samples=20, strict_resume=False)
    lenient.load_state_dict(state)
    lenient.train_dataloader()
    assert lenient.epoch == 1 and lenient._stream_config("train", 2).caption_first_samples == 20 - 14
    assert lenient.consumed_samples == 14  # (4 + 10) over one rank now: not rank 0's 4 alone
    again = _dm(tmp_path, proc, num_workers=0, caption_first_samples=20)  # a strict resume of that run keeps it
    again.load_state_dict(lenient.state_dict())
    again.train_dataloader()
    assert again._stream_config("train", 2).caption_first_samples == 6


def test_resume_refuses_changed_data_options_that_would_move_its_position(tmp_path, proc):
    """A saved position means the same samples only in the same stream: other shuffle_buffer, sources, weights or
    sample_mode were accepted silently, and the old positions applied to the new stream."""
    _shards_with_bad(tmp_path, 2, 4)
    dm = _dm(tmp_path, proc, num_workers=0)
    _consume(dm, 2)
    state = dm.state_dict()
    other = _dm(tmp_path, proc, num_workers=0, shuffle_buffer=12)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"^the training data options changed .*shuffle_buffer=12 \(checkpoint: 6\)"
                                         r".*--data.strict_resume false"):
        other.train_dataloader()
    lenient = _dm(tmp_path, proc, num_workers=0, shuffle_buffer=12, strict_resume=False)
    lenient.load_state_dict(state)
    lenient.train_dataloader()
    assert lenient.epoch == 1  # a fresh stream
    same = _dm(tmp_path, proc, num_workers=0, batch_size=3)  # the batch size does not change the sample stream
    same.load_state_dict(state)
    same.train_dataloader()
    assert same.epoch == 0


def test_loader_iterator_survives_new_epochs_and_teardown(tmp_path, proc):
    _shards_with_bad(tmp_path, 2, 4)
    ref = _consume(_dm(tmp_path, proc, num_workers=0), 4)
    dm = _dm(tmp_path, proc, num_workers=0)
    loader = dm.train_dataloader()
    got = _consume(dm, 2, loader) + _consume(dm, 1, loader)  # a second iter() continues the stream
    loader._iterator = None  # what Lightning's teardown does: the next iter() resumes from the consumed position
    got += _consume(dm, 1, loader)
    assert [b["keys"] for b in got] == [b["keys"] for b in ref]


def test_skips_are_counted_through_batches_and_the_module(tmp_path, proc):
    _shards_with_bad(tmp_path, 2, 4)
    dm = _dm(tmp_path, proc, val=str(tmp_path))
    batches = _consume(dm, 8)
    counts = dm.skipped_counts()
    assert counts and set(counts) <= {"corrupt_image", "empty_caption"}
    assert sum(counts.values()) == sum(sum(b["skipped"].values()) for b in batches)
    for b in dm.val_dataloader():
        dm.record_consumed(b)
    assert dm.skipped_counts("val") == {"corrupt_image": 2, "empty_caption": 2}
    assert dm.skipped_counts() == counts  # validation does not touch the training counts or position


def test_error_budget_stops_training(tmp_path, proc):
    write_tar(tmp_path / "bad-000000.tar", [(f"b{i}", {"png": b"junk", "txt": "x"}) for i in range(12)]
              + [caption_sample("g0")])
    dm = _dm(tmp_path, proc, max_bad=5)
    with pytest.raises(DataErrorBudgetExceeded, match="max_bad=5"):  # raised in a worker, same type here
        _consume(dm, 3)
    # the module's own check over all workers' consumed batches
    dm = _dm(tmp_path, proc, max_bad_fraction=0.5, min_samples=4)
    dm.record_consumed({"loader_state": {"split": "train", "worker": 0, "position": 3, "done": []},
                        "skipped": {"corrupt_image": 1}, "num_samples": 2})
    with pytest.raises(DataErrorBudgetExceeded, match="4 of 7 samples.*corrupt_image=4"):
        dm.record_consumed({"loader_state": {"split": "train", "worker": 1, "position": 4, "done": []},
                            "skipped": {"corrupt_image": 3}, "num_samples": 1})


def test_val_pass_is_exactly_once_and_finite(tmp_path, proc):
    keys = write_caption_shards(tmp_path, 3, 5)
    dm = _dm(tmp_path, proc, val=str(tmp_path), val_batch_size=4, packing=True)
    seen = keys_of(list(dm.val_dataloader()))
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen))
    assert VLMDataModule(train=str(tmp_path)).val_dataloader() == []


def test_constructor_checks_and_pickling(tmp_path, proc):
    write_caption_shards(tmp_path, 1, 3)
    with pytest.raises(ValueError, match="allow_pipes=True"):
        VLMDataModule(train=f"pipe:cat {tmp_path}/s-000000.tar")
    VLMDataModule(train=f"pipe:cat {tmp_path}/s-000000.tar", allow_pipes=True)
    with pytest.raises(ValueError, match="sample_mode"):
        VLMDataModule(train=str(tmp_path), sample_mode="captions")
    with pytest.raises(RuntimeError, match="attach_processor"):
        VLMDataModule(train=str(tmp_path)).train_dataloader()
    strict = make_processor(max_length=128)
    strict.config.on_overflow = "raise"
    dm = _dm(tmp_path, strict, max_length=64)
    stream = pickle.loads(pickle.dumps(dm.train_dataloader().dataset))  # what a spawned worker receives
    assert next(iter(stream))["num_samples"] == 2
    # the streams use a copy that drops overflowing samples at the module's max_length; the model's is untouched
    assert (stream.processor.config.max_length, stream.processor.config.on_overflow) == (64, "drop")
    assert (strict.config.max_length, strict.config.on_overflow) == (128, "raise")


@pytest.mark.parametrize("packing", [False, True])
def test_uint8_pixels_option(tmp_path, proc, packing):
    """On (the default): batches carry the fitted images as uint8; off: the processor's normalised
    float32. Same samples, and the uint8 ones normalise to exactly the float ones."""
    import io

    import numpy as np
    from PIL import Image

    from mmlm.data.stream import StreamConfig
    from mmlm.pixels import normalize_pixels

    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
        samples.append((f"n{i}", {"png": buf.getvalue(), "txt": "a small red star" + " on the left" * i}))
    write_tar(tmp_path / "n-000000.tar", samples)
    assert VLMDataModule(train=str(tmp_path)).uint8_pixels is True and StreamConfig().uint8_pixels is True
    kw = dict(num_workers=0, batch_size=3, packing=packing, max_length=128 if packing else None)
    on = next(iter(_dm(tmp_path, proc, **kw).train_dataloader()))
    off = next(iter(_dm(tmp_path, proc, uint8_pixels=False, **kw).train_dataloader()))
    assert on["keys"] == off["keys"] and torch.equal(on["input_ids"], off["input_ids"])
    assert on["pixel_values"].dtype == torch.uint8 and off["pixel_values"].dtype == torch.float32
    assert on["pixel_values"].shape == off["pixel_values"].shape and on["pixel_values"].shape[0] >= 3
    cfg = proc.config.image_transform
    assert torch.equal(normalize_pixels(on["pixel_values"], cfg.mean, cfg.std), off["pixel_values"])
    assert on["pixel_values"].float().std() > 20  # real image content, not a constant


def test_constructor_is_cli_ready():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(VLMDataModule, "data")
    cfg = parser.parse_args(["--data.train", '[{"shards": "a/{0..9}.tar", "weight": 0.7}, {"shards": "b/", "weight": 0.3}]',
                             "--data.packing", "true", "--data.batch_size", "4"])
    assert cfg.data.train[0]["weight"] == 0.7 and cfg.data.packing is True and cfg.data.batch_size == 4
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, VLMDataModule) and dm.packing
    help_text = parser.format_help()
    assert "Pack several samples per row" in help_text and "allow_pipes" in help_text


def test_resume_through_a_lightning_checkpoint(tmp_path, proc):
    import lightning.pytorch as pl

    _shards_with_bad(tmp_path / "data", 3, 6)

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["keys"])
            self.trainer.datamodule.record_consumed(batch)  # in the step: before checkpoint callbacks run
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(steps):
        return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)

    expected = [b["keys"] for b in _consume(_dm(tmp_path / "data", proc), 5)]
    first, module = trainer(3), Recorder()
    first.fit(module, datamodule=_dm(tmp_path / "data", proc))
    first.save_checkpoint(tmp_path / "ckpt.ckpt")
    assert module.seen == expected[:3]
    resumed = Recorder()
    trainer(5).fit(resumed, datamodule=_dm(tmp_path / "data", proc), ckpt_path=tmp_path / "ckpt.ckpt")
    assert resumed.seen == expected[3:]


def test_without_a_data_seed_the_stream_follows_seed_everything(tmp_path, proc, monkeypatch):
    # runs that differ only in --seed_everything must not read their data in the same order (a stage
    # started from a checkpoint has no other randomness: it would repeat the run bit for bit)
    from lightning.fabric.utilities.seed import seed_everything

    write_caption_shards(tmp_path, n_shards=2, per_shard=8)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert _dm(tmp_path, proc, seed=None).seed == 0
    orders = {}
    for global_seed in (1, 2):
        seed_everything(global_seed)  # exports PL_GLOBAL_SEED, as LightningCLI's seed_everything does
        dm = _dm(tmp_path, proc, seed=None, num_workers=0)
        assert dm.seed == global_seed
        orders[global_seed] = keys_of(_consume(dm, 4))
    assert orders[1] != orders[2]
    assert _dm(tmp_path, proc, seed=5).seed == 5  # an explicit data seed wins (monkeypatch restores the env)


def test_prompt_loss_fraction_labels_the_prompts_of_a_seeded_share_of_training_samples(tmp_path, proc):
    write_caption_shards(tmp_path, n_shards=2, per_shard=8)
    image_id = proc.image_token_id

    def labelled(fraction, loader="train"):
        dm = _dm(tmp_path, proc, num_workers=0, prompt_loss_fraction=fraction, val=str(tmp_path))
        batches = _consume(dm, 8) if loader == "train" else list(dm.val_dataloader())[:8]
        rows = []  # per sample: (key, labelled tokens, tokens a prompt loss would label)
        for b in batches:
            real = (b["attention_mask"] > 0) & (b["input_ids"] != image_id)  # (B, L)
            for key, lab, r in zip(b["keys"], b["labels"], real):
                rows.append((key, int((lab != -100).sum()), int(r.sum())))
        return rows

    answers_only = labelled(0.0)
    assert all(0 < n < full for _, n, full in answers_only)  # the caption, not the prompt
    everything = labelled(1.0)
    assert [k for k, _, _ in everything] == [k for k, _, _ in answers_only]  # same stream, other labels
    assert all(n == full for _, n, full in everything)  # every token but the image tokens
    half = labelled(0.5)
    assert half == labelled(0.5)  # a seeded draw per sample
    kinds = {n == full for _, n, full in half}
    assert kinds == {True, False}
    assert all(n < full for _, n, full in labelled(1.0, loader="val"))  # validation: answers only
    with pytest.raises(ValueError, match="prompt_loss_fraction"):
        VLMDataModule(train=str(tmp_path), prompt_loss_fraction=1.5)


def test_question_pattern_reaches_training_and_validation_streams(tmp_path, proc):
    conv = [{"from": "human", "value": "<image>\nwhat color is the star?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "where is the star?"}, {"from": "gpt", "value": "left"}]
    write_tar(tmp_path / "q-000000.tar", [(f"q{i}", {"png": png(), "json": json.dumps({"conversations": conv})})
                                           for i in range(8)])
    dm = _dm(tmp_path, proc, num_workers=0, sample_mode="conversation", question_pattern="^where ", val=str(tmp_path))
    for batches in (_consume(dm, 2), list(dm.val_dataloader())):
        for b in batches:
            assert {proc.tokenizer.decode(r[r != -100]) for r in b["labels"]} == {"left<|end|>"}
    with pytest.raises(ValueError, match="question_pattern"):
        VLMDataModule(train=str(tmp_path), question_pattern="[")
