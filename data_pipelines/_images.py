"""Image checking, re-encoding and loading for the shard builders in ``data_pipelines``.

Contract: every image that goes into a shard is first fully decoded once by PIL to prove it is
intact (:func:`decode_check`: open, pixel-count check and full load, the checks training's
``mmlm.data.decode.decode_image`` makes, so a builder keeps what training decodes: a PNG missing
only its ``IEND`` chunk is kept); an input that cannot be used raises
:class:`~data_pipelines._errors.SkipSample` with a short reason (``empty image``, ``not an image``,
``image too large``, ``undecodable image``, ``missing image``, ``unreadable image``) instead of
failing the run. jpg/png/webp bytes are stored as they are (no re-encode); other formats (gif,
bmp, tiff, ...) are re-encoded to PNG (32-bit integer and float images, which PNG cannot hold,
scaled to 8 bits as training's ``mmlm.data.decode.to_rgb`` scales them: a plain RGB conversion
turns a 0..1 float image black); ``--resize-max PX`` re-encodes images whose longer side exceeds
PX (EXIF orientation applied first, so the longer side is measured as displayed; JPEG/WEBP
quality 95, PNG lossless, same format as the input). A path that cannot be read (including one
with a NUL byte) is ``unreadable image``.
:func:`prepare_image_bytes` and :func:`load_image` return ``(bytes, ext)``. PIL is imported when
first used.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from ._errors import SkipSample

__all__ = ["FORMAT_EXT", "PIL_DEFAULT_MAX_PIXELS", "decode_check", "prepare_image_bytes", "load_image"]

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PIL_DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold


def decode_check(data: bytes, max_pixels: int = PIL_DEFAULT_MAX_PIXELS):
    """Fully decode ``data`` with PIL; return the loaded image or raise :class:`SkipSample`.

    More than ``max_pixels`` is ``image too large``; so is more than twice PIL's default limit
    (178,956,970 pixels: PIL's ``DecompressionBombError``) whatever ``max_pixels`` says."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise SkipSample("empty image")
    try:
        with warnings.catch_warnings():  # max_pixels decides, not PIL's warning at its own default
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # no ``im.verify()``: it rejects images training decodes (a PNG without IEND, a bad
            # chunk CRC); a full load is the check training's decode_image makes
            im = Image.open(io.BytesIO(data))
            if im.size[0] * im.size[1] > max_pixels:
                raise SkipSample("image too large", f"{im.size[0]}x{im.size[1]}")
            im.load()
            return im
    except SkipSample:
        raise
    except UnidentifiedImageError:
        raise SkipSample("not an image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise SkipSample("image too large", str(e)[:80]) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise SkipSample("undecodable image", f"{type(e).__name__}: {e}"[:120]) from None


def _encode(im, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        if im.mode not in ("RGB", "L", "CMYK"):
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=95)
    elif fmt == "WEBP":
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        im.save(buf, format="WEBP", quality=95)
    else:
        if im.mode in ("I", "F"):  # 32-bit int / float (TIFF): PNG has neither; scaled as training decodes them
            from mmlm.data.decode import to_rgb

            im = to_rgb(im)
        elif im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        im.save(buf, format="PNG")
    return buf.getvalue()


def prepare_image_bytes(
    data: bytes, *, resize_max: int | None = None, max_pixels: int = PIL_DEFAULT_MAX_PIXELS
) -> tuple[bytes, str]:
    """Check and normalise encoded image bytes; return ``(bytes, ext)``.

    jpg/png/webp under ``resize_max`` are returned unchanged; other formats become PNG; bigger
    images are downscaled (longer side = ``resize_max``) and re-encoded in their own format.
    """
    from PIL import Image, ImageOps

    im = decode_check(data, max_pixels)
    # PIL names a JPEG that carries extra pictures (phone photos with a depth map or gain map) MPO:
    # its bytes are a JPEG that every decoder reads, so it is stored as one, not re-encoded to PNG
    fmt = "JPEG" if im.format == "MPO" else im.format or ""
    ext = FORMAT_EXT.get(fmt)
    too_big = resize_max is not None and max(im.size) > resize_max
    if ext is not None and not too_big:
        return data, ext
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block: training's decode_image ignores it too
        pass
    try:
        w, h = im.size  # as displayed: a 90-degree EXIF rotation swaps the sides
        if too_big:
            scale = resize_max / max(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if im.mode in ("P", "1"):
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        out_fmt = fmt if ext is not None else "PNG"
        return _encode(im, out_fmt), FORMAT_EXT[out_fmt]
    except (OSError, ValueError) as e:
        raise SkipSample("undecodable image", f"re-encode failed: {e}"[:120]) from None


def load_image(
    path: Path, *, resize_max: int | None = None, max_pixels: int = PIL_DEFAULT_MAX_PIXELS
) -> tuple[bytes, str]:
    """Read and check an image file; :class:`SkipSample` ``missing image`` / ``unreadable image`` / ..."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing image", str(path)) from None
    except OSError as e:
        raise SkipSample("unreadable image", f"{path}: {e.strerror or e}") from None
    except ValueError as e:  # "embedded null byte": a path the OS cannot even be asked about
        raise SkipSample("unreadable image", f"{str(path)!r}: {e}"[:160]) from None
    return prepare_image_bytes(data, resize_max=resize_max, max_pixels=max_pixels)
