"""Small pieces shared by :mod:`mmlm.interop.export` and :mod:`mmlm.interop.import_`: the
``resample`` ids of transformers image processors, dtype names, the processor's ``max_length`` within
an LM's positions, writing a directory atomically,
``ExportError``, and moving tensors between an mmlm model and a transformers one (``_adopt``
shares them by name, ``_no_meta`` checks that none is left unfilled)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmlm.io import atomic_dir

_RESAMPLE_IDS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
_RESAMPLE_NAMES = {v: k for k, v in _RESAMPLE_IDS.items()}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from mmlm.api import resolve_dtype

    return resolve_dtype(dtype, torch.device("cpu"))


def _max_length_for(hf_config: dict, max_length: int | None) -> int:
    """The processor's ``max_length`` for an LM of ``hf_config``: given, at most the LM's positions
    (``max_position_embeddings`` / ``n_positions``; more is a ``ValueError``: GPT-2's learned positions would
    fail in the first long batch), or by default min(2048, those positions)."""
    positions = next((int(hf_config[k]) for k in ("max_position_embeddings", "n_positions") if hf_config.get(k)), None)
    if max_length is None:
        return min(2048, positions or 2048)
    if positions is not None and max_length > positions:
        raise ValueError(f"max_length={max_length} exceeds the LM's {positions} positions; pass at most {positions}")
    return max_length


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


class ExportError(ValueError):
    """A model that transformers' LLaVA cannot represent; the message says what would be needed."""


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def _adopt(dst: nn.Module, src: dict[str, torch.Tensor] | nn.Module, where: str,
           fill: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
           dtype: torch.dtype | None = None, cache: dict | None = None) -> None:
    """Make ``dst``'s parameters and buffers (non-persistent ones too) the tensors of ``src``
    with the same names (shared, not copied). ``fill(name, like)`` supplies missing ones.
    ``dtype``: floating tensors are cast into new tensors instead (the source is left as it is);
    ``cache`` keeps one cast per source tensor, so tied weights stay tied."""
    cache = {} if cache is None else cache
    if isinstance(src, nn.Module):
        tensors = dict(src.named_parameters(remove_duplicate=False))
        tensors.update(dict(src.named_buffers(remove_duplicate=False)))
    else:
        tensors = src
    problems = []
    for kind, items in (("_parameters", dst.named_parameters(remove_duplicate=False)),
                        ("_buffers", dst.named_buffers(remove_duplicate=False))):
        for name, like in list(items):
            value = tensors.get(name)
            if value is None and fill is not None:
                value = fill(name, like)
            if value is None:
                if kind == "_buffers" and not like.is_meta:
                    continue  # a buffer the source lacks but the destination computed itself
                problems.append(f"{name} missing")
                continue
            if tuple(value.shape) != tuple(like.shape):
                problems.append(f"{name}: shape {tuple(value.shape)} vs {tuple(like.shape)}")
                continue
            if dtype is not None and value.is_floating_point() and value.dtype != dtype:
                key = id(value)
                if key not in cache:
                    cast = value.detach().to(dtype)
                    cache[key] = (nn.Parameter(cast, requires_grad=like.requires_grad)
                                  if isinstance(value, nn.Parameter) else cast, value)
                value = cache[key][0]
            mod, leaf = _owner(dst, name)
            if kind == "_parameters":
                param = value if isinstance(value, nn.Parameter) else \
                    nn.Parameter(value, requires_grad=like.requires_grad)
                mod._parameters[leaf] = param
            else:
                mod._buffers[leaf] = value.detach() if isinstance(value, nn.Parameter) else value
    if problems:
        raise ExportError(f"{where}: the weights do not fit: " + "; ".join(problems[:8])
                          + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))


def _no_meta(model: nn.Module, where: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"{where}: no weights for {left[:5]}")
