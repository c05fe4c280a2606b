"""transformers CLIP / SigLIP vision towers behind the encoder interface (backend ``"hf"``).

``VisionConfig(backend="hf", name=NAME_OR_PATH, pretrained=True)`` takes the vision tower of
a transformers CLIP or SigLIP checkpoint (a full ``CLIPModel``/``SiglipModel`` or a vision-only
one), as LLaVA does (``checkpoint_path``, a local directory, replaces ``name`` as the source). Like ``TimmViTEncoder`` it offers ``embed_dim``, ``num_patches``,
``image_transform()`` and ``forward(pixel_values) -> (N, P, D)``:

- ``feature_layer`` counts like transformers' ``hidden_states`` (0 = embeddings, -1 = last
  layer, -2 = penultimate as LLaVA); layers after it are pruned, and so are the towers' final
  norm and pooling head (LLaVA reads ``hidden_states``, which never pass through them);
- ``drop_prefix_tokens`` drops CLIP's class token (SigLIP has none).

The transformers vision config travels in the mmlm config (``VisionConfig.hf_config``), so a saved
checkpoint rebuilds offline from ``config.json`` alone; when it is missing the encoder resolves
it from ``name`` and records it in the config it was given. The image transform is the family's
(CLIP: OpenAI mean/std, shorter side + centre crop; SigLIP: 0.5/0.5, squash) unless one is
recorded (``VisionConfig.image_transform``: ``resolve_hf_vision_config`` records the checkpoint's
``preprocessor_config.json`` there, whichever way the tower comes in); ``VisionConfig.resize_mode``
overrides the mode.

The module owns the tower's core (``self.tower``: embeddings, [pre-norm], encoder layers) under
names that do not depend on the transformers version, so checkpoints stay loadable.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mmlm.config import ImageTransformConfig, VisionConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# supported vision model_type -> the family's default image transform (as its image processor)
FAMILIES: dict[str, dict] = {
    "clip_vision_model": {
        "transform": {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "resize_mode": "crop",
                      "interpolation": "bicubic", "crop_pct": 1.0},
    },
    "siglip_vision_model": {
        "transform": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash",
                      "interpolation": "bicubic", "crop_pct": 1.0},
    },
}
# full (two-tower) model types -> their vision part
FULL_MODELS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
_DROP_KEYS = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")


# ------------------------------------------------------------------------------ config plumbing
def hf_vision_config(cfg: VisionConfig) -> dict:
    """The recorded transformers vision config dict of ``cfg`` ({} when not resolved yet)."""
    return dict(cfg.hf_config)


def record_hf_vision(cfg: VisionConfig, hf: dict, transform: dict | None = None) -> None:
    """Record the transformers vision config (and image transform) in ``cfg``, in place."""
    cfg.hf_config = hf
    if transform:
        cfg.image_transform = transform
    cfg.image_size = int(hf["image_size"])
    cfg.patch_size = int(hf["patch_size"])
    # the geometry fields mirror the tower's, so that config.json does not show the timm defaults
    for field, key in (("width", "hidden_size"), ("depth", "num_hidden_layers"), ("num_heads", "num_attention_heads")):
        if key in hf:
            setattr(cfg, field, int(hf[key]))


def config_object(data: dict):
    """A transformers vision ``PretrainedConfig`` from its dict."""
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if k not in _DROP_KEYS}
    model_type = data.pop("model_type", None)
    if model_type in FULL_MODELS:
        raise ValueError(f"expected a vision config, got a full {model_type!r} config")
    if model_type not in FAMILIES:
        raise ValueError(
            f"vision backend 'hf' supports transformers model types {sorted(FAMILIES)} "
            f"(CLIP and SigLIP vision towers), got {model_type!r}"
        )
    return AutoConfig.for_model(model_type, **data)


def _vision_part(config):
    """The vision config of a full CLIP/SigLIP config, or the config itself."""
    if getattr(config, "model_type", None) in FULL_MODELS:
        return config.vision_config
    return config


def checkpoint_transform(source: str, image_size: int) -> dict | None:
    """The image transform of ``source``'s own image processor (``preprocessor_config.json``) as
    ``VisionConfig.image_transform`` fields; None when it has none that mmlm can mirror (the family's apply)."""
    from transformers import AutoImageProcessor

    from mmlm.interop.import_ import _transform_from_image_processor  # lazily: mmlm.interop imports this module

    try:
        ip = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
        t = _transform_from_image_processor(ip, image_size)
    except (OSError, ValueError):  # no preprocessor_config.json, or one mmlm cannot mirror: family defaults
        return None
    return {"mean": list(t.mean), "std": list(t.std), "interpolation": t.interpolation,
            "resize_mode": t.resize_mode, "crop_pct": t.crop_pct}


def resolve_hf_vision_config(cfg: VisionConfig) -> VisionConfig:
    """A copy of ``cfg`` with the transformers vision config (and image transform) recorded,
    from ``name``/``checkpoint_path`` when not recorded yet; image_size/patch_size follow it.

    Resolving from the source also records the image transform of its own image processor
    (:func:`checkpoint_transform`; fields the user set in ``cfg.image_transform`` win), so that
    every way in (``vision_config_for``, a ``VisionConfig`` given to ``build_from_pretrained`` or to
    ``mmlm fit``'s ``model_overrides``, the encoder itself) normalises and resizes as the tower's own."""
    cfg = copy.deepcopy(cfg)
    hf = hf_vision_config(cfg)
    transform = dict(cfg.image_transform)
    if not hf:
        source = cfg.checkpoint_path or cfg.name
        if not source:
            raise ValueError("vision backend 'hf' needs vision.name (a CLIP/SigLIP hub name or local directory)")
        from transformers import AutoConfig

        config = _vision_part(AutoConfig.from_pretrained(source, trust_remote_code=False))
        hf = {k: v for k, v in config.to_dict().items() if k not in _DROP_KEYS}
    config_object(hf)  # validates the model type
    if not hf_vision_config(cfg):  # resolved from the source: its own image processor too (the user's fields win)
        transform = {**(checkpoint_transform(source, int(hf["image_size"])) or {}), **transform}
    record_hf_vision(cfg, hf, transform)
    return cfg


# ------------------------------------------------------------------------------ the encoder
class HFVisionEncoder(nn.Module):
    """A transformers CLIP/SigLIP vision tower behind the encoder interface."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import AutoModel

        from mmlm.modeling.vision import resolve_feature_block  # lazily: vision.py may import this module

        if not hf_vision_config(cfg):  # record the architecture so that the checkpoint rebuilds offline
            resolved = resolve_hf_vision_config(cfg)
            record_hf_vision(cfg, hf_vision_config(resolved), dict(resolved.image_transform))
        self.cfg = cfg
        hf = hf_vision_config(cfg)
        self.model_type = hf["model_type"]
        config = config_object(hf)
        if hasattr(config, "vision_use_head") and not cfg.pretrained:
            config.vision_use_head = False  # SigLIP's pooling head is never used (a checkpoint's is loaded as it
            # is, then dropped below: built without it, transformers reports its weights as UNEXPECTED)
        if cfg.pretrained:
            source = cfg.checkpoint_path or cfg.name
            if not source:
                raise ValueError("vision.pretrained=True needs vision.name (a hub name or local directory)")
            model = AutoModel.from_pretrained(source, config=config, dtype=torch.float32, trust_remote_code=False)
        else:
            model = AutoModel.from_config(config)
        tower = getattr(model, "vision_model", model)  # transformers < 5 nests the tower
        depth = len(tower.encoder.layers)
        self.depth = depth
        self.block_index = resolve_feature_block(cfg.feature_layer, depth)
        tower.encoder.layers = tower.encoder.layers[: self.block_index + 1]
        # Not needed for hidden states: the final norm (CLIP applies it to the pooled token only,
        # SigLIP to the whole last state that LLaVA never reads) and SigLIP's pooling head.
        if hasattr(tower, "post_layernorm"):
            tower.post_layernorm = nn.Identity()
        if getattr(tower, "head", None) is not None:
            tower.head = None
            if hasattr(tower, "use_head"):  # transformers 5.17 reads this flag, not `head is None`
                tower.use_head = False
        self.tower = tower
        emb = tower.embeddings
        self._num_patches = int(emb.num_patches)
        self.num_prefix_tokens = int(getattr(emb, "num_positions", emb.num_patches)) - self._num_patches
        self._image_size = int(config.image_size)
        self._patch_size = int(config.patch_size)
        self._embed_dim = int(config.hidden_size)

    # ---------------------------------------------------------------- interface
    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def num_patches(self) -> int:
        """Tokens per image that ``forward`` returns."""
        return self._num_patches + (0 if self.cfg.drop_prefix_tokens else self.num_prefix_tokens)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self._image_size // self._patch_size
        return (side, side)

    @property
    def num_layers(self) -> int:
        """Layers kept (the feature layer is the last of them)."""
        return self.block_index + 1

    def pruned_hf_config(self) -> dict:
        """The transformers config of the tower as kept: its last layer is the feature layer."""
        hf = hf_vision_config(self.cfg)
        hf["num_hidden_layers"] = self.num_layers
        if "vision_use_head" in hf or self.model_type == "siglip_vision_model":
            hf["vision_use_head"] = False
        return hf

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the tower's layers in the backward pass (as timm's ``set_grad_checkpointing``)."""
        if enable and hasattr(self.tower, "gradient_checkpointing_enable"):
            self.tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif not enable and hasattr(self.tower, "gradient_checkpointing_disable"):
            self.tower.gradient_checkpointing_disable()
        else:
            self.tower.encoder.gradient_checkpointing = enable

    def image_transform(self) -> ImageTransformConfig:
        """The family's (or the checkpoint's recorded) transform; ``resize_mode`` (and a
        ``resize_kernel`` in ``image_transform``) override."""
        t = {**FAMILIES[self.model_type]["transform"], **self.cfg.image_transform}
        mode = self.cfg.resize_mode or t["resize_mode"]
        return ImageTransformConfig(
            size=self._image_size, resize_mode=mode, mean=tuple(t["mean"]), std=tuple(t["std"]),
            interpolation=t["interpolation"], crop_pct=float(t.get("crop_pct", 1.0)) if mode == "crop" else 1.0,
            resize_kernel=t.get("resize_kernel", "auto"),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, D): the feature layer's hidden states (prefix tokens dropped
        when configured). With the final norm pruned, the last state is that hidden state."""
        out = self.tower(pixel_values=pixel_values)  # a ModelOutput (transformers 4.x takes no return_dict here)
        feats = out.last_hidden_state  # (N, prefix + P, D)
        if self.cfg.drop_prefix_tokens and self.num_prefix_tokens:
            feats = feats[:, self.num_prefix_tokens:]
        return feats
