"""What an mmlm Lightning checkpoint carries beyond the weights, for an exact resume.

``checkpoint["mmlm"]`` (:data:`CHECKPOINT_KEY`) holds the model config, the processor files (so a
resumed run rebuilds the model without training its tokenizer again), the non-finite-loss counters
and the RNG states. :func:`get_rng_state` / :func:`set_rng_state` capture and restore Python's,
NumPy's, torch's (and CUDA's) generators in types ``torch.load(weights_only=True)`` accepts;
:func:`read_checkpoint_payload` reads the payload of a checkpoint file without reading its weights.
"""

from __future__ import annotations

import random

import numpy as np
import torch

CHECKPOINT_KEY = "mmlm"
PAYLOAD_VERSION = 1


def make_payload(model_config: dict, processor_files: dict[str, bytes] | None, nonfinite: dict,
                 rng: dict | None = None) -> dict:
    """``checkpoint["mmlm"]`` for a model config, its processor files and the guard's counters, plus the
    RNG states ``rng`` (default: the generators' states now)."""
    return {
        "version": PAYLOAD_VERSION,
        "model_config": model_config,
        "processor": processor_files,
        "nonfinite": nonfinite,
        "rng": get_rng_state() if rng is None else rng,
    }


def read_checkpoint_payload(path: str) -> dict | None:
    """``checkpoint["mmlm"]`` of a Lightning checkpoint file (memory-mapped: the weights are not read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip checkpoint (mmap needs one)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get(CHECKPOINT_KEY)


def get_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states in checkpoint-safe types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` captured (a missing entry leaves that generator as it is)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):
            pass  # a different number of devices: keep the fresh CUDA state
