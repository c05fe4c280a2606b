"""Small pieces shared by :mod:`mmlm.interop.export` and :mod:`mmlm.interop.import_`: the
``resample`` ids of transformers image processors, dtype names, and writing a directory atomically."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mmlm.io import atomic_dir

_RESAMPLE_IDS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
_RESAMPLE_NAMES = {v: k for k, v in _RESAMPLE_IDS.items()}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from mmlm.api import resolve_dtype

    return resolve_dtype(dtype, torch.device("cpu"))


def _write_dir(out: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Write a whole directory atomically; an existing non-empty ``out`` needs ``overwrite``
    and is replaced only once the new one is complete."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
        staging = out.with_name(f".{out.name}.new")
        shutil.rmtree(staging, ignore_errors=True)
        with atomic_dir(staging) as tmp:
            write(tmp)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return out
    with atomic_dir(out) as tmp:
        write(tmp)
    return out
