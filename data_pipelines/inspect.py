"""Check and summarise tar shards: counts per kind, schema errors, corrupt images, text lengths.

``SHARDS`` are files, directories (their ``*.tar``) or brace patterns
(``out/shard-{000000..000009}.tar``). Every sample is parsed with the shard schema
(``mmlm.data.schema``) and every image member is decoded as training decodes it
(``mmlm.data.decode.decode_image``: JPEG, PNG or WEBP only, whatever the member's extension). Reports:

* samples per kind (caption / vqa / conversation), images per sample, duplicate keys (a warning
  only: separately built datasets inspected together may share keys);
* schema errors and corrupt/undecodable images (those training would skip: GIF, BMP or TIFF
  bytes under a ``.jpg`` name count; first few listed with their keys);
* caption length stats in characters and words (and in tokens with ``--processor DIR``,
  using ``mmlm.Processor.from_pretrained(DIR).tokenizer``), question/answer and conversation
  lengths;
* ``--samples N`` samples printed in full (text) with their image sizes.

Exit status: 0 when every sample is valid and every image decodes, 1 otherwise, 2 on a bad
argument (no shards found). ``--json`` prints the report as one JSON object on stdout. Usage::

    python -m data_pipelines.inspect out/train --samples 3
    python -m data_pipelines.inspect 'out/val/shard-{000000..000003}.tar' --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmlm.data.decode import decode_image
from mmlm.data.errors import BadSample
from mmlm.data.schema import Record, SchemaError, check_record, expand_shards, iter_tar_samples, record_from_members

from ._common import PIL_DEFAULT_MAX_PIXELS, builder_parser, progress

MAX_LISTED_ERRORS = 20


class LengthStats:
    """Streaming length statistics (lengths kept as a compact int array for percentiles)."""

    def __init__(self) -> None:
        self.values = array("l")

    def add(self, n: int) -> None:
        self.values.append(n)

    def summary(self) -> dict[str, float] | None:
        v = self.values
        if not v:
            return None
        s = sorted(v)
        return {
            "count": len(s),
            "min": s[0],
            "mean": round(statistics.fmean(s), 2),
            "p50": s[len(s) // 2],
            "p95": s[min(len(s) - 1, int(len(s) * 0.95))],
            "max": s[-1],
        }


class Report:
    def __init__(self) -> None:
        self.shards: list[str] = []
        self.samples = 0
        self.kinds: Counter = Counter()
        self.images_per_sample: Counter = Counter()
        self.image_formats: Counter = Counter()
        self.errors: list[dict] = []
        self.n_schema_errors = 0
        self.n_image_errors = 0
        self.n_shard_errors = 0
        self.n_duplicate_keys = 0
        self.n_unanswered = 0  # questions without answers (a test split's): a note, not an error
        self.lengths: dict[str, LengthStats] = {}
        self.examples: list[dict] = []

    def length(self, name: str, n: int) -> None:
        self.lengths.setdefault(name, LengthStats()).add(n)

    def error(self, kind: str, key: str, message: str, shard: str) -> None:
        setattr(self, f"n_{kind}_errors", getattr(self, f"n_{kind}_errors") + 1)
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append({"type": kind, "key": key, "shard": shard, "message": message})

    @property
    def ok(self) -> bool:
        return not (self.n_schema_errors or self.n_image_errors or self.n_shard_errors)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "shards": len(self.shards),
            "samples": self.samples,
            "kinds": dict(self.kinds),
            "images_per_sample": {str(k): v for k, v in sorted(self.images_per_sample.items())},
            "image_formats": dict(self.image_formats),
            "schema_errors": self.n_schema_errors,
            "image_errors": self.n_image_errors,
            "shard_errors": self.n_shard_errors,
            "duplicate_keys": self.n_duplicate_keys,
            "unanswered_questions": self.n_unanswered,
            "lengths": {k: v.summary() for k, v in sorted(self.lengths.items())},
            "errors": self.errors,
            "examples": self.examples,
        }


def _texts(rec: Record, kind: str) -> dict[str, list[str]]:
    if kind == "caption":
        caps = ([rec.caption] if rec.caption is not None else []) + list(rec.captions)
        return {"caption": caps}
    if kind == "vqa":
        return {"question": [rec.question or ""], "answer": list(rec.answers)}
    return {"conversation": ["\n".join(t["value"] for t in rec.conversations)]}


def _example(rec: Record, kind: str, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    ex: dict[str, Any] = {
        "key": rec.key,
        "kind": kind,
        "images": [f"{w}x{h} {e}" for (w, h), e in zip(sizes, rec.image_exts)],
    }
    for f in ("caption", "captions", "question", "answers", "conversations", "meta"):
        v = getattr(rec, f)
        if v:
            ex[f] = v
    return ex


def inspect_shards(
    paths: Sequence[str],
    *,
    samples: int = 3,
    decode_images: bool = True,
    tokenizer: Callable[[str], list[int]] | None = None,
    limit: int | None = None,
    show_progress: bool = False,
) -> Report:
    """Inspect ``paths`` (already expanded shard files); return a :class:`Report`."""
    rep = Report()
    seen: set[str] = set()
    bar = progress(None, "inspect", disable=not show_progress)
    for path in paths:
        rep.shards.append(path)
        try:
            for key, members, error in iter_tar_samples(path):
                if limit is not None and rep.samples >= limit:
                    break
                rep.samples += 1
                bar.update(1)
                if key in seen:  # a warning: datasets mixed together may legitimately share keys
                    rep.n_duplicate_keys += 1
                seen.add(key)
                try:
                    if error is not None:
                        raise error
                    rec = record_from_members(key, members)
                    kind = check_record(rec)
                except SchemaError as e:
                    rep.error("schema", key, e.reason, path)
                    continue
                rep.kinds[kind] += 1
                rep.n_unanswered += kind == "vqa" and not rec.answers
                rep.images_per_sample[len(rec.images)] += 1
                sizes = []
                for i, data in enumerate(rec.images):
                    rep.image_formats[rec.image_exts[i]] += 1
                    if not decode_images:
                        sizes.append((0, 0))
                        continue
                    try:  # the training decoder, so "OK" means training will not skip it
                        im = decode_image(data, key=key, max_pixels=PIL_DEFAULT_MAX_PIXELS)
                        sizes.append(im.size)
                    except BadSample as e:
                        detail = f"{e.reason}: {e.detail}" if e.detail else e.reason
                        rep.error("image", key, f"image {i}: {detail}", path)
                        sizes.append((0, 0))
                for name, texts in _texts(rec, kind).items():
                    for t in texts:
                        rep.length(f"{name}_chars", len(t))
                        rep.length(f"{name}_words", len(t.split()))
                        if tokenizer is not None:
                            rep.length(f"{name}_tokens", len(tokenizer(t)))
                if len(rep.examples) < samples:
                    rep.examples.append(_example(rec, kind, sizes))
        except (tarfile.TarError, OSError, EOFError) as e:
            rep.error("shard", path, f"unreadable tar: {e}", path)
        if limit is not None and rep.samples >= limit:
            break
    bar.close()
    return rep


def load_tokenizer(path: str) -> Callable[[str], list[int]]:
    """``mmlm.Processor.from_pretrained(path).tokenizer`` as a text -> ids function."""
    from mmlm import Processor  # lazy: heavy, and optional for this tool

    tok = Processor.from_pretrained(path).tokenizer

    def encode(text: str) -> list[int]:
        out = tok(text, add_special_tokens=False) if callable(tok) else tok.encode(text)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)

    return encode


def format_report(rep: Report) -> str:
    j = rep.to_json()
    lines = [
        f"{j['shards']} shards, {j['samples']} samples: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.kinds.items()))
    ]
    lines.append("images per sample: " + ", ".join(f"{k}: {v}" for k, v in j["images_per_sample"].items()))
    if rep.image_formats:
        lines.append("image formats: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.image_formats.items())))
    for name, s in j["lengths"].items():
        if s:
            lines.append(
                f"{name:>22}: min {s['min']}  mean {s['mean']}  p50 {s['p50']}  p95 {s['p95']}  max {s['max']}"
            )
    for ex in rep.examples:
        lines.append("--- " + json.dumps(ex, ensure_ascii=False)[:1000])
    lines.append(
        f"schema errors: {rep.n_schema_errors}, corrupt images: {rep.n_image_errors}, "
        f"unreadable shards: {rep.n_shard_errors}, duplicate keys: {rep.n_duplicate_keys}"
    )
    if rep.n_unanswered:
        lines.append(f"note: {rep.n_unanswered} question(s) have no answers (a test split's?): training skips them "
                     "(no_answer) and eval cannot score them")
    for e in rep.errors:
        lines.append(f"  {e['type']} error in {e['shard']}: {e['key']}: {e['message']}")
    lines.append("OK" if rep.ok else "FAILED")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = builder_parser("inspect", __doc__)
    p.add_argument("shards", nargs="+", help="shard files, directories or brace patterns")
    p.add_argument("--samples", type=int, default=3, help="samples to print (default 3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--processor", default=None, metavar="DIR", help="also report token lengths with this processor")
    p.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    p.add_argument("--no-decode", action="store_true", help="skip decoding images (schema check only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def find_shards(specs: Sequence[str]) -> list[str]:
    """Like :func:`mmlm.data.schema.expand_shards`, but a directory without ``*.tar`` of its own
    is searched recursively (``inspect out/`` covers ``out/train``, ``out/val``, ...)."""
    out: list[str] = []
    for spec in specs:
        for p in expand_shards([spec]) if not Path(spec).is_dir() else [spec]:
            if Path(p).is_dir():
                found = expand_shards([p]) or sorted(
                    str(f) for f in Path(p).rglob("*.tar") if not any(part.startswith(".") for part in f.parts[-1:])
                )
                out.extend(found)
            else:
                out.append(p)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        paths = find_shards(args.shards)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no .tar shards in {' '.join(args.shards)}", file=sys.stderr)
        return 2
    if args.samples < 0 or (args.limit is not None and args.limit < 1):
        print("error: --samples must be >= 0 and --limit >= 1", file=sys.stderr)
        return 2
    tokenizer = None
    if args.processor:
        try:
            tokenizer = load_tokenizer(args.processor)
        except Exception as e:  # ImportError, missing files, bad config: all a bad --processor
            print(f"error: cannot load a processor from {args.processor}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    rep = inspect_shards(
        paths,
        samples=args.samples,
        decode_images=not args.no_decode,
        tokenizer=tokenizer,
        limit=args.limit,
        show_progress=not args.no_progress and not args.json,
    )
    if args.json:
        print(json.dumps(rep.to_json(), ensure_ascii=False, indent=1))
    else:
        print(format_report(rep))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
