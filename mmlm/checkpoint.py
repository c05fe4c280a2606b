"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ the processor's files).

- ``save_vlm`` / ``save_pretrained`` write atomically (see ``mmlm.io.atomic_dir``); a VLM whose LM
  still carries (peft) LoRA adapters is refused: merge them first.
- ``load_vlm`` rebuilds the model from ``config.json`` alone (pretrained flags are turned
  off: the weights come from the safetensors file, nothing is downloaded) and loads the
  weights strictly. Pickle-based weight files are refused, never unpickled; no remote code runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmlm.config import VLMConfig
from mmlm.io import atomic_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mmlm-vlm"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeCheckpointError(ValueError):
    """The directory holds only pickle-based weights, which mmlm refuses to load."""


def _write_model(vlm, directory: Path) -> None:
    from safetensors.torch import save_model

    if type(vlm.lm).__module__.startswith("peft."):  # its keys (base_model.model..., lora_A) match no config
        raise ValueError("the LM carries LoRA adapters: merge them first (mmlm.training.freeze.merge_lora); "
                         "a checkpoint holds the plain weights that config.json rebuilds")
    cfg = {"format": FORMAT, "mmlm_version": FORMAT_VERSION, **vlm.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    save_model(vlm, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def save_vlm(vlm, path: str | Path) -> None:
    """Write the model's config and weights into directory ``path`` atomically."""
    with atomic_dir(path) as tmp:
        _write_model(vlm, tmp)


def save_pretrained(path: str | Path, vlm, processor=None) -> None:
    """Write model and processor together in one atomic step."""
    with atomic_dir(path) as tmp:
        _write_model(vlm, tmp)
        if processor is not None:
            processor.save_pretrained(tmp)


CHECKPOINT_TEXT_FILES = ("config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json")
"""The checkpoint files besides the weights that decide its outputs (prompt, template, image transform, tokens)."""


def model_fingerprint(model_dir: str | Path) -> dict:
    """What identifies a checkpoint's outputs without reading its weights: its absolute path, the weights'
    size and modification time, and a hash of :data:`CHECKPOINT_TEXT_FILES` (editing one changes it). Runs
    that resume their outputs (``mmlm eval``'s prediction cache, ``mmlm describe --out``) compare it."""
    import hashlib

    model_dir = Path(model_dir)
    weights = model_dir / "model.safetensors"
    digest = hashlib.sha256()
    for name in CHECKPOINT_TEXT_FILES:
        path = model_dir / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-") + b"\0")
    return {
        "model": str(model_dir.resolve()),
        "weights_mtime_ns": weights.stat().st_mtime_ns if weights.exists() else None,
        "weights_size": weights.stat().st_size if weights.exists() else None,
        "checkpoint_files": digest.hexdigest()[:16],
    }


def check_model_dir(path: str | Path) -> None:
    """Raise ``FileNotFoundError`` unless ``path`` is a directory: "model directory not found", or for a training
    checkpoint's ``.ckpt`` file how to write its model directory (:func:`read_config`'s messages)."""
    if not Path(path).is_dir():
        read_config(path)


def read_config(path: str | Path) -> VLMConfig:
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        raise FileNotFoundError(f"{path} is a training checkpoint, not a model directory: write its model with "
                                f"m = mmlm.training.VLMModule.load_from_checkpoint('{path}'); "
                                "mmlm.training.export_model(m, DIR) (LoRA adapters merged)")
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        hint = f" (a run directory? its model is {path / 'model'})" if (path / "model" / CONFIG_NAME).is_file() else ""
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not an mmlm checkpoint{hint}")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}): a damaged or half-copied checkpoint") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != FORMAT:
        raise ValueError(
            f"{cfg_file} is not an mmlm model config (format={fmt!r}); "
            "for transformers LLaVA checkpoints use `mmlm import hf`"
        )
    return VLMConfig.from_dict(data)


def weights_file(path: str | Path) -> Path:
    """The safetensors file of a checkpoint; pickle-only checkpoints are refused."""
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{path} holds pickle-based weights ({', '.join(pickles)}); mmlm only loads {WEIGHTS_NAME} "
            "because unpickling can run arbitrary code. Convert them to safetensors first."
        )
    raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}")


def load_vlm(path: str | Path, device: str | torch.device | None = None):
    """Rebuild a VLM from a checkpoint directory, offline, and load its weights strictly."""
    from safetensors.torch import load_model

    from mmlm.modeling.vlm import VLM

    config = read_config(path)
    weights = weights_file(path)
    config = config.updated(vision={"pretrained": False, "checkpoint_path": None}, text={"pretrained": False})
    vlm = VLM(config)
    try:
        missing, unexpected = load_model(vlm, str(weights), strict=False, device=str(device or "cpu"))
    except RuntimeError as e:  # tensors whose shapes differ from config.json's model: torch's many-line report
        sizes = [line.strip() for line in str(e).splitlines() if line.strip().startswith("size mismatch")]
        if not sizes:
            raise
        raise ValueError(f"{weights} does not match its config: {len(sizes)} tensor(s) of another shape, "
                         f"e.g. {sizes[0]}") from None
    except Exception as e:  # safetensors' own error (a truncated or damaged file) is no RuntimeError
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{weights} cannot be read ({e}): a damaged or half-copied checkpoint") from None
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if device is not None:
        vlm.to(device)
    return vlm.eval()
