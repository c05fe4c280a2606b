"""Set-up checks of a training run: small pure functions that fail loudly (or name what changed) before
the first step, where a mismatch would otherwise train silently wrong or die mid-step.

- ``check_normalization``: the model's on-device normalisation of uint8 batches = the processor's;
- ``check_attention_trains_on``: the LM's attention kernel has a backward pass on the device;
- ``check_packing``: packed rows and the model's image positions can go together;
- ``hparam_changes``: the ``VLMModule`` arguments a resumed run changes from its checkpoint's run.
"""

from __future__ import annotations

import torch


def check_normalization(vlm, processor) -> None:
    """The model normalises uint8 batches with its own ``image_transform()`` mean/std, the processor
    normalises float pixel values (``describe``, ``eval``) with its config's: they must agree, or
    training and inference would feed the encoder differently normalised images."""
    mine, theirs = vlm.image_transform(), processor.config.image_transform
    if (tuple(mine.mean), tuple(mine.std)) != (tuple(theirs.mean), tuple(theirs.std)):
        raise ValueError(f"the processor normalises images with mean={theirs.mean} std={theirs.std} but the model "
                         f"with mean={mine.mean} std={mine.std}: fix image_transform in processor_config.json or in "
                         "the vision config so that they agree")


def check_packing(vlm, packing: bool) -> None:
    """Packed rows mark their samples' boundaries with restarting position ids, which a model with
    ``image_positions: shared`` (every token of an image at one position) cannot share: refused before
    any data is read rather than in the first forward."""
    if packing and vlm.config.image_positions == "shared":
        raise ValueError("data.packing true cannot train a model with shared image positions (image_positions: "
                         "shared): transformers reads the packed samples' boundaries from the positions; train "
                         "with --data.packing false")


def hparam_changes(saved: dict, current: dict) -> list[str]:
    """``"name: current (checkpoint: saved)"`` for each ``VLMModule`` argument that differs between a
    checkpoint's run and this one (Lightning's bookkeeping keys, ``_...``, left out)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith("_"):
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, tuple | list) and isinstance(new, tuple | list):
            old, new = list(old), list(new)
        if old != new:
            out.append(f"{key}: {new!r} (checkpoint: {old!r})")
    return out


def check_attention_trains_on(vlm, device: torch.device) -> None:
    """FlexAttention has no backward pass on a CPU in torch, and every training stage backpropagates
    through the LM's attention (the align stage too, to reach the projector): refuse up front rather
    than fail in the first step's backward."""
    attn = getattr(vlm.lm.config, "_attn_implementation", None)
    if attn == "flex_attention" and torch.device(device).type == "cpu":
        raise ValueError("flex_attention trains on a GPU only (torch has no FlexAttention backward on a CPU): set "
                         "--model.model_overrides.text.attn_implementation sdpa (or eager)")
