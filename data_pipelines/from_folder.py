"""Build shards from a folder of images with sidecar text files: ``cat.jpg`` + ``cat.txt`` or ``cat.json``.

Every image under ``--images`` (recursively: subfolders, symlinked ones too, each real folder once;
hidden files and folders left out) becomes one sample. Images are the files ``mmlm describe`` finds
in a folder: ``.jpg .jpeg .png .webp .gif .bmp .tif .tiff``, any case (gif/bmp/tiff are re-encoded
to PNG). An image's sidecars are the files next to it with the same stem and the extension ``.txt``
or ``.json`` (any case); every other file is ignored.

* ``cat.txt``: the caption, the whole file with surrounding whitespace stripped (kohya style);
* ``cat.json``: any ``from_jsonl`` line object without ``"image"``: ``{"caption"}``,
  ``{"captions": [...]}``, ``{"question", "answers": [...]}``, ``{"conversations": [...]}``; every
  other field (``id``, img2dataset's ``url``...) is kept in the sample's json;
* both (img2dataset writes both): the json's fields, with the .txt as the caption (it replaces a
  json ``"caption"``, as ``KEY.txt`` wins in a shard).

The image's path relative to ``--images`` is kept in the sample's json as ``image_file``. The sample
key is the 1-based position of the image in the sorted list of relative paths, zero-padded
(``000000042``: no dots whatever the file names), so a re-run over the same folder resumes exactly.
``OUT/PREFIX.manifest.json`` records the folder and a fingerprint of the relative paths and sizes of
its images and their sidecars: a re-run over a changed folder (an image or sidecar added, removed,
renamed or resized), or with other ``--resize-max`` or ``--max-pixels``, into the same ``--out`` is
an error (``--overwrite`` starts afresh). A missing folder, one without images, or one where no
image has a sidecar is an error before anything is written.
Sidecars are UTF-8 (a byte-order mark is allowed). Skipped and reported (``OUT/skipped.jsonl``): an
image without a sidecar (``no text``); a blank caption (.txt or json) and no other text (``empty
caption``); a sidecar that is not UTF-8 (never decoded with replacement characters), not a JSON
object, or holds ``"image"`` or no text (``bad sidecar``); a sidecar next to two images of one stem,
``cat.jpg`` and ``cat.png`` (``ambiguous sidecar``); a file name that is not UTF-8 (``bad file
name``); a missing or undecodable image, or a sample that breaks the schema. Usage::

    python -m data_pipelines.from_folder --images photos/ --out shards/
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from mmlm.data.schema import Record
from mmlm.inference import IMAGE_EXTENSIONS

from . import from_jsonl
from ._common import (
    IMAGE_OPTIONS,
    BuildError,
    Job,
    SkipSample,
    build_and_report,
    build_manifest,
    builder_main,
    builder_parser,
    check_output_args,
    image_options,
    require_dir,
    with_output_and_image_args,
)

SIDECARS = ("txt", "json")


class Entry(NamedTuple):
    """One image: paths relative to ``--images`` (``/``-separated), and its sidecars' (or None)."""

    image: str
    txt: str | None
    json: str | None
    twins: tuple[str, ...]  # other images of the same stem in its folder


