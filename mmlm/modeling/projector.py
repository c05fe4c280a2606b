"""Projectors: vision features (N, P, D_v) -> image tokens (N, T, D_t) in the LM's space.

The registry ``PROJECTORS`` is a plain dict name -> class; ``build_projector`` fails on an
unknown name with the list of known ones. Each projector reports ``num_tokens(P)``, the
number of image tokens it emits for P patches: the processor expands ``<image>`` to it.

With ``ProjectorConfig.position_embedding`` a projector adds a learned (T, D_t) embedding to its
output, one vector per image token: the token's place in the image, readable from the token itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmlm.config import ProjectorConfig


class Projector(nn.Module):
    """Base: ``num_tokens(P)`` and the optional learned position embedding (``_place``)."""

    def __init__(self, cfg: ProjectorConfig, text_dim: int, num_patches: int):
        super().__init__()
        self.position_embedding: nn.Parameter | None = None
        if cfg.position_embedding:
            # default std 0.02: ViT-style (timm's pos_embed), the scale of the LM's token embeddings
            std = cfg.position_embedding_std
            if not std >= 0:
                raise ValueError(f"projector.position_embedding_std must be >= 0, got {std!r}")
            self.position_embedding = nn.Parameter(torch.randn(self.num_tokens(num_patches), text_dim) * std)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def _place(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D_t) -> the same plus each token's position embedding, when there is one."""
        if self.position_embedding is None:
            return x
        if x.shape[1] != self.position_embedding.shape[0]:
            raise ValueError(f"the projector's position embedding has {self.position_embedding.shape[0]} "
                             f"tokens but the image gives {x.shape[1]}: the patch count is fixed at build time")
        return x + self.position_embedding.to(x.dtype)


class LinearProjector(Projector):
    """One linear map (LLaVA-1.0)."""

    def __init__(self, cfg: ProjectorConfig, vision_dim: int, text_dim: int, num_patches: int):
        super().__init__(cfg, text_dim, num_patches)
        self.proj = nn.Linear(vision_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._place(self.proj(x))  # (N, P, D_t)


class MLP2xGeluProjector(Projector):
    """Linear -> GELU -> Linear (LLaVA-1.5's ``mlp2x_gelu``)."""

    def __init__(self, cfg: ProjectorConfig, vision_dim: int, text_dim: int, num_patches: int):
        super().__init__(cfg, text_dim, num_patches)
        hidden = cfg.hidden_dim or text_dim
        self.linear_1 = nn.Linear(vision_dim, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._place(self.linear_2(self.act(self.linear_1(x))))  # (N, P, D_t)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Merge each r x r block of a square patch grid into one token (space-to-depth).

    (N, P, D) -> (N, P / r^2, D * r^2), as Idefics3/SmolVLM's connector.
    """
    n, p, d = x.shape
    side = math.isqrt(p)
    if side * side != p or side % factor:
        raise ValueError(f"pixel_shuffle needs a square grid divisible by {factor}, got {p} patches")
    s = side // factor
    x = x.reshape(n, s, factor, s, factor, d)  # (N, s, r, s, r, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, s, s, r, r, D)
    return x.reshape(n, s * s, factor * factor * d)


class PixelShuffleProjector(Projector):
    """Pixel shuffle by r, then Linear -> GELU -> Linear: r^2 fewer tokens."""

    def __init__(self, cfg: ProjectorConfig, vision_dim: int, text_dim: int, num_patches: int):
        if cfg.pixel_shuffle_factor < 1:
            raise ValueError(f"pixel_shuffle_factor must be >= 1, got {cfg.pixel_shuffle_factor}")
        self.factor = cfg.pixel_shuffle_factor
        side = math.isqrt(num_patches)
        if side * side != num_patches or side % self.factor:
            raise ValueError(f"pixel_shuffle needs a square patch grid whose side is divisible by "
                             f"pixel_shuffle_factor={self.factor}, got {num_patches} patches (class/register tokens "
                             "count unless vision.drop_prefix_tokens)")
        super().__init__(cfg, text_dim, num_patches)
        hidden = cfg.hidden_dim or text_dim
        self.linear_1 = nn.Linear(vision_dim * self.factor**2, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, text_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches // self.factor**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(x, self.factor)  # (N, P / r^2, D_v r^2)
        return self._place(self.linear_2(self.act(self.linear_1(x))))  # (N, T, D_t)


PROJECTORS: dict[str, type[Projector]] = {
    "linear": LinearProjector,
    "mlp2x_gelu": MLP2xGeluProjector,
    "pixel_shuffle": PixelShuffleProjector,
}


def build_projector(cfg: ProjectorConfig, vision_dim: int, text_dim: int, num_patches: int) -> Projector:
    """The projector ``cfg.name`` for ``num_patches`` patch features of width ``vision_dim``."""
    if cfg.name not in PROJECTORS:
        raise ValueError(f"unknown projector {cfg.name!r}; known: {sorted(PROJECTORS)}")
    return PROJECTORS[cfg.name](cfg, vision_dim, text_dim, num_patches)
