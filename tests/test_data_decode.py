"""Safe decoding (modes -> RGB, EXIF, pixel limits, truncated/undecodable) and the error budget."""

from __future__ import annotations

import io
import logging
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from mmlm.data.decode import DEFAULT_MAX_PIXELS, decode_image, to_rgb
from mmlm.data.errors import BadSample, DataErrorBudgetExceeded, ErrorBudget, budget_violation, classify


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(BadSample) as e:
        decode_image(data, key="k", **kw)
    assert e.value.key == "k"
    return e.value.reason


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (no pixel data needed to read the size)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_modes_become_rgb_with_alpha_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = decode_image(_encode(rgba))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    assert decode_image(_encode(Image.new("LA", (2, 2), (0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(_encode(Image.new("L", (3, 2), 7))).getpixel((0, 0)) == (7, 7, 7)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert decode_image(_encode(p)).getpixel((0, 0)) == (10, 20, 30)
    assert decode_image(_encode(p, transparency=1)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = cmyk.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    i16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert decode_image(_encode(i16)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F")).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.fromarray(np.array([[0, 1000]], dtype=np.int32), "I")).getpixel((1, 0)) == (4, 4, 4)
    assert decode_image(_encode(Image.new("1", (2, 2), 1))).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), "red")
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    out = decode_image(_encode(im, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 3))  # the left edge ends at the top
    assert b > 200 and r < 60


def test_pixel_limit_is_our_error_and_leaves_pil_alone():
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    assert _reason(_encode(Image.new("RGB", (50, 50))), max_pixels=2000) == "huge_image"
    decode_image(_encode(Image.new("RGB", (40, 50))), max_pixels=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail here
        assert _reason(_png_header_only(10_000, 10_000)) == "huge_image"  # > 89M: ours, before any decoding
        assert _reason(_png_header_only(20_000, 20_000)) == "huge_image"  # > 2 x PIL's limit: PIL's error, mapped
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_truncated_and_undecodable():
    noisy = _encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")
    assert _reason(noisy[: len(noisy) // 2]) == "truncated_image"
    png = _encode(Image.effect_noise((64, 64), 60).convert("RGB"))
    assert _reason(png[: len(png) // 2]) == "truncated_image"
    assert _reason(b"") == "corrupt_image"
    assert _reason(b"definitely not an image") == "corrupt_image"
    assert _reason(_encode(Image.new("RGB", (4, 4)), "GIF")) == "corrupt_image"  # not an allowed format
    assert decode_image(_encode(Image.new("RGB", (4, 4)), "WEBP")).size == (4, 4)


def test_error_budget_logs_each_skip_without_sleeping(monkeypatch, caplog):
    import time

    monkeypatch.setattr(time, "sleep", lambda *_: pytest.fail("the error handler must not sleep"))
    budget = ErrorBudget(max_bad_fraction=0.5, min_samples=4)
    with caplog.at_level(logging.WARNING, logger="mmlm.data"):
        budget.ok(3)
        budget.skip(BadSample("key1", "corrupt_image", "cannot identify"), url="a.tar")
        budget.skip(BadSample("key2", "empty_caption"))
    assert budget.counts == {"corrupt_image": 1, "empty_caption": 1} and budget.good == 3
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "'key1'" in msgs[0] and "a.tar" in msgs[0] and "corrupt_image" in msgs[0]
    budget.skip(BadSample("key3", "too_long"))  # 3 of 6 = 50%: not above
    with pytest.raises(DataErrorBudgetExceeded) as e:
        budget.skip(BadSample("key4", "too_long"))
    msg = str(e.value)
    assert "4 of 7 samples were bad" in msg and "too_long=2" in msg and "max_bad_fraction" in msg and "key4" in msg


def test_error_budget_logs_the_first_skips_of_a_reason_then_counts_quietly(caplog):
    from mmlm.data.errors import LOG_FIRST

    budget = ErrorBudget(max_bad_fraction=None)
    with caplog.at_level(logging.WARNING, logger="mmlm.data"):
        for i in range(LOG_FIRST + 5):
            budget.skip(BadSample(f"k{i}", "too_long"))
        budget.skip(BadSample("other", "corrupt_image"))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == LOG_FIRST + 2 and "the next ones are logged at DEBUG level only" in msgs[LOG_FIRST]
    assert "'other'" in msgs[-1] and budget.counts == {"too_long": LOG_FIRST + 5, "corrupt_image": 1}


def test_budget_rule_and_classification():
    assert budget_violation(10, 0, max_bad_fraction=0.0, max_bad=None, min_samples=0) is None
    assert budget_violation(90, 10, max_bad_fraction=0.05, max_bad=None, min_samples=200) is None  # too few seen
    assert budget_violation(90, 10, max_bad_fraction=0.05, max_bad=None, min_samples=100) is not None
    assert budget_violation(1000, 3, max_bad_fraction=None, max_bad=2, min_samples=100) is not None
    from mmlm.data.schema import SchemaError
    from mmlm.processing import ImageSpanTruncated

    assert classify(SchemaError("k", "empty caption")).reason == "empty_caption"
    assert classify(SchemaError("k", "bad json (x)")).reason == "schema_error"
    assert classify(ImageSpanTruncated("cut"), "k").reason == "too_long"
    # both errors survive the trip from a DataLoader worker
    err = pickle.loads(pickle.dumps(BadSample("k", "huge_image", "big")))
    assert (err.key, err.reason, err.detail) == ("k", "huge_image", "big")
    assert str(DataErrorBudgetExceeded("msg")) == "msg"


def test_filtered_records_are_counted_but_not_against_the_budget(caplog):
    budget = ErrorBudget(max_bad_fraction=0.1, min_samples=1)
    budget.ok(5)
    with caplog.at_level(logging.DEBUG, logger="mmlm.data"):
        for i in range(20):  # e.g. VQA records in a caption-only run
            budget.skip(BadSample(f"q{i}", "no_target", "sample_mode='caption'"))
    assert budget.counts == {"no_target": 20} and budget.bad == 0 and budget.filtered == 20
    assert all(r.levelno == logging.DEBUG for r in caplog.records) and len(caplog.records) == 20
    with pytest.raises(DataErrorBudgetExceeded):
        budget.skip(BadSample("x", "corrupt_image"))
