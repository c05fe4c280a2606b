"""Regional ``torch.compile``: each transformer block compiled on its own, in place.

:func:`compile_blocks` calls ``nn.Module.compile`` on every LM decoder layer and every vision
encoder block, and compiles the loss of the labelled rows (output layer + float32 cross-entropy,
``VLM.projected_loss``, with dynamic row counts) so that the float32 logits are never written out.
Compiling blocks rather than the whole VLM keeps the image/text merge (data-dependent shapes) in
eager mode, compiles one block graph that every layer reuses (seconds, not minutes), and leaves
module names and ``state_dict`` keys unchanged, so checkpoints, export and resume work as without
it. What it buys is fused elementwise work (norms, rotary, activations, dtype casts) and a loss
that reads the bf16 logits instead of writing float32 ones: on an H100 the ``small`` preset's bf16
training step took 96 ms instead of 148 ms at 16 x 1024 tokens, and reached 40% MFU at 48 x 1024
(``benchmarks/mfu.py --compile``; results in ``benchmarks/results/``). On a CPU it made steps
slower, so the recipes leave it off. ``VLMModule(compile=True)`` (``--model.compile true``) applies
it after the stage's freezing, LoRA and activation checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlm.modeling.fusion import projected_cross_entropy

DEFAULT_BACKEND = "inductor"
_LAYER_LISTS = ("layers", "h", "blocks")  # Llama/Qwen/Mistral/Gemma..., GPT-2 style, others


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of a transformers causal LM's decoder layers (through a peft wrapper)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None  # None for GPT-2 in transformers 4.x
    for candidate in (decoder, getattr(base, "model", None), getattr(base, "transformer", None), base):
        for name in _LAYER_LISTS:
            layers = getattr(candidate, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers):
                return layers
    raise ValueError(f"compile: no decoder layers found in {type(base).__name__} "
                     f"(looked for a ModuleList named one of {list(_LAYER_LISTS)})")


def vision_blocks(vision: nn.Module) -> nn.ModuleList | None:
    """The vision encoder's blocks: timm's ``vit.blocks`` or a transformers tower's ``encoder.layers``."""
    vit = getattr(vision, "vit", None)
    if vit is not None and isinstance(getattr(vit, "blocks", None), nn.Sequential | nn.ModuleList):
        return vit.blocks
    tower = getattr(vision, "tower", None)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def compile_blocks(vlm: nn.Module, backend: str | None = None, **kwargs) -> int:
    """``torch.compile`` (in place) every LM decoder layer and vision block of ``vlm``, and its loss
    projection (``VLM.projected_loss``); returns how many were compiled. ``kwargs`` go to
    ``torch.compile`` (e.g. ``mode``)."""
    blocks = list(decoder_layers(vlm.lm))
    vblocks = vision_blocks(vlm.vision)
    if vblocks is not None:
        blocks += list(vblocks)
    for block in blocks:
        block.compile(backend=backend or DEFAULT_BACKEND, **kwargs)
    # the labelled rows' projection + float32 cross-entropy: their number changes every batch
    vlm.projected_loss = torch.compile(projected_cross_entropy, backend=backend or DEFAULT_BACKEND, dynamic=True,
                                       **kwargs)
    return len(blocks) + 1
