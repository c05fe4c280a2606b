"""Build conversation shards from a LLaVA instruction json (e.g. ``llava_v1_5_mix665k.json``).

Input: a JSON array of ``{"id", "image"?: path | [paths], "conversations": [{"from":
"human"|"gpt", "value": str}, ...]}``, read as a stream (the file is never loaded whole).
Image paths are relative to ``--images`` (``coco/train2017/000000033471.jpg``, ``gqa/images/...``).
Samples without ``"image"`` are text-only conversations and are kept.

Output: ``KEY.jpg`` (or ``KEY.0.jpg``, ``KEY.1.jpg``... for several images) + ``KEY.json``
``{"conversations": [...], "id": <original id>, "image_file": <path>}`` plus any other fields of the
entry. ``<image>`` placeholders are kept as they are; the key is the 0-based position in the
array, zero-padded (``000000042``), because LLaVA ids are neither unique nor dot-free.
A missing or undecodable image, or an entry that breaks the schema (e.g. a role other than
human/gpt, ``<image>`` placeholders that are not one per image, ``<image>`` in a gpt turn), is skipped
with its reason (an entry with images and no placeholder at all is kept: its images go before the first
human turn's text). An empty array is an
error, and so is a re-run with another json (or other ``--images``, ``--resize-max``,
``--max-pixels``) into the same ``--out`` (``OUT/PREFIX.manifest.json`` records what it was built
from; ``--overwrite`` starts afresh). Usage::

    python -m data_pipelines.from_llava --json llava_v1_5_mix665k.json --images data/ --out shards/llava665k
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from mmlm.data.schema import Record, SchemaError, parse_conversations

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
    iter_json_array,
    load_image,
    require_dir,
    require_file,
    with_output_and_image_args,
)


def index_key(i: int) -> str:
    return f"{i:09d}"


def iter_jobs(path: Path) -> Iterator[Job]:
    for i, item in enumerate(iter_json_array(path, "--json")):
        key = index_key(i)
        yield Job((key,), (key, item))


def build_record(payload: tuple[str, Any], *, images: Path, resize_max: int | None, max_pixels: int) -> list[Record]:
    """Worker: one LLaVA entry -> one record (raises SkipSample)."""
    key, item = payload
    if not isinstance(item, dict):
        raise SkipSample("bad entry", "an entry must be an object")
    item = dict(item)
    try:
        conv = parse_conversations(key, item.pop("conversations", None) or [])
    except SchemaError as e:
        raise SkipSample("schema error", e.reason) from None
    if not conv:
        raise SkipSample("bad entry", "no conversations")
    paths = item.pop("image", None)
    if paths is None:
        paths = []
    elif isinstance(paths, str):
        paths = [paths]
    elif not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        raise SkipSample("bad entry", '"image" must be a path or a list of paths')
    data, exts = [], []
    for p in paths:
        b, ext = load_image(images / p, resize_max=resize_max, max_pixels=max_pixels)
        data.append(b)
        exts.append(ext)
    meta = {k: v for k, v in item.items() if k not in ("caption", "captions", "question", "answers")}
    if paths:
        meta["image_file"] = paths[0] if len(paths) == 1 else paths
    return [Record(key, data, exts, conversations=conv, meta=meta)]


def make_parser() -> argparse.ArgumentParser:
    p = builder_parser("from_llava", __doc__)
    p.add_argument("--json", required=True, type=Path, help="LLaVA instruction json (a JSON array)")
    add_image_root_arg(p, "--images")
    return with_output_and_image_args(p)


def run(args: argparse.Namespace) -> int:
    check_output_args(args)
    require_file(args.json, "--json")
    require_dir(args.images, "--images")
    jobs = iter_jobs(args.json)
    first = next(jobs, None)
    if first is None:
        raise BuildError(f"--json {args.json} is an empty array: no samples")
    fn = functools.partial(build_record, images=args.images, **image_options(args))
    manifest = build_manifest("from_llava", args, ["json", "images"], [*IMAGE_OPTIONS])
    return build_and_report(args, chain([first], jobs), fn, total=None, manifest=manifest)


main = builder_main(run, make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
