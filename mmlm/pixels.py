"""Pixel normalisation, shared by the processor (on the CPU) and the model (on its device).

An image reaches the encoder as ``(x / 255 - mean) / std`` per channel, where ``x`` is the fitted
uint8 RGB image (``ImageTransform.fit``) and ``mean``/``std`` come from the model's
``ImageTransformConfig``: torchvision's ``ToTensor`` + ``Normalize``, as timm and transformers do.
Where it happens depends on the dtype of ``pixel_values``:

* float (``Processor.encode``'s default, and what ``describe``/``eval``/the API pass): normalised
  by the processor, the encoder gets them as they are;
* uint8 RGB (what the training data pipeline sends by default, ``StreamConfig.uint8_pixels``: a
  quarter of the bytes from the loader workers and in pinned memory): ``VLM.encode_images``
  normalises them on the model's device.

Both paths call :func:`normalize_pixels`, which always computes in float32 with true divisions
(never a multiplication by a reciprocal), so the encoder sees the same inputs either way and for
any model dtype: bit-identical on the CPU (tested), and on CUDA as far as its float32 division and
subtraction are correctly rounded (PyTorch does not build them with fast math). :func:`cat_pixel_values` batches samples' pixel values and
refuses a mix of the two kinds. This module needs torch only: ``mmlm.modeling`` (which must not
import the processor's PIL/tokenizer code) and ``mmlm.processing`` both import it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["PIXEL_DTYPES", "normalize_pixels", "check_pixel_dtype", "cat_pixel_values"]

PIXEL_DTYPES = ("float", "uint8")
"""What ``Processor.encode(pixel_dtype=...)`` may produce: normalised float32, or uint8 RGB."""


def _channels(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(3,) per-channel values -> a float32 (3, 1, 1) tensor on ``device`` (no copy when it is one)."""
    return torch.as_tensor(values, dtype=torch.float32, device=device).reshape(-1, 1, 1)


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 RGB ``(..., 3, H, W)`` -> ``(pixels / 255 - mean) / std`` per channel.

    Computed in float32 on ``pixels``' device (whatever torch's default dtype), then cast to
    ``dtype`` when given. ``mean``/``std``: three floats, or float32 tensors already on the device
    (what a caller that normalises often passes, to avoid a host-to-device copy per call).
    """
    if pixels.dtype != torch.uint8:
        raise ValueError(f"normalize_pixels takes uint8 RGB pixels, got {pixels.dtype}")
    device = pixels.device
    x = pixels.to(torch.float32)
    # a 0-dim tensor, not a Python scalar: CUDA divides by a scalar as a multiplication by its
    # reciprocal, which can differ from the CPU's division in the last bit
    x = x.div_(torch.full((), 255.0, dtype=torch.float32, device=device))
    x = x.sub_(_channels(mean, device)).div_(_channels(std, device))
    return x if dtype is None or dtype == torch.float32 else x.to(dtype)


def check_pixel_dtype(pixel_dtype: str) -> str:
    """``pixel_dtype`` if it is one of :data:`PIXEL_DTYPES`; a ValueError otherwise."""
    if pixel_dtype not in PIXEL_DTYPES:
        raise ValueError(f"pixel_dtype must be one of {PIXEL_DTYPES}, got {pixel_dtype!r}")
    return pixel_dtype


def cat_pixel_values(pixels: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The samples' pixel values (None: no image) -> one (N, 3, H, W) tensor, or None. All uint8 or
    all float: a mix would silently turn raw uint8 pixels into unnormalised floats."""
    pixels = [p for p in pixels if p is not None]
    if not pixels:
        return None
    dtypes = {p.dtype for p in pixels}
    if len(dtypes) > 1:
        raise ValueError(f"cannot batch pixel values of different dtypes {sorted(map(str, dtypes))}: encode every "
                         "sample with the same pixel_dtype")
    return torch.cat(pixels)
