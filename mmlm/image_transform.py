"""The image transform: a PIL image -> the encoder's square input, as ``ImageTransformConfig`` says.

:class:`ImageTransform` resizes and centre-crops or pads (``squash``/``crop``/``pad``), then normalises
(``__call__``: float32 (3, S, S)) or not (``to_uint8``: the fitted RGB image, uint8, which the model
normalises on its device, see ``mmlm.pixels``). ``fit`` is the PIL reference (timm's eval transform);
``to_uint8`` runs bilinear/bicubic downscales with torch's vectorised antialiased uint8 kernel where
``resize_kernel`` picks it (:func:`torch_resize_is_fast`), in PIL's pass order
(:func:`pil_resizes_vertically_first`): 99.8% of values equal to PIL's, none more than 2/255 apart.
Upscales, crops past the edge, nearest and lanczos go through PIL.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

from mmlm.config import ImageTransformConfig
from mmlm.data.decode import to_rgb
from mmlm.pixels import normalize_pixels

__all__ = ["ImageTransform", "pil_resizes_vertically_first", "torch_resize_is_fast"]

_PIL_MAJOR = int(PIL.__version__.split(".")[0])
_TORCH_RESIZE = ("bilinear", "bicubic")  # modes torch resamples as PIL does (antialiased)
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@functools.cache
def torch_resize_is_fast() -> bool:
    """Whether torch runs its vectorised antialiased uint8 resize here: x86 CPUs with AVX2 or
    AVX-512 (3-4x PIL's speed). Elsewhere its generic kernel is slower than PIL, so ``auto`` keeps PIL."""
    try:
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return False
        probe = torch.zeros(1, 8, 8, 3, dtype=torch.uint8).permute(0, 3, 1, 2)  # (1, 3, 8, 8), channels last
        for mode in _TORCH_RESIZE:  # a build without the uint8 antialiased kernels raises here
            F.interpolate(probe, size=(4, 4), mode=mode, antialias=True, align_corners=False)
        return True
    except Exception:  # an old or unusual build: keep PIL
        return False


def pil_resizes_vertically_first(w: int, h: int, new_w: int, new_h: int) -> bool:
    """Whether PIL's ``resize`` (w, h) -> (new_w, new_h) runs its vertical pass first. Pillow 13's
    ``ImagingResampleInner`` does when the height loses more than twice the pixels the width does;
    older Pillow always went horizontal first. The order moves values near 0/255 by a few levels."""
    return _PIL_MAJOR >= 13 and h - new_h > 0 and h - new_h > 2 * (w - new_w)


class ImageTransform:
    """PIL image -> normalised float tensor (3, size, size), as ``ImageTransformConfig`` says
    (``to_uint8``: the fitted RGB image as a uint8 tensor, not normalised).

    ``fit`` is the PIL reference (resize, crop or pad with PIL, as timm's eval transform);
    ``to_uint8`` resamples downscales with torch's antialiased uint8 kernel instead when
    ``resize_kernel`` picks it (same geometry and pass order; 99.8% of values equal to PIL's, none
    more than 2/255 apart; see ``torch_resize_is_fast``).
    """

    def __init__(self, cfg: ImageTransformConfig):
        if cfg.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {cfg.interpolation!r}; known: {sorted(_RESAMPLE)}")
        self.cfg = cfg
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
        kernel = cfg.resize_kernel
        if kernel == "auto":
            kernel = "torch" if torch_resize_is_fast() else "pil"
        self.torch_kernel = kernel == "torch" and cfg.interpolation in _TORCH_RESIZE
        """Whether ``to_uint8`` resamples with torch (``resize_kernel`` resolved on this machine)."""

    def plan(self, image: Image.Image) -> tuple[Image.Image, tuple[int, int], tuple[int, int, int, int] | None]:
        """The geometry: (the RGB image (:func:`mmlm.data.decode.to_rgb`), padded to a square in ``pad`` mode), the size (w, h) to
        resize it to, and the centre-crop box (left, top, right, bottom) after that, or None."""
        cfg, size = self.cfg, self.cfg.size
        image = to_rgb(image)  # as training and describe decode: alpha on white, 16-bit scaled (not clipped)
        if cfg.resize_mode == "pad":
            w, h = image.size
            if w != h:
                side = max(w, h)
                fill = tuple(int(m * 255) for m in cfg.mean)  # as LLaVA-1.5 / transformers
                canvas = Image.new("RGB", (side, side), fill)
                canvas.paste(image, ((side - w) // 2, (side - h) // 2))
                image = canvas
        if cfg.resize_mode == "crop":  # as timm/torchvision: Resize(floor(size / crop_pct)) + CenterCrop
            scale = math.floor(size / cfg.crop_pct)
            w, h = image.size
            new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
            left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
            return image, new, (left, top, left + size, top + size)
        return image, (size, size), None

    def fit(self, image: Image.Image) -> Image.Image:
        """Resize/crop/pad to the square input size (RGB, uint8), with PIL."""
        return self._fit_pil(*self.plan(image))

    def _fit_pil(self, image: Image.Image, new: tuple[int, int], box: tuple[int, int, int, int] | None) -> Image.Image:
        """``plan``'s geometry carried out with PIL."""
        if new != image.size:
            image = image.resize(new, _RESAMPLE[self.cfg.interpolation])
        return image.crop(box) if box is not None else image

    @staticmethod
    def _as_tensor(image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 (3, H, W), a channels-last view of an owned, writable array."""
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """The fitted RGB image as a uint8 (3, size, size) tensor (a channels-last view)."""
        if not self.torch_kernel:
            return self.to_uint8_pil(image)
        image, (w, h), box = self.plan(image)
        if w > image.width or h > image.height or (box is not None and (box[0] < 0 or box[1] < 0)):
            # an upscale (torch strays further from PIL there) or a crop past the edge: PIL's
            return self._as_tensor(self._fit_pil(image, (w, h), box))
        x = self._as_tensor(image)[None]  # (1, 3, H, W), channels last
        # PIL's antialiased filter, in two passes rounded to uint8 between them, in PIL's order
        W, H = image.size
        steps = [(h, W), (h, w)] if pil_resizes_vertically_first(W, H, w, h) else [(h, w)]  # torch: horizontal first
        for out in steps:
            if out != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=out, mode=self.cfg.interpolation, antialias=True, align_corners=False)
        x = x[0]  # (3, h, w), channels last
        if box is not None:
            left, top, right, bottom = box
            x = x[:, top:bottom, left:right]  # a view: the collate's stack copies it (no copy here)
        return x

    def to_uint8_pil(self, image: Image.Image) -> torch.Tensor:
        """``to_uint8`` with PIL resampling whatever ``resize_kernel`` says (the reference)."""
        return self._as_tensor(self.fit(image))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """(3, size, size) float32: ``(x / 255 - mean) / std`` (``mmlm.pixels.normalize_pixels``)."""
        return normalize_pixels(self.to_uint8(image), self._mean, self._std)
