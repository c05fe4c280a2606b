"""AtomicCheckpointIO: a checkpoint file is whole or the previous one; `mmlm fit` writes with it."""

from __future__ import annotations

import pytest
import torch

from _training_kit import fit_args
from mmlm.cli import fit
from mmlm.training.checkpoint_io import AtomicCheckpointIO


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 1
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "state_dict": {}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 1  # whole, the previous one
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_fit_saves_through_it(tmp_path, monkeypatch):
    saved = []
    real = AtomicCheckpointIO.save_checkpoint

    def counting(self, checkpoint, path, storage_options=None):
        saved.append(str(path))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counting)
    run = tmp_path / "run"
    assert fit.main(fit_args(run, steps=2)) == 0
    assert str(run / "checkpoints" / "last.ckpt") in saved
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and not list((run / "checkpoints").glob(".*.tmp-*"))
