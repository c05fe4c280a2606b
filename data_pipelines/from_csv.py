"""Build shards from a CSV or TSV table of captions or VQA pairs: the commonest form of a custom dataset.

The first row names the columns: ``image`` (a path relative to ``--image-root``, or an absolute path;
required) and ``caption``, or ``question`` and ``answers`` (one answer, or several separated by
``--answer-sep``, default ``|``). A row with both a caption and a question carries both
(``sample_mode`` picks what trains). Every other column (``id``,
``image_id``, ...) is kept in the sample's json, as are the image path (``image_file``) and, for a
column holding a whole number, the number itself (``image_id`` 42, not "42"). The delimiter is a
comma for ``.csv`` and a tab for ``.tsv``/``.tab`` (``--delimiter`` overrides); fields may be quoted
as the ``csv`` module reads them (commas and newlines inside quotes).

Each data row becomes one sample, keyed by its 1-based row number, zero-padded (``000000042``), so a
re-run over the same table resumes exactly; a re-run with another table (or other ``--image-root``,
``--answer-sep``, ``--resize-max``, ``--max-pixels``) into the same ``--out`` is an error
(``OUT/PREFIX.manifest.json``; ``--overwrite`` starts afresh). A table without the ``image`` column
or without a caption or question column, or with no data row, is an error before anything is
written. The file is UTF-8 (a byte-order mark is allowed). A row with more or fewer fields than the
header, an empty caption, a missing or undecodable image, or a sample that breaks the schema is
skipped and reported (``OUT/skipped.jsonl``). Rows are read in the main process and built (images
read, checked, re-encoded when needed) in ``--workers`` processes, as ``from_jsonl`` does. Usage::

    python -m data_pipelines.from_csv --csv captions.csv --image-root images/ --out shards/
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from mmlm.data.schema import Record

from . import from_jsonl
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
    require_dir,
    require_file,
    with_output_and_image_args,
)

TEXT_COLUMNS = ("caption", "question")


def _delimiter(path: Path, given: str | None) -> str:
    if given is not None:
        if given == "\\t":
            return "\t"
        if len(given) != 1:
            raise BuildError(f"--delimiter must be one character (or \\t for a tab), got {given!r}")
        return given
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _reader(f, delimiter: str):
    return csv.reader(f, delimiter=delimiter, strict=True)


def read_header(path: Path, delimiter: str) -> list[str]:
    """The column names (stripped); a :class:`BuildError` for a table mmlm cannot build from."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(_reader(f, delimiter), None)
    except (UnicodeDecodeError, csv.Error) as e:
        raise BuildError(f"--csv {path}: cannot read its header row ({e})") from None
    if not header:
        raise BuildError(f"--csv {path} is empty (the first row names the columns)")
    names = [h.strip() for h in header]
    if "image" not in names:
        raise BuildError(f"--csv {path}: no 'image' column (columns: {', '.join(names)}); "
                         f"set --delimiter if the table is not {'tab' if delimiter == chr(9) else 'comma'}-separated")
    if not any(c in names for c in TEXT_COLUMNS):
        raise BuildError(f"--csv {path}: no 'caption' or 'question' column (columns: {', '.join(names)})")
    if len(set(names)) != len(names):
        raise BuildError(f"--csv {path}: a column name appears twice ({', '.join(names)})")
    return names


def iter_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """``(1-based data row number, fields)`` of every non-blank data row."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = _reader(f, delimiter)
        next(reader, None)  # the header
        n = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (UnicodeDecodeError, csv.Error) as e:
                raise BuildError(f"--csv {path}: cannot read the row after data row {n} ({e})") from None
            if not any(x.strip() for x in fields):
                continue
            n += 1
            yield n, fields


def iter_jobs(path: Path, delimiter: str) -> Iterator[Job]:
    for n, fields in iter_rows(path, delimiter):
        key = from_jsonl.line_key(n)
        yield Job((key,), (key, fields))


def _value(text: str):
    """A cell as stored in the sample's json: a whole number as a number (ids), anything else as text."""
    t = text.strip()
    return int(t) if t.isdigit() and (t == "0" or not t.startswith("0")) else t


def row_object(names: Sequence[str], fields: Sequence[str], answer_sep: str) -> dict:
    """One data row as a ``from_jsonl`` line object (raises :class:`SkipSample`)."""
    if len(fields) != len(names):
        raise SkipSample("bad line", f"{len(fields)} fields where the header names {len(names)}")
    row = dict(zip(names, fields))
    obj: dict = {}
    for name, cell in row.items():
        if name == "image":
            if not cell.strip():
                raise SkipSample("no image", "an empty image cell")
            obj["image"] = cell.strip()
        elif name == "caption":
            if cell.strip() or "question" not in row:
                obj["caption"] = cell.strip()
        elif name == "question":
            if cell.strip():
                obj["question"] = cell.strip()
        elif name == "answers":
            answers = [a.strip() for a in cell.split(answer_sep)] if answer_sep else [cell.strip()]
            if "question" in obj or row.get("question", "").strip():
                obj["answers"] = [a for a in answers if a]
        elif name:
            obj[name] = _value(cell)
    return obj


def build_row(payload: tuple[str, list[str]], *, names: Sequence[str], answer_sep: str, image_root: Path,
              resize_max: int | None, max_pixels: int) -> list[Record]:
    """Worker: one data row -> one record (raises SkipSample), through ``from_jsonl``'s line builder."""
    key, fields = payload
    obj = row_object(names, fields, answer_sep)
    return from_jsonl.build_record((key, json.dumps(obj, ensure_ascii=False)), image_root=image_root,
                                   resize_max=resize_max, max_pixels=max_pixels)


def make_parser() -> argparse.ArgumentParser:
    p = builder_parser("from_csv", __doc__)
    p.add_argument("--csv", required=True, type=Path, help="input table (.csv, .tsv)")
    add_image_root_arg(p)
    p.add_argument("--delimiter", default=None, metavar="C",
                   help="field separator (default: a comma, a tab for .tsv/.tab; \\t for a tab)")
    p.add_argument("--answer-sep", default="|", metavar="S",
                   help='separator of several answers in the "answers" column (default "|"; "" for one answer)')
    return with_output_and_image_args(p)


def run(args: argparse.Namespace) -> int:
    check_output_args(args)
    require_file(args.csv, "--csv")
    require_dir(args.image_root, "--image-root")
    delimiter = _delimiter(args.csv, args.delimiter)
    names = read_header(args.csv, delimiter)
    total = sum(1 for _ in iter_rows(args.csv, delimiter))
    if total == 0:
        raise BuildError(f"--csv {args.csv} has no data row (only its header)")
    fn = functools.partial(build_row, names=names, answer_sep=args.answer_sep, image_root=args.image_root,
                           **image_options(args))
    manifest = build_manifest("from_csv", args, ["csv", "image_root"], ["delimiter", "answer_sep", *IMAGE_OPTIONS])
    return build_and_report(args, iter_jobs(args.csv, delimiter), fn, total=total, manifest=manifest)


main = builder_main(run, make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