def _files(root: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """``(relative folder, [(file name, size), ...])`` for every folder under ``root``, hidden ones left out."""
    stack, seen = [""], set()
    while stack:
        rel = stack.pop()
        folder = root / rel
        real = os.path.realpath(folder)
        if real in seen:  # a link back up is no endless loop
            continue
        seen.add(real)
        files = []
        with os.scandir(folder) as it:
            found = sorted(it, key=lambda e: e.name)  # the same walk every run: a linked folder keeps its path
        for e in found:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                stack.append(f"{rel}{e.name}/")
            elif e.is_file():
                files.append((e.name, e.stat().st_size))
        yield rel, files


def list_images(root: Path) -> tuple[list[Entry], str]:
    """The images under ``root`` in key order, and a fingerprint of them and their sidecars."""
    entries, sizes = [], {}
    for rel, files in _files(root):
        images: dict[str, list[str]] = defaultdict(list)  # stem -> image names
        sidecars: dict[tuple[str, str], str] = {}
        for name, size in sorted(files):
            stem, _, ext = name.rpartition(".")
            if stem and ext.lower() in SIDECARS:
                sidecars.setdefault((stem, ext.lower()), rel + name)
            elif stem and ext.lower() in IMAGE_EXTENSIONS:
                images[stem].append(name)
            else:
                continue  # any other file is ignored
            sizes[rel + name] = size
        for stem, names in images.items():
            for name in names:
                twins = tuple(n for n in names if n != name)
                entries.append(Entry(rel + name, sidecars.get((stem, "txt")), sidecars.get((stem, "json")), twins))
    entries.sort(key=lambda e: e.image.split("/"))
    digest = hashlib.sha256()
    for e in entries:
        for path in (e.image, e.txt, e.json):
            digest.update(b"-\0" if path is None else os.fsencode(path) + b"\0%d\0" % sizes[path])
    return entries, f"{len(entries)} images, sha256 {digest.hexdigest()[:16]}"


def iter_jobs(entries: Sequence[Entry]) -> Iterator[Job]:
    for i, entry in enumerate(entries, 1):
        key = from_jsonl.line_key(i)
        yield Job((key,), (key, entry))


def _read_text(root: Path, rel: str) -> str:
    try:
        return (root / rel).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipSample("bad sidecar", f"{rel}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SkipSample("bad sidecar", f"{rel}: {e.strerror or e}") from None


def sample_object(root: Path, entry: Entry) -> dict:
    """The ``from_jsonl`` line object of one image and its sidecars (raises :class:`SkipSample`)."""
    try:
        entry.image.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipSample("bad file name", f"not UTF-8: {entry.image!a}") from None
    if entry.txt is None and entry.json is None:
        raise SkipSample("no text", f"no {entry.image.rpartition('.')[0]}.txt or .json next to it")
    if entry.twins:
        raise SkipSample("ambiguous sidecar", f"{entry.txt or entry.json} is next to {entry.image} and "
                                              f"{', '.join(entry.twins)}: rename one")
    obj: dict = {}
    if entry.json is not None:
        try:
            obj = json.loads(_read_text(root, entry.json))
        except json.JSONDecodeError as e:
            raise SkipSample("bad sidecar", f"{entry.json}: invalid json: {e.msg}") from None
        if not isinstance(obj, dict):
            raise SkipSample("bad sidecar", f"{entry.json}: not a JSON object")
        if "image" in obj:
            raise SkipSample("bad sidecar", f'{entry.json}: "image" is not allowed (the image is the file next to it)')
    if entry.txt is not None:
        obj["caption"] = _read_text(root, entry.txt).strip()
    if isinstance(obj.get("caption"), str) and not obj["caption"].strip():
        del obj["caption"]  # a blank caption next to other text: the other text is the sample
        if not any(obj.get(f) for f in from_jsonl.TEXT_FIELDS):
            raise SkipSample("empty caption", entry.txt or entry.json)
    return {"image": entry.image, **obj}


def build_sample(payload: tuple[str, Entry], *, root: Path, resize_max: int | None, max_pixels: int) -> list[Record]:
    """Worker: one image and its sidecars -> one record, through ``from_jsonl``'s line builder."""
    key, entry = payload
    line = json.dumps(sample_object(root, entry), ensure_ascii=False)
    try:
        return from_jsonl.build_record((key, line), image_root=root, resize_max=resize_max, max_pixels=max_pixels)
    except SkipSample as e:
        if e.reason == "bad line":  # what from_jsonl says of a line is said here of the json sidecar
            raise SkipSample("bad sidecar", f"{entry.json}: {e.detail}") from None
        raise


def make_parser() -> argparse.ArgumentParser:
    p = builder_parser("from_folder", __doc__)
    p.add_argument("--images", required=True, type=Path, metavar="DIR",
                   help="folder of images with their .txt/.json sidecars (searched recursively)")
    return with_output_and_image_args(p)


def run(args: argparse.Namespace) -> int:
    check_output_args(args)
    require_dir(args.images, "--images")
    entries, fingerprint = list_images(args.images)
    if not entries:
        raise BuildError(f"--images {args.images} holds no image (.{', .'.join(sorted(IMAGE_EXTENSIONS))}), "
                         "in any subfolder")
    if all(e.txt is None and e.json is None for e in entries):
        raise BuildError(f"--images {args.images}: none of its {len(entries)} images has a sidecar "
                         "(cat.jpg needs cat.txt or cat.json next to it)")
    manifest = build_manifest("from_folder", args, ["images"], [*IMAGE_OPTIONS])
    manifest["inputs"]["--images content"] = fingerprint
    fn = functools.partial(build_sample, root=args.images, **image_options(args))
    return build_and_report(args, iter_jobs(entries), fn, total=len(entries), manifest=manifest)


main = builder_main(run, make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
