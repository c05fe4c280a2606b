"""AdamW parameter groups and the learning-rate schedule.

Parameter groups: the trainable parameters of ``vlm.vision``, ``vlm.projector`` and ``vlm.lm``
each get their own learning rate (``vision_lr`` / ``projector_lr`` / ``lm_lr``, each falling back
to ``lr``), split into a decayed and a non-decayed group. No weight decay on biases, norm weights
(any module whose class name contains ``Norm``), embeddings (``nn.Embedding``, and so the tied LM
head) and positional / class / register tokens (timm's ``pos_embed``, ``cls_token``, ``reg_token``),
nor on any parameter with fewer than two dimensions. Every group carries ``name`` (e.g.
``lm.decay``) and ``component`` (``vision`` | ``projector`` | ``lm``) for logging.

Schedule: linear warmup from 0 then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``
(transformers' ``get_cosine_schedule_with_warmup`` with a floor). ``warmup`` is a fraction of
``total_steps`` when < 1, else a number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

COMPONENTS = ("vision", "projector", "lm")
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "position_embedding", "dist_token", "mask_token")


_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module")


def component_of(name: str) -> str:
    """``vision`` | ``projector`` | ``lm`` for a parameter name of a VLM (wrapper prefixes skipped)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    head = parts[0] if parts else name
    if head not in COMPONENTS:
        raise ValueError(f"parameter {name!r} belongs to no known component {COMPONENTS}")
    return head


def no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that get no weight decay (biases, norms, embeddings, positional tokens, 1-D)."""
    ids: set[int] = set()
    for mod_name, module in model.named_modules():
        is_norm = "Norm" in type(module).__name__
        is_embedding = isinstance(module, nn.Embedding)
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if (is_norm or is_embedding or p.ndim < 2 or p_name == "bias"
                    or any(t in full for t in _NO_DECAY_NAMES)):
                ids.add(id(p))
    return ids


def param_groups(
    vlm: nn.Module,
    *,
    lr: float,
    vision_lr: float | None = None,
    projector_lr: float | None = None,
    lm_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """AdamW parameter groups of the trainable parameters (see the module docstring)."""
    lrs = {
        "vision": lr if vision_lr is None else vision_lr,
        "projector": lr if projector_lr is None else projector_lr,
        "lm": lr if lm_lr is None else lm_lr,
    }
    for comp, value in lrs.items():
        if not value > 0:
            raise ValueError(f"the {comp} learning rate must be > 0, got {value}")
    skip = no_decay_parameter_ids(vlm)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in vlm.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = id(p) not in skip and weight_decay > 0
        buckets.setdefault((component_of(name), decay), []).append(p)
    if not buckets:
        raise ValueError("no trainable parameters: check the training stage and LoRA settings")
    groups = []
    for comp in COMPONENTS:
        for decay in (True, False):
            params = buckets.get((comp, decay))
            if params:
                groups.append({
                    "params": params,
                    "lr": lrs[comp],
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{comp}.{'decay' if decay else 'no_decay'}",
                    "component": comp,
                })
    return groups


def build_optimizer(
    vlm: nn.Module,
    *,
    lr: float,
    vision_lr: float | None = None,
    projector_lr: float | None = None,
    lm_lr: float | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``fused=None`` uses torch's fused kernel when every
    trainable parameter is on a CUDA or CPU device (one kernel over all parameters instead of a
    loop of foreach ops: on the CPU, ~4x faster for the tiny preset), else the default foreach."""
    groups = param_groups(vlm, lr=lr, vision_lr=vision_lr, projector_lr=projector_lr, lm_lr=lm_lr,
                          weight_decay=weight_decay)
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def resolve_warmup(warmup: float, total_steps: int) -> int:
    """Warmup steps: a fraction of ``total_steps`` when ``warmup`` < 1, else a step count."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if warmup < 1:
        return int(round(warmup * total_steps))
    if warmup != int(warmup):
        raise ValueError(f"warmup >= 1 is a number of steps and must be whole, got {warmup}")
    return int(warmup)


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """The multiplier of the base lr at optimizer step ``step`` (for ``LambdaLR``)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def fn(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.03,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup + cosine decay, stepped once per optimizer step."""
    fn = warmup_cosine(total_steps, resolve_warmup(warmup, total_steps), min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
