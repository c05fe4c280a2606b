"""Safe image decoding: untrusted bytes -> an RGB ``PIL.Image`` or a :class:`BadSample`.

Contract of :func:`decode_image`:

* Only the formats in ``formats`` are tried (default JPEG, PNG, WEBP: what the shard schema
  allows); anything else, or bytes PIL cannot identify, is ``corrupt_image``.
* Decompression bombs: the pixel count (``width * height``, read from the header before any pixel
  is decoded) above ``max_pixels`` (default 89,478,485, PIL's own ``Image.MAX_IMAGE_PIXELS``) is
  ``huge_image``. The check is per call: global PIL state (``Image.MAX_IMAGE_PIXELS``,
  ``ImageFile.LOAD_TRUNCATED_IMAGES``) is never changed; PIL's ``DecompressionBombWarning`` is
  silenced inside the call and its ``DecompressionBombError`` (past twice PIL's global limit, which
  therefore still caps ``max_pixels``) is also reported as ``huge_image``.
* Truncated data is ``truncated_image`` (never silently padded with grey); any other decoder error
  is ``corrupt_image``. Errors name the sample key and carry the decoder's message.
* EXIF orientation is applied (``ImageOps.exif_transpose``; an unreadable EXIF block is ignored).
* Every mode becomes RGB (:func:`to_rgb`): ``1``/``L``/``CMYK``/``YCbCr``/... convert as PIL does;
  modes with alpha (``LA``, ``RGBA``, ``PA``, ``P`` or ``L``/``RGB`` with a transparency key) are
  alpha-composited **on white** (a transparent logo reads as a logo on a page; dropping alpha
  would leave whatever colour the transparent pixels happen to store, often black);
  high-bit-depth modes (``I;16*``, ``I``, ``F``) are scaled to 8 bits (see :func:`_to_8bit`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmlm.data.errors import CORRUPT_IMAGE, HUGE_IMAGE, TRUNCATED_IMAGE, BadSample

__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_FORMATS", "WHITE", "decode_image", "to_rgb"]

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (0.25 GiB of 24-bit pixels)
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
WHITE = (255, 255, 255)


def decode_image(data: bytes, *, key: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 formats: Sequence[str] | None = DEFAULT_FORMATS, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Encoded image bytes -> a fully loaded RGB image; raises :class:`BadSample` (see module doc)."""
    if not data:
        raise BadSample(key, CORRUPT_IMAGE, "empty image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
    except Image.DecompressionBombError as e:
        raise BadSample(key, HUGE_IMAGE, str(e)) from None
    except UnidentifiedImageError:
        allowed = "/".join(formats) if formats else "any format"
        raise BadSample(key, CORRUPT_IMAGE, f"not a decodable image ({allowed})") from None
    except Exception as e:  # untrusted bytes: any decoder failure is a bad sample
        raise BadSample(key, CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
    width, height = im.size
    if width < 1 or height < 1:
        raise BadSample(key, CORRUPT_IMAGE, f"image has size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise BadSample(key, HUGE_IMAGE, f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    try:
        im.load()
    except OSError as e:
        reason = TRUNCATED_IMAGE if "truncat" in str(e).lower() else CORRUPT_IMAGE
        raise BadSample(key, reason, f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise BadSample(key, CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
    try:
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an upright image
    except Exception:  # a broken EXIF block does not make the pixels bad
        pass
    try:
        return to_rgb(im, background)
    except Exception as e:
        raise BadSample(key, CORRUPT_IMAGE, f"cannot convert mode {im.mode} to RGB ({type(e).__name__}: {e})") from None


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> RGB; alpha composited on ``background``; 16-bit/int/float scaled to 8 bits."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        im = _to_8bit(im)  # -> "L"
        mode = "L"
    has_key = "transparency" in im.info
    if mode == "RGB" and not has_key:
        return im
    if mode in ("P", "L", "RGB") and has_key:
        im, mode = im.convert("RGBA"), "RGBA"
    elif mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """``I;16*`` -> /257; ``I``: kept if already in 0..255, /257 if in 0..65535, else min-max;
    ``F``: x255 if in 0..1, kept if in 0..255, else min-max. Returns mode ``L``."""
    arr = np.asarray(im).astype(np.float64)  # (H, W)
    arr = np.where(np.isfinite(arr), arr, 0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        arr = arr / 257.0
    elif im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif im.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        arr = arr / 257.0
    else:
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
