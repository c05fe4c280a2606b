"""Which parts of a VLM train: training stages and optional LoRA on the language model.

Stages (LLaVA's recipe names):

- ``align``: only the projector trains (vision encoder and LM frozen): feature alignment on captions;
- ``instruct``: projector + LM train (vision encoder frozen): visual instruction tuning;
- ``full``: everything trains.

``lora`` (a dict of ``peft.LoraConfig`` arguments, e.g. ``{"r": 16, "lora_alpha": 32}``) wraps the
LM with LoRA adapters: the LM's own weights freeze and the adapters train (stage ``instruct`` or
``full``). It needs the optional ``peft`` package (``pip install "mmlm[peft]"``).

A component whose parameters are all frozen runs in eval mode while training
(:func:`frozen_modules` lists them; the LightningModule keeps them in eval mode), so dropout and
batch-norm statistics of a frozen encoder do not change either.
"""

from __future__ import annotations

import warnings

from torch import nn

STAGES = ("align", "instruct", "full")
TRAINABLE = {"align": ("projector",), "instruct": ("projector", "lm"), "full": ("vision", "projector", "lm")}
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def apply_stage(vlm: nn.Module, stage: str) -> None:
    """Set ``requires_grad`` on ``vlm.vision`` / ``vlm.projector`` / ``vlm.lm`` for ``stage``."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; known: {list(STAGES)}")
    for comp in ("vision", "projector", "lm"):
        getattr(vlm, comp).requires_grad_(comp in TRAINABLE[stage])


def apply_lora(vlm: nn.Module, lora: dict, stage: str) -> None:
    """Wrap ``vlm.lm`` with peft LoRA adapters (in place). Only the adapters of the LM train."""
    if stage == "align":
        raise ValueError("LoRA adapts the LM, which stage 'align' keeps frozen: use stage 'instruct' or 'full'")
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs the optional peft package: pip install 'mmlm[peft]' (or pip install peft)") from e
    if isinstance(vlm.lm, peft.PeftModel):
        return
    options = {**LORA_DEFAULTS, **dict(lora)}
    options.setdefault("task_type", "CAUSAL_LM")
    check_lora_targets(vlm.lm, options.get("target_modules"))
    try:
        config = peft.LoraConfig(**options)
    except TypeError as e:
        raise ValueError(f"bad LoRA option in {sorted(lora)}: {e}") from e
    with warnings.catch_warnings():  # peft reads the attribute transformers 5 deprecated: noise to the user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        vlm.lm = peft.get_peft_model(vlm.lm, config)


def check_lora_targets(lm: nn.Module, targets) -> None:
    """A list of LoRA ``target_modules`` names each one of ``lm``'s modules (a name or a name's last parts, as peft
    matches them); peft adapts the names that match and says nothing of a misspelt one while another matches.
    Raises ``ValueError`` naming the ones that match nothing and the LM's linear layers. A string (a regular
    expression, or ``all-linear``) is peft's to check."""
    if not isinstance(targets, (list, tuple)):
        return
    names = [n for n, _ in lm.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules()
                         if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ValueError(f"LoRA target_modules {missing} match no module of the LM; its linear layers are named "
                         f"{', '.join(linear)} (or target_modules: all-linear)")


def is_lora(vlm: nn.Module) -> bool:
    return type(vlm.lm).__module__.startswith("peft.")


def merge_lora(vlm: nn.Module) -> None:
    """Fold LoRA adapters into the LM weights (in place): the VLM becomes a plain one again."""
    if is_lora(vlm):
        vlm.lm = vlm.lm.merge_and_unload()


def configure_trainable(vlm: nn.Module, stage: str, lora: dict | None = None) -> None:
    """Apply ``stage`` then, when given, LoRA on the LM."""
    apply_stage(vlm, stage)
    if lora is not None:
        apply_lora(vlm, lora, stage)


def frozen_modules(vlm: nn.Module) -> list[nn.Module]:
    """The components (vision, projector, lm) that have parameters and none trainable."""
    out = []
    for comp in ("vision", "projector", "lm"):
        module = getattr(vlm, comp)
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(module)
    return out


def parameter_counts(vlm: nn.Module) -> dict[str, dict[str, int]]:
    """``{component: {"trainable": n, "frozen": n}}`` plus a ``total`` entry (shared tensors counted once)."""
    counts = {c: {"trainable": 0, "frozen": 0} for c in ("vision", "projector", "lm", "total")}
    seen: set[int] = set()
    for name, p in vlm.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = "trainable" if p.requires_grad else "frozen"
        counts[name.split(".", 1)[0]][key] += p.numel()
        counts["total"][key] += p.numel()
    return counts


def enable_activation_checkpointing(vlm: nn.Module) -> None:
    """Recompute activations in the backward pass: transformers' gradient checkpointing on the LM
    (non-reentrant) and timm's on the vision encoder when it trains."""
    lm = vlm.lm
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(base, "config"):
            base.config.use_cache = False
    if not any(p.requires_grad for p in vlm.vision.parameters()):
        return
    vit = getattr(vlm.vision, "vit", None)
    if vit is not None and hasattr(vit, "set_grad_checkpointing"):
        vit.set_grad_checkpointing(True)
    elif hasattr(vlm.vision, "set_grad_checkpointing"):  # transformers towers (backend "hf")
        vlm.vision.set_grad_checkpointing(True)
