"""Helpers of the shard-builder tests (``tests/test_builders_*.py``, ``tests/test_from_folder.py``):
tiny encoded images, the ``images`` fixture (a folder of good and bad images), inputs shared by
several files, and readers of a builder's output (its samples, its ``skipped.jsonl``, inspect's verdict).

The ``images`` fixture is used by importing it: ``from _builders_kit import images  # noqa: F401``.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines import inspect as inspect_cli
from mmlm.data.schema import Record, iter_tar_records

OPTS = ["--workers", "1", "--no-progress"]  # in-process and quiet: what most builder runs in the tests add


def encode_image(color, fmt: str, size=(24, 16)) -> bytes:
    """A plain ``size`` image of one ``color``, encoded as ``fmt`` (a PIL format name)."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def images(tmp_path) -> Path:
    """red.png, green.jpg, blue.gif (re-encoded to PNG), big.png, corrupt.jpg, truncated.png."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    (d / "red.png").write_bytes(encode_image((255, 0, 0), "PNG"))
    (d / "sub" / "green.jpg").write_bytes(encode_image((0, 255, 0), "JPEG"))
    (d / "blue.gif").write_bytes(encode_image((0, 0, 255), "GIF"))
    (d / "big.png").write_bytes(encode_image((9, 9, 9), "PNG", size=(200, 100)))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (d / "truncated.png").write_bytes(encode_image((1, 2, 3), "PNG", size=(64, 64))[:60])
    return d


def read_samples(out: Path) -> dict[str, Record]:
    """The samples of the shards in ``out`` by key; a key written twice fails the test."""
    recs = list(iter_tar_records(out))
    keys = [r.key for r in recs]
    assert len(keys) == len(set(keys)), "duplicate samples"
    return {r.key: r for r in recs}


def skipped_lines(out: Path) -> list[dict]:
    """The lines of ``out/skipped.jsonl``: ``{"key", "reason", "detail"}``."""
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]


def skip_reasons(out: Path) -> Counter:
    """How many inputs were skipped for each reason."""
    return Counter(s["reason"] for s in skipped_lines(out))


def inspect_ok(out: Path) -> None:
    """``python -m data_pipelines.inspect OUT`` finds every sample valid and every image decodable."""
    assert inspect_cli.main([str(out), "--no-progress", "--samples", "0"]) == 0


def mixed_jsonl(tmp_path: Path) -> Path:
    """A from_jsonl input over :func:`images` of 12 non-blank lines: captions, VQA and conversations, 5 good
    (keys 000000001 to 000000005) and 7 skipped (undecodable and missing images, schema errors, no image, not json)."""
    lines = [
        {"image": "red.png", "caption": "a red image", "id": "r1"},
        {"image": "sub/green.jpg", "question": "what color?", "answers": ["green", "green"]},
        {
            "image": ["red.png", "sub/green.jpg"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\ncompare"},
                {"from": "gpt", "value": "red and green"},
            ],
        },
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"image": "blue.gif", "caption": "a blue gif"},
        {"image": "corrupt.jpg", "caption": "broken"},
        {"image": "truncated.png", "caption": "cut"},
        {"image": "missing.png", "caption": "not there"},
        {
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
        },
        {"caption": "no image"},
        {"image": "red.png", "caption": 3},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\nnot json\n")
    return path

