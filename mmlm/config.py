"""Typed model configs: what a VLM is made of, and nothing about how it is trained.

A ``VLMConfig`` is three parts plus the glue between them:

- ``VisionConfig``: a timm ViT, by name (optionally pretrained) or built from explicit sizes;
- ``ProjectorConfig``: which projector maps patch features into the LM's embedding space;
- ``TextConfig``: any transformers causal LM, as a full ``hf_config`` dict (so a checkpoint
  rebuilds offline) plus the hub name/path its pretrained weights come from.

Configs are plain dataclasses with attribute docstrings (they become CLI help). They
round-trip through ``to_dict``/``from_dict``; an unknown key fails with the known ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise with the list of known ones."""
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**data)


RESIZE_MODES = ("squash", "crop", "pad")
RESIZE_KERNELS = ("auto", "pil", "torch")


@dataclass
class ImageTransformConfig:
    """What the processor does to an image before the encoder sees it."""

    size: int
    resize_mode: str = "squash"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    """For ``crop``: resize the shorter side to size / crop_pct, then centre-crop ``size``."""
    resize_kernel: str = "auto"
    """Which code resamples (``bilinear``/``bicubic``; ``nearest``/``lanczos`` are always PIL's):
    ``pil`` (PIL's ``Image.resize``, exactly what timm/torchvision eval transforms compute),
    ``torch`` (torch's antialiased uint8 ``interpolate`` for downscales, PIL's filter and pass order;
    3-4x faster on x86 CPUs with AVX2; 99.8% of values equal to PIL's, none more than 2/255 apart)
    or ``auto`` (``torch`` where torch has that vectorised kernel, i.e. an AVX2/AVX-512 CPU, else ``pil``)."""

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}; known: {list(RESIZE_MODES)}")
        if self.resize_kernel not in RESIZE_KERNELS:
            raise ValueError(f"unknown resize_kernel {self.resize_kernel!r}; known: {list(RESIZE_KERNELS)}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std take one value per RGB channel (3 each), got mean={list(self.mean)}, "
                             f"std={list(self.std)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0 per channel, got {list(self.std)}")
        if not self.crop_pct > 0:
            raise ValueError(f"crop_pct must be > 0, got {self.crop_pct}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageTransformConfig":
        return _from_dict(cls, data, "image transform config")


@dataclass
class VisionConfig:
    """The image encoder: a timm Vision Transformer."""

    backend: str = "timm"
    """Which encoder family builds it: ``timm`` (any timm ViT) or ``hf`` (a transformers
    CLIP/SigLIP vision tower; see ``mmlm.modeling.vision.VISION_ENCODERS``)."""
    name: str | None = None
    """timm model name (e.g. ``vit_small_patch16_224.augreg_in21k``). None builds a plain ViT
    from the explicit sizes below (training from scratch)."""
    pretrained: bool = False
    """Load the pretrained weights of ``name`` (from the hub, or from ``checkpoint_path``)."""
    checkpoint_path: str | None = None
    """A local weights file (safetensors) for ``name`` instead of the hub."""
    image_size: int = 224
    """Input resolution in pixels (square). A named timm model keeps its own (recorded here when the model
    is built, with a warning if it differs); ``timm_kwargs={"img_size": N}`` runs it at another."""
    patch_size: int = 16
    """Patch size in pixels; the encoder yields (image_size / patch_size)^2 patch tokens (a named timm
    model: its own, as ``image_size``)."""
    width: int = 384
    """Embedding width of a from-scratch ViT (ignored when ``name`` is set)."""
    depth: int = 12
    """Number of transformer blocks of a from-scratch ViT."""
    num_heads: int = 6
    """Attention heads of a from-scratch ViT."""
    mlp_ratio: float = 4.0
    """MLP hidden size as a multiple of ``width`` (from-scratch ViT)."""
    class_token: bool = True
    """Whether a from-scratch ViT has a class token."""
    reg_tokens: int = 0
    """Register tokens of a from-scratch ViT."""
    stem: str = "patch"
    """Patch embedding of a from-scratch ViT: ``patch`` (one strided conv, as in ViT) or
    ``conv`` (a stack of 3x3 stride-2 convs, which learns faster from scratch)."""
    feature_layer: int = -2
    """Which block's output feeds the projector, counted like transformers' ``hidden_states``
    (index 0 = embeddings, -1 = last block, -2 = penultimate block as in LLaVA)."""
    drop_prefix_tokens: bool = True
    """Drop class/register tokens from the features (LLaVA's ``default`` strategy)."""
    resize_mode: str | None = None
    """How images are fitted to the square input: ``squash``, ``crop`` (resize shorter side then
    centre crop), or ``pad`` (pad to square with the mean colour, as LLaVA-1.5). None: from the
    timm pretrained config (``crop`` when its crop_pct < 1, else ``squash``)."""
    timm_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``dynamic_img_size``)."""
    hf_config: dict = field(default_factory=dict)
    """Backend ``hf``: the transformers vision config as a dict (``clip_vision_model`` /
    ``siglip_vision_model``), recorded from ``name`` so a checkpoint rebuilds offline."""
    image_transform: dict = field(default_factory=dict)
    """Overrides of the encoder's image transform (mean, std, interpolation, resize_mode,
    crop_pct); backend ``hf`` records its checkpoint's preprocessing here."""

    def __post_init__(self) -> None:
        if self.resize_mode is not None and self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown vision resize_mode {self.resize_mode!r}; known: {list(RESIZE_MODES)} "
                             "(or None: from the encoder's pretrained config)")
        if not isinstance(self.image_transform, dict):
            raise TypeError(f"vision image_transform: expected a mapping, got {type(self.image_transform).__name__}")
        known = [f.name for f in dataclasses.fields(ImageTransformConfig)]
        unknown = sorted(set(self.image_transform) - set(known))
        if unknown:
            raise ValueError(f"vision image_transform: unknown key(s) {unknown}; known keys: {sorted(known)}")

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        return _from_dict(cls, data, "vision config")


