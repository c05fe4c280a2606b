"""Build caption shards from COCO: ``captions_*.json`` or Karpathy's ``dataset_coco.json``.

Inputs (the format is detected from the file):

* COCO captions (``captions_train2017.json``): ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "id", "caption"}]}``; images are ``--images/file_name``.
  The file is itself one split, so ``--split`` is not needed (it is recorded in the json when given).
* Karpathy splits (``dataset_coco.json``): ``{"images": [{"cocoid", "filepath", "filename",
  "split", "sentences": [{"raw", "sentid"}]}]}``; ``--split`` (one or more of
  train/val/test/restval, required) selects images; images are ``--images/filepath/filename``
  (or ``--images/filename`` when that is where they are). ``cocoid`` is kept as ``image_id``.

Output samples:

* default, one sample per image: ``KEY.jpg`` + ``KEY.json`` ``{"captions": [all captions],
  "image_id": int, "file_name": str}`` -- each reference once (no ``KEY.txt`` repeating the first
  one, which training would then draw twice as often): training draws one of them per sample,
  caption evaluation reads them all as references. Key: ``%012d`` of the image id.
* ``--per-caption``: one sample per (image, caption) pair as in LLaVA/BLIP pre-training:
  ``KEY.txt`` = that caption, json ``{"image_id", "id": caption id}``. Key: ``IMAGEID-CAPTIONID``.

Empty captions are dropped (counted as skipped, keyed ``IMAGEID-CAPTIONID`` in ``skipped.jsonl``
in both modes); an image with no captions left, missing or undecodable is skipped with its
reason. An image id listed twice in ``images`` is an error, and so is a re-run with other
annotations (or other ``--images``, ``--split``, ``--per-caption``, ``--resize-max``,
``--max-pixels``) into the same ``--out`` (``OUT/PREFIX.manifest.json`` records what it was built
from; ``--overwrite`` starts afresh). Usage::

    python -m data_pipelines.from_coco --annotations annotations/captions_val2017.json \\
        --images val2017/ --out shards/coco-val2017
    python -m data_pipelines.from_coco --annotations dataset_coco.json --images coco/ \\
        --split train restval --per-caption --out shards/coco-karpathy-train
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmlm.data.schema import Record

from ._common import (
    IMAGE_OPTIONS,
    BuildError,
    Job,
    Skip,
    build_and_report,
    build_manifest,
    builder_main,
    builder_parser,
    check_output_args,
    image_options,
    load_image,
    load_json,
    require_dir,
    with_output_and_image_args,
)

KARPATHY_SPLITS = ("train", "val", "test", "restval")


def image_key(image_id: int) -> str:
    return f"{image_id:012d}"


def caption_key(image_id: int, caption_id: int) -> str:
    return f"{image_id:012d}-{caption_id}"


def _entries_coco(data: dict) -> list[dict]:
    """[{image_id, file_names, captions: [(id, text)]}] in image order of the file."""
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise BuildError('COCO captions json needs "images" and "annotations" lists')
    by_id: dict[int, dict] = {}
    for im in data["images"]:
        try:
            if not isinstance(im["file_name"], str):
                raise TypeError("file_name is not a string")
            image_id = int(im["id"])
        except (KeyError, TypeError, ValueError):
            raise BuildError(f'COCO image entry without "id"/"file_name": {str(im)[:80]}') from None
        if image_id in by_id:  # which entry wins would be a guess: one image, one key
            raise BuildError(f'image id {image_id} appears twice in "images"')
        by_id[image_id] = {"image_id": image_id, "file_names": [im["file_name"]], "captions": []}
    for ann in data["annotations"]:
        try:
            entry = by_id[int(ann["image_id"])]
        except (KeyError, TypeError, ValueError):
            raise BuildError(f"caption annotation for an unknown image: {str(ann)[:80]}") from None
        entry["captions"].append((int(ann.get("id", len(entry["captions"]))), ann.get("caption")))
    return list(by_id.values())


def _entries_karpathy(data: dict, splits: Sequence[str]) -> list[dict]:
    out = []
    seen: set[int] = set()
    for im in data["images"]:
        if not isinstance(im, dict):
            raise BuildError(f"Karpathy image entry is not an object: {str(im)[:80]}")
        if im.get("split") not in splits:
            continue
        try:
            image_id = int(im["cocoid"])
            names = [str(Path(im.get("filepath", "")) / im["filename"]), im["filename"]]
            caps = [(int(s.get("sentid", i)), s.get("raw")) for i, s in enumerate(im.get("sentences", []))]
        except (KeyError, TypeError, ValueError, AttributeError):
            entry = str(im)[:80]
            raise BuildError(f'Karpathy image entry needs "cocoid", "filename", "sentences": [{{"raw"}}]: {entry}') from None
        if image_id in seen:
            raise BuildError(f'image id (cocoid) {image_id} appears twice in "images"')
        seen.add(image_id)
        out.append({"image_id": image_id, "file_names": names, "captions": caps, "split": im["split"]})
    return out


def detect_format(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if "annotations" in data:
            return "coco"
        if data["images"] and isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
            return "karpathy"
        if not data["images"]:
            return "karpathy" if "dataset" in data else "coco"
    raise BuildError("annotations are neither COCO captions (images+annotations) nor Karpathy (images with sentences)")


def iter_jobs(entries: list[dict], per_caption: bool) -> Iterator[Job]:
    for e in entries:
        if per_caption:
            keys = tuple(caption_key(e["image_id"], cid) for cid, _ in e["captions"]) or (image_key(e["image_id"]),)
        else:
            keys = (image_key(e["image_id"]),)
        yield Job(keys, e)


def build_records(
    entry: dict, *, images: Path, per_caption: bool, split: str | None, resize_max: int | None, max_pixels: int
) -> list[Record | Skip]:
    """Worker: one image entry -> its record(s)."""
    image_id = entry["image_id"]
    out: list[Record | Skip] = []
    caps: list[tuple[int, str]] = []
    for cid, text in entry["captions"]:
        text = text.strip() if isinstance(text, str) else ""
        if text:
            caps.append((cid, text))
        elif per_caption:
            out.append(Skip(caption_key(image_id, cid), "empty caption"))
    if not caps:
        key = image_key(image_id)
        return out or [Skip(key, "no captions", f"{len(entry['captions'])} empty" if entry["captions"] else "")]
    if not per_caption:  # the image's sample goes on without them, but they are counted
        out += [Skip(caption_key(image_id, cid), "empty caption") for cid, text in entry["captions"]
                if not (isinstance(text, str) and text.strip())]
    names = entry["file_names"]
    path = next((images / n for n in names if (images / n).is_file()), images / names[0])
    data, ext = load_image(path, resize_max=resize_max, max_pixels=max_pixels)
    meta = {"image_id": image_id, "file_name": names[0]}
    if entry.get("split") or split:
        meta["split"] = entry.get("split") or split
    if per_caption:
        for cid, text in caps:
            m = dict(meta, id=cid)
            out.append(Record(caption_key(image_id, cid), [data], [ext], caption=text, meta=m))
    else:
        rec = Record(image_key(image_id), [data], [ext], captions=[c for _, c in caps], meta=meta)  # each once
        out.append(rec)
    return out


def make_parser() -> argparse.ArgumentParser:
    p = builder_parser("from_coco", __doc__)
    p.add_argument("--annotations", required=True, type=Path, help="captions_*.json or dataset_coco.json")
    p.add_argument("--images", required=True, type=Path, help="image directory")
    p.add_argument(
        "--split",
        nargs="+",
        choices=KARPATHY_SPLITS,
        default=None,
        help="Karpathy split(s) to keep (required for dataset_coco.json)",
    )
    p.add_argument("--per-caption", action="store_true", help="one sample per (image, caption) instead of per image")
    return with_output_and_image_args(p)


def run(args: argparse.Namespace) -> int:
    check_output_args(args)
    require_dir(args.images, "--images")
    data = load_json(args.annotations, "--annotations")
    fmt = detect_format(data)
    if fmt == "karpathy":
        if not args.split:
            raise BuildError("dataset_coco.json needs --split (train, val, test and/or restval)")
        entries = _entries_karpathy(data, args.split)
        split = None
    else:
        entries = _entries_coco(data)
        split = "+".join(args.split) if args.split else None
    del data
    if not entries:
        raise BuildError(f"no images in {args.annotations}" + (f" for split {args.split}" if args.split else ""))
    total = sum(len(e["captions"]) for e in entries) if args.per_caption else len(entries)
    fn = functools.partial(
        build_records, images=args.images, per_caption=args.per_caption, split=split, **image_options(args)
    )
    print(f"{fmt} annotations: {len(entries)} images, {sum(len(e['captions']) for e in entries)} captions")
    manifest = build_manifest("from_coco", args, ["annotations", "images"], ["split", "per_caption", *IMAGE_OPTIONS])
    return build_and_report(args, iter_jobs(entries, args.per_caption), fn, total=total, manifest=manifest)


main = builder_main(run, make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
