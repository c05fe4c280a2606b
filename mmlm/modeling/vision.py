"""Vision encoders: images (N, 3, H, W) -> patch features (N, P, D).

An encoder is a small interface (prismatic style): ``embed_dim``, ``num_patches``,
``image_transform`` (what the processor must do to a PIL image) and ``forward``.
``TimmViTEncoder`` wraps any timm Vision Transformer, by name (optionally pretrained,
from the hub or a local file) or built from explicit sizes for training from scratch.
It returns the output of the configured block (``feature_layer``, counted like
transformers' ``hidden_states``), with class/register tokens dropped when configured.
Blocks past the feature layer are pruned: they would cost compute and never be used.
A named timm model keeps its own input and patch size (``timm_kwargs={"img_size": N}`` changes
them); configured ones that differ are replaced by the model's, with a warning, so that the
config (and ``config.json``) says what the model does (``mmlm fit`` fills them from the name when its
``model_overrides`` give none: ``mmlm.training.build.named_vision_geometry``). A local timm model is named
``local-dir:DIR`` (or ``DIR``) as timm names it: a directory with timm's ``config.json``
(``architecture``, ``model_args``, ``pretrained_cfg``) and its weights. SigLIP towers squash images
to the input size unless ``resize_mode`` says otherwise (timm records a generic centre crop for them).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from mmlm.config import ImageTransformConfig, VisionConfig


def timm_config_file(name: str) -> Path | None:
    """The timm ``config.json`` (one with ``architecture``) of a local model, named ``local-dir:DIR`` or
    ``DIR``; None for anything else (a timm or hub name, a transformers directory)."""
    path = Path(name[len("local-dir:"):] if name.startswith("local-dir:") else name).expanduser()
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return file if isinstance(data, dict) and "architecture" in data else None


def timm_source(name: str) -> str:
    """The name timm's ``create_model`` takes for ``name``: a directory holding a timm ``config.json``
    becomes ``local-dir:DIR`` (as timm names it); anything else stays as it is."""
    if not name.startswith("local-dir:") and timm_config_file(name) is not None:
        return "local-dir:" + str(Path(name).expanduser().resolve())
    return name


def is_siglip(name: str | None, pretrained_cfg: dict | None = None) -> bool:
    """Whether a timm model is a SigLIP tower: by its name, or (a local model, whose directory name says
    nothing) by the architecture its pretrained config records."""
    local = bool(name) and (name.startswith("local-dir:") or Path(name).expanduser().is_dir())
    arch = str((pretrained_cfg or {}).get("architecture") or "")
    return "siglip" in f"{'' if local else name or ''} {arch}".lower()


def resolve_feature_block(feature_layer: int, depth: int) -> int:
    """Map a transformers-style ``hidden_states`` index to a 0-based timm block index.

    hidden_states[0] is the embedding output and hidden_states[k] the output of block k-1,
    so -1 is the last block and -2 (LLaVA's default) the penultimate one.
    """
    pos = feature_layer + depth + 1 if feature_layer < 0 else feature_layer
    if not 1 <= pos <= depth:
        raise ValueError(
            f"feature_layer={feature_layer} is outside a {depth}-block encoder "
            f"(valid: 1..{depth} or -{depth}..-1)"
        )
    return pos - 1


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions down to the patch grid (Xiao et al., 2021, "Early
    convolutions help transformers see better"): (B, 3, H, W) -> (B, D, H/p, W/p)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        steps = int(math.log2(patch_size))
        if 2**steps != patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(steps):
            out = max(embed_dim // 2 ** (steps - 1 - i), 16)
            layers += [nn.Conv2d(chans, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
            chans = out
        layers.append(nn.Conv2d(chans, embed_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TimmViTEncoder(nn.Module):
    """Any timm ViT behind the encoder interface."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        self.cfg = cfg
        if cfg.name:
            kwargs = dict(cfg.timm_kwargs)
            if cfg.checkpoint_path:
                kwargs["pretrained_cfg_overlay"] = {"file": cfg.checkpoint_path}
            model = timm.create_model(timm_source(cfg.name), pretrained=cfg.pretrained, num_classes=0, **kwargs)
            if not isinstance(model, VisionTransformer) and not hasattr(model, "forward_intermediates"):
                raise ValueError(f"timm model {cfg.name!r} does not support forward_intermediates")
            native = (int(model.patch_embed.img_size[0]), int(model.patch_embed.patch_size[0]))
            if (cfg.image_size, cfg.patch_size) != native:
                warnings.warn(f"vision.image_size={cfg.image_size}, patch_size={cfg.patch_size} do not apply to timm "
                              f"model {cfg.name!r}: it takes {native[0]} px images in {native[1]} px patches, "
                              "recorded in the config (another resolution: vision.timm_kwargs={'img_size': N})",
                              stacklevel=2)
                cfg.image_size, cfg.patch_size = native  # config.json says what the model does
        else:
            model = VisionTransformer(
                img_size=cfg.image_size,
                patch_size=cfg.patch_size,
                embed_dim=cfg.width,
                depth=cfg.depth,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                class_token=cfg.class_token,
                reg_tokens=cfg.reg_tokens,
                no_embed_class=cfg.reg_tokens > 0,
                num_classes=0,
                global_pool="",
                **cfg.timm_kwargs,
            )
            if cfg.stem == "conv":
                model.patch_embed.proj = ConvStem(3, cfg.width, cfg.patch_size)
            elif cfg.stem != "patch":
                raise ValueError(f"unknown vision stem {cfg.stem!r}; known: ['patch', 'conv']")
        depth = len(model.blocks)
        self.block_index = resolve_feature_block(cfg.feature_layer, depth)
        model.prune_intermediate_layers([self.block_index], prune_norm=True, prune_head=True)
        self.vit = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        grid = model.patch_embed.grid_size
        self._num_patches = int(grid[0] * grid[1])
        self._image_size = int(model.patch_embed.img_size[0])

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_patches(self) -> int:
        """Tokens per image that ``forward`` returns."""
        return self._num_patches + (0 if self.cfg.drop_prefix_tokens else self.num_prefix_tokens)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.vit.patch_embed.grid_size)

    def image_transform(self) -> ImageTransformConfig:
        """The transform from timm's pretrained config (or ViT defaults from scratch), with
        ``VisionConfig.image_transform`` overrides applied. Without a ``resize_mode``, a named model
        centre-crops when timm records a ``crop_pct`` < 1, except SigLIP towers (:func:`is_siglip`),
        which squash as SigLIP's own preprocessing does (timm records its generic crop_pct=0.9 for them)."""
        pcfg = dict(getattr(self.vit, "pretrained_cfg", None) or {})
        mode = self.cfg.resize_mode
        if mode is None:
            crops = self.cfg.name and float(pcfg.get("crop_pct", 1.0)) < 1.0 and not is_siglip(self.cfg.name, pcfg)
            mode = "crop" if crops else "squash"
        fields = {"size": self._image_size, "resize_mode": mode}
        if self.cfg.name:
            fields.update(
                mean=tuple(pcfg.get("mean", (0.5, 0.5, 0.5))),
                std=tuple(pcfg.get("std", (0.5, 0.5, 0.5))),
                interpolation=str(pcfg.get("interpolation", "bicubic")),
                crop_pct=float(pcfg.get("crop_pct", 1.0)) if mode == "crop" else 1.0,
            )
        return ImageTransformConfig(**{**fields, **self.cfg.image_transform})

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, D) features of the configured block."""
        # timm pairs each intermediate with its prefix tokens only when the model has some: on a tower
        # without class/register tokens (SigLIP, ``class_token=False``) it returns the bare tensor
        keep_prefix = not self.cfg.drop_prefix_tokens and self.num_prefix_tokens > 0
        out = self.vit.forward_intermediates(
            pixel_values,
            indices=[self.block_index],
            return_prefix_tokens=keep_prefix,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
        if keep_prefix:
            spatial, prefix = out
            return torch.cat([prefix, spatial], dim=1)  # (N, prefix + P, D)
        return out  # (N, P, D)


from mmlm.modeling.hf_vision import HFVisionEncoder  # noqa: E402  (transformers loads lazily inside)

VISION_ENCODERS: dict[str, type[nn.Module]] = {"timm": TimmViTEncoder, "hf": HFVisionEncoder}


def build_vision_encoder(cfg: VisionConfig) -> nn.Module:
    """The encoder registered under ``cfg.backend``; an unknown backend lists the known ones."""
    if cfg.backend not in VISION_ENCODERS:
        raise ValueError(f"unknown vision backend {cfg.backend!r}; known: {sorted(VISION_ENCODERS)}")
    return VISION_ENCODERS[cfg.backend](cfg)