@dataclass
class ProjectorConfig:
    """Maps (N, P, D_vision) patch features to (N, T, D_text) image tokens."""

    name: str = "mlp2x_gelu"
    """Registered projector: ``linear``, ``mlp2x_gelu`` (LLaVA-1.5) or ``pixel_shuffle``
    (merges r x r neighbouring patches, T = P / r^2, then an MLP, as SmolVLM/Idefics3)."""
    pixel_shuffle_factor: int = 2
    """r for ``pixel_shuffle``: the token count shrinks by r^2."""
    hidden_dim: int | None = None
    """Hidden width of the MLP projectors; None uses the LM's hidden size."""
    position_embedding: bool = False
    """Add a learned embedding per image token (its place in the patch grid) to the projector's output,
    so the LM can read where a token lies from the token itself rather than from its offset. A vision
    encoder trained from scratch keeps it poorly: a linear probe reads a token's cell from the ``tiny``
    preset's captioning-stage tokens at 57-64% (99% with this). Not exportable to transformers' LLaVA."""
    position_embedding_std: float = 0.02
    """Standard deviation of the position embedding's random init (0.02: timm's ``pos_embed``, the scale of
    an LM's token embeddings). A from-scratch projector's tokens are far larger (per-dimension std ~0.9 in
    the ``tiny`` preset), so at 0.02 the place is a faint part of each token; a std near the tokens' own
    makes it as loud as their content from the first step."""

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectorConfig":
        return _from_dict(cls, data, "projector config")


@dataclass
class TextConfig:
    """The decoder: any transformers causal LM."""

    hf_config: dict = field(default_factory=dict)
    """The transformers config as a dict (must hold ``model_type``). It fully defines the
    architecture, so a saved VLM rebuilds offline. Filled from ``name`` when empty."""
    name: str | None = None
    """Hub name or local path of the LM (e.g. ``HuggingFaceTB/SmolLM2-135M``): where the
    architecture (when ``hf_config`` is empty) and pretrained weights come from."""
    pretrained: bool = False
    """Load the pretrained weights from ``name``; otherwise random init from ``hf_config``."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: ``sdpa``, ``eager``, ``flash_attention_2``, ..."""

    @classmethod
    def from_dict(cls, data: dict) -> "TextConfig":
        return _from_dict(cls, data, "text config")


@dataclass
class VLMConfig:
    """A whole vision-language model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """The image encoder."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """The vision-to-text projector."""
    text: TextConfig = field(default_factory=TextConfig)
    """The language model."""
    image_token_id: int = -1
    """Token id of the ``<image>`` placeholder; the processor sets it from its tokenizer. -1: not set yet (a
    model built without a tokenizer runs text only; ``Processor.for_model`` and images refuse it)."""
    ignore_index: int = -100
    """Label value excluded from the loss."""
    image_positions: str = "sequential"
    """Rotary positions of the image tokens in the LM: ``sequential`` (one each, as LLaVA) or ``shared``
    (all tokens of an image at its first token's position, the text after it one past; needs
    ``projector.position_embedding``, which then alone says where a token lies). With ``shared`` a question
    finds an image token by its content, not by content and offset: the ``tiny`` quickstart's question
    stages learn their lookups far sooner. Not exportable to transformers' LLaVA."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VLMConfig":
        data = dict(data)
        data.pop("mmlm_version", None)
        data.pop("format", None)
        parts = {
            "vision": VisionConfig.from_dict(data.pop("vision", {})),
            "projector": ProjectorConfig.from_dict(data.pop("projector", {})),
            "text": TextConfig.from_dict(data.pop("text", {})),
        }
        return _from_dict(cls, {**data, **parts}, "model config")

    def updated(self, **overrides: Any) -> "VLMConfig":
        """A copy with overrides; sub-configs take dicts that are merged key by key,
        e.g. ``cfg.updated(image_token_id=5, text={"hf_config": {"vocab_size": 512}})``.

        Except where a merge would mix two architectures: an ``hf_config`` whose ``model_type`` differs
        from the current one replaces it whole (a Llama preset's ``hidden_size``/``num_hidden_layers``
        would otherwise override a GPT-2's ``n_embd``/``n_layer`` through transformers' attribute map),
        and a ``text.name`` of another LM without an ``hf_config`` clears it, so the architecture comes
        from that LM (``TextConfig.hf_config``: "filled from name when empty"), not from the preset's."""
        data = self.to_dict()
        for part in ("vision", "text"):
            new = overrides.get(part)
            if dataclasses.is_dataclass(new) and not isinstance(new, type):
                new = dataclasses.asdict(new)
            if not isinstance(new, dict):
                continue
            old = data[part]
            new_hf = new.get("hf_config")
            if isinstance(new_hf, dict) and new_hf.get("model_type") not in (None, old["hf_config"].get("model_type")):
                old["hf_config"] = {}
            elif part == "text" and new.get("name") and new["name"] != old["name"] and "hf_config" not in new:
                old["hf_config"] = {}
        deep_merge(data, overrides)
        return VLMConfig.from_dict(data)


def deep_merge(base: dict, overrides: dict) -> None:
    """Merge ``overrides`` into ``base`` in place, key by key: nested mappings merge, anything else
    (dataclasses as their dicts) replaces."""
    for key, value in overrides.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
