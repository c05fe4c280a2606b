"""Build shards from a JSON-lines file of captions, VQA pairs and conversations, mixed freely.

Each line is one object with an optional ``"image"`` (a path relative to ``--image-root``, or an
absolute path, or a list of paths for several images; ``"images"``, as other tools spell a list, is
the same field) and one of:

* ``{"image", "caption": str}`` (or ``"captions": [str, ...]``),
* ``{"image", "question": str, "answers": [str, ...]}``,
* ``{"image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``
  (LLaVA style; ``<image>`` placeholders, one per image; text-only conversations are allowed).

Every other field (``id``, ``image_id``, ...) is kept in the sample's json, and the image path(s) as
``image_file`` (as ``from_llava`` writes it). The sample key is the
1-based line number, zero-padded (``000000042``), so a re-run over the same file resumes exactly;
a re-run with another file (or other ``--image-root``, ``--resize-max``, ``--max-pixels``) into
the same ``--out`` is an error (``OUT/PREFIX.manifest.json`` records what it was built from;
``--overwrite`` starts afresh). A file with no non-blank line is an error.
The file is UTF-8 (a byte-order mark is allowed); blank lines are ignored. A bad line (not JSON,
or not UTF-8: never decoded with replacement characters), a missing or undecodable image, or a
sample that breaks the schema is skipped and reported (``OUT/skipped.jsonl``). Usage::

    python -m data_pipelines.from_jsonl --jsonl data.jsonl --image-root images/ --out shards/
"""

from __future__ import annotations

import argparse
import codecs
import functools
import json
from collections.abc import Iterator
from pathlib import Path

from mmlm.data.schema import Record, record_from_members

from ._common import (
    IMAGE_OPTIONS,
    BuildError,
    Job,
    SkipSample,
    add_image_root_arg,
    build_and_report,
    build_manifest,
    builder_main,
    builder_parser,
    check_output_args,
    image_options,
    load_image,
    require_dir,
    require_file,
    with_output_and_image_args,
)

TEXT_FIELDS = ("caption", "captions", "question", "answers", "conversations")


def line_key(lineno: int) -> str:
    return f"{lineno:09d}"


def iter_jobs(path: Path) -> Iterator[Job]:
    """One job per non-blank line: payload ``(key, raw line bytes)``; decoding and parsing happen
    in the workers (a leading UTF-8 byte-order mark is dropped)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line.strip():
                key = line_key(lineno)
                yield Job((key,), (key, line))


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _image_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SkipSample("bad line", '"image" must be a path or a list of paths')


def build_record(
    payload: tuple[str, str], *, image_root: Path, resize_max: int | None, max_pixels: int
) -> list[Record]:
    """Worker: one jsonl line -> one record (raises SkipSample)."""
    key, line = payload
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("bad line", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SkipSample("bad line", f"invalid json: {e.msg}") from None
    if not isinstance(obj, dict):
        raise SkipSample("bad line", "a line must be a JSON object")
    if "images" in obj:  # the spelling of other tools' multi-image records
        if "image" in obj:
            raise SkipSample("bad line", 'both "image" and "images": give the image paths once')
        obj["image"] = obj.pop("images")
    paths = _image_list(obj.pop("image", None))
    if not any(obj.get(f) for f in TEXT_FIELDS):
        empty = [f for f in TEXT_FIELDS if f in obj]
        raise SkipSample("bad line", f"empty {empty[0]}" if empty else "no caption, captions, question or conversations")
    if not paths and not obj.get("conversations"):
        raise SkipSample("no image", "caption and VQA samples need an image")
    images, exts = [], []
    for p in paths:
        data, ext = load_image(image_root / p, resize_max=resize_max, max_pixels=max_pixels)
        images.append(data)
        exts.append(ext)
    if paths:  # where the sample came from (describe/eval output shows keys, which are line numbers)
        obj.setdefault("image_file", paths[0] if len(paths) == 1 else list(paths))
    rec = record_from_members(key, {"json": json.dumps(obj, ensure_ascii=False).encode("utf-8")})  # type checks
    rec.images, rec.image_exts = images, exts
    return [rec]


def make_parser() -> argparse.ArgumentParser:
    p = builder_parser("from_jsonl", __doc__)
    p.add_argument("--jsonl", required=True, type=Path, help="input JSON-lines file")
    add_image_root_arg(p)
    return with_output_and_image_args(p)


def run(args: argparse.Namespace) -> int:
    check_output_args(args)
    require_file(args.jsonl, "--jsonl")
    require_dir(args.image_root, "--image-root")
    total = count_lines(args.jsonl)
    if total == 0:
        raise BuildError(f"--jsonl {args.jsonl} has no samples (no non-blank line)")
    fn = functools.partial(build_record, image_root=args.image_root, **image_options(args))
    manifest = build_manifest("from_jsonl", args, ["jsonl", "image_root"], [*IMAGE_OPTIONS])
    return build_and_report(args, iter_jobs(args.jsonl), fn, total=total, manifest=manifest)


main = builder_main(run, make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
