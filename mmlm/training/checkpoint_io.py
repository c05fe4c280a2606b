"""Checkpoint files written atomically next to their destination.

Lightning's ``TorchCheckpointIO`` stages a save through an fsspec transaction whose temporary file lies
in ``$TMPDIR``, then moves it: across file systems that move is a copy into the destination, which a full
disk or a kill during the copy leaves truncated (``last.ckpt`` too: the only resumable checkpoint), and a
small ``$TMPDIR`` fails a save whatever room the checkpoint directory has (Lightning-AI/pytorch-lightning
#21253). :class:`AtomicCheckpointIO` writes ``DIR/.NAME.tmp-PID`` in the destination directory, fsyncs it
and renames it over ``DIR/NAME`` (``os.replace``, atomic on one file system): a checkpoint file is whole or
the previous one. A failed save removes its temporary file and raises (``mmlm fit``: one line, exit 1).
Remote paths (``s3://``, ...) go to Lightning's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are a temporary file in the destination directory, then a rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
