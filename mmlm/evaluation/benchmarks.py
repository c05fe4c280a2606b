"""Benchmarks: the shared types (:class:`Item`, :class:`Benchmark`, :class:`SubmissionFormat`,
:class:`BenchmarkError`), the registry :func:`load_benchmark` (benchmark name -> reader, scoring
rule, submission format), small IO helpers, and prediction writers/readers in each benchmark's
submission format. The per-benchmark readers (official files -> :class:`Item` objects) live in
:mod:`mmlm.evaluation.readers`, imported by :func:`load_benchmark` when it is called.

Contract
--------
:func:`load_benchmark` (``task`` = ``"caption"`` | ``"vqa"``) returns a :class:`Benchmark`: its
items in file order (``limit`` keeps the first N), the scoring rule and the submission format.
An :class:`Item` has a string ``id`` (the submission key as text: COCO ``image_id``, VQA
``question_id``, GQA ``questionId``, VizWiz image name, ...), its ``image`` (a file path or the
encoded bytes from a shard; ``None`` when no image folder was given, which is fine for scoring
existing predictions), the ``prompt`` given to the model (``None`` for captions unless a caption
prompt is set: the checkpoint's own default prompt is then used; for VQA the question, a newline
and ``prompt_suffix``), its ``references`` (captions or human answers; empty when the split has
no public annotations) and ``groups`` (breakdown name -> value, e.g. ``perQuestionType``).

Formats read by :mod:`.readers` (only what is needed from each file):

===============  ==========================================================  ====================
benchmark        files                                                       submission format
===============  ==========================================================  ====================
coco-karpathy    ``--annotations dataset_coco.json`` (Karpathy), ``--split``   ``[{image_id, caption}]``
                 (test|val|train|restval|all); images ``DIR/filepath/filename``
flickr30k        ``--annotations dataset_flickr30k.json`` (Karpathy format)   ``[{image_id, caption}]``
                 image_id = the numeric file stem
coco             ``--annotations captions_val2014.json`` (images+annotations) ``[{image_id, caption}]``
nocaps           ``--annotations nocaps_val_4500_captions.json`` (coco-like;  ``[{image_id, caption}]``
                 ``domain`` -> ``perDomain`` breakdown)
shards (caption) our tar shards with ``captions``/``caption``; id = ``image_id`` ``[{image_id, caption}]``
                 or the sample key; records of one image_id are merged
vqav2, okvqa     ``--questions`` OpenEnded questions json, ``--annotations``  ``[{question_id, answer}]``
                 (optional: without them predictions are written, not scored);
                 images ``COCO_<data_subtype>_<id:012d>.jpg`` in ``--images`` or
                 its ``<data_subtype>/`` folder (test-dev2015: test2015's)
vizwiz           ``--annotations val.json`` (list of {image, question, answers}) ``[{image, answer}]``
textvqa          ``--annotations TextVQA_0.5.1_val.json`` ({"data": [...]})    ``[{question_id, answer}]``
gqa              ``--questions testdev_balanced_questions.json`` ({qid: {...}}) ``[{questionId, prediction}]``
pope             ``--questions coco_pope_*.json`` (jsonl {question_id, image,   jsonl ``{question_id, prompt, text}``
                 text, label}); files merged beforehand need unique ids
shards (vqa)     our tar shards with ``question``/``answers``; id =              ``[{question_id, answer}]``
                 ``question_id`` or the sample key
===============  ==========================================================  ====================

Scoring rules: captions -> :mod:`.caption_metrics`; vqav2/okvqa/shards -> official VQA accuracy;
textvqa, vizwiz -> their own official variants of it (``vqa_metrics.textvqa_accuracy``,
``vizwiz_accuracy``: the same leave-one-out rule, other answer processing); gqa -> exact match
as LLaVA scores GQA (``vqa_metrics.gqa_accuracy``; + ``perAnswerType`` open/binary as GQA's eval,
structural and semantic types); pope -> POPE's
yes/no metrics (+ ``perCategory`` when the file has ``category``).

:func:`read_predictions` reads a results file keyed as :func:`write_predictions` writes it: each id of
the JSON type the benchmark's own files give it (integers for COCO ``image_id`` and VQAv2/OK-VQA/TextVQA/
POPE ``question_id``, strings for GQA ``questionId`` and VizWiz ``image``; shards: the ``image_id``/
``question_id`` as written in the sample's JSON, else the key string). Another type (``"123"`` for 123) is
an error naming the first such entry, as the official tools would not match it either.

Bad input raises :class:`BenchmarkError` (a ``ValueError``) with a one-line reason naming the file.
Writes go through :func:`atomic_write_text` (temporary file + ``os.replace``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmlm.io import atomic_write_text
from mmlm.evaluation.vqa_metrics import gqa_prediction
from mmlm.processing import DEFAULT_VQA_SUFFIX, vqa_prompt

__all__ = [
    "CAPTION_BENCHMARKS",
    "VQA_BENCHMARKS",
    "DEFAULT_VQA_SUFFIX",
    "BenchmarkError",
    "Item",
    "Benchmark",
    "SubmissionFormat",
    "load_benchmark",
    "vqa_prompt",
    "load_image",
    "write_predictions",
    "read_predictions",
    "atomic_write_text",
    "atomic_write_json",
]

CAPTION_BENCHMARKS: tuple[str, ...] = ("coco-karpathy", "coco", "flickr30k", "nocaps", "shards")
VQA_BENCHMARKS: tuple[str, ...] = ("vqav2", "okvqa", "vizwiz", "textvqa", "gqa", "pope", "shards")
KARPATHY_SPLITS: tuple[str, ...] = ("test", "val", "train", "restval", "all")


class BenchmarkError(ValueError):
    """Bad benchmark input (missing file, wrong format, missing field); one-line message."""


@dataclass(frozen=True)
class Item:
    """One evaluation item (see the module docstring)."""

    id: str
    image: str | bytes | None
    prompt: str | None
    references: tuple[str, ...] = ()
    question: str | None = None
    groups: Mapping[str, str | None] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmissionFormat:
    """A results file: a JSON list (or JSON lines) of ``{key_field: id, value_field: text}``.

    ``meta_fields`` are copied from ``Item.meta`` into each entry (POPE's ``prompt``). ``submitted``: what the
    file holds of a reply when the benchmark's own evaluation compares it as written (GQA's ``eval.py``:
    ``predicted == gold``), so that the file scores what metrics.json reports; None: the reply as it is."""

    key_field: str
    value_field: str
    jsonl: bool = False
    meta_fields: tuple[str, ...] = ()
    alt_value_fields: tuple[str, ...] = ()
    submitted: Callable[[str], str] | None = None

    @property
    def filename(self) -> str:
        return "predictions.jsonl" if self.jsonl else "predictions.json"


CAPTION_FORMAT = SubmissionFormat("image_id", "caption")
VQA_FORMAT = SubmissionFormat("question_id", "answer")
VIZWIZ_FORMAT = SubmissionFormat("image", "answer")
GQA_FORMAT = SubmissionFormat("questionId", "prediction", submitted=gqa_prediction)
POPE_FORMAT = SubmissionFormat("question_id", "text", jsonl=True, meta_fields=("prompt",), alt_value_fields=("answer",))


@dataclass
class Benchmark:
    """Items plus how to score and how to write them."""

    name: str
    task: str  # "caption" | "vqa"
    scoring: str  # "caption" | "vqa" | "exact" | "pope"
    items: list[Item]
    submission: SubmissionFormat
    notices: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def has_references(self) -> bool:
        return any(it.references for it in self.items)


# --------------------------------------------------------------------------- small helpers


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """:func:`atomic_write_text` of ``json.dumps(obj)`` (UTF-8, not ASCII-escaped)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _read_json(path: str | os.PathLike | None, what: str) -> Any:
    if path is None:
        raise BenchmarkError(f"missing {what}")
    p = Path(path)
    if not p.is_file():
        raise BenchmarkError(f"{what} not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise BenchmarkError(f"{p}: not UTF-8 text") from None


def _read_json_or_jsonl(path: str | os.PathLike | None, what: str) -> list[Any]:
    if path is None:
        raise BenchmarkError(f"missing {what}")
    p = Path(path)
    if not p.is_file():
        raise BenchmarkError(f"{what} not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BenchmarkError(f"{p}: not UTF-8 text") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return list(data)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{p}:{i}: not valid JSON lines ({e.msg})") from None
    return out


def _first_existing(candidates: list[Path]) -> str:
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(candidates[0])


def _require(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise BenchmarkError(f"{where}: missing field {key!r}")
    return obj[key]


def load_image(image: str | bytes | os.PathLike):
    """Open an item image (path or encoded bytes) as an RGB ``PIL.Image.Image`` exactly as
    training, ``mmlm describe`` and ``mmlm chat`` decode one (:func:`mmlm.api.open_image`: EXIF
    orientation applied, alpha composited on white, 16-bit images scaled to 8 bits)."""
    from mmlm.api import open_image

    return open_image(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image)


def _take(it: Iterable[Item], limit: int | None) -> list[Item]:
    out: list[Item] = []
    for item in it:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out


# --------------------------------------------------------------------------- entry point


def load_benchmark(
    task: str,
    name: str,
    *,
    annotations: str | os.PathLike | None = None,
    questions: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    shards: str | os.PathLike | list | None = None,
    split: str | None = None,
    limit: int | None = None,
    caption_prompt: str | None = None,
    prompt_suffix: str | None = DEFAULT_VQA_SUFFIX,
) -> Benchmark:
    """Read a benchmark (see the module docstring for files per benchmark).

    ``limit``: keep the first N items. ``images``: the image folder (may be ``None`` when only
    scoring predictions). ``caption_prompt``: prompt for caption models (``None``: checkpoint
    default). ``prompt_suffix``: appended to VQA questions on a new line (``None``/"" for none).
    """
    from mmlm.evaluation.readers import (
        _coco_captions, _gqa, _karpathy, _pope, _shard_captions, _shard_vqa, _textvqa, _vizwiz, _vqav2,
    )

    if limit is not None and limit < 1:
        raise BenchmarkError(f"--limit must be >= 1, got {limit}")
    if images is not None and not Path(images).is_dir():
        raise BenchmarkError(f"--images is not a folder: {images}")
    notices: list[str] = []
    sources = {k: os.fspath(v) for k, v in (("annotations", annotations), ("questions", questions),
                                            ("images", images)) if v is not None}
    if shards is not None:  # a list (Python API) is recorded as its absolute paths: one string, cwd-independent
        sources["shards"] = (" ".join(os.path.abspath(os.fspath(s)) for s in shards) if isinstance(shards, list)
                             else os.fspath(shards))
    if task == "caption":
        if name not in CAPTION_BENCHMARKS:
            raise BenchmarkError(f"unknown caption benchmark {name!r}; choose from {', '.join(CAPTION_BENCHMARKS)}")
        if name in ("coco-karpathy", "flickr30k"):
            items = _take(_karpathy(name, annotations, images, split, caption_prompt), limit)
        elif name in ("coco", "nocaps"):
            items = _take(_coco_captions(name, annotations, images, caption_prompt), limit)
        else:
            items = _shard_captions(shards, caption_prompt, limit, notices)
        bench = Benchmark(name, "caption", "caption", items, CAPTION_FORMAT, notices, sources)
    elif task == "vqa":
        if name not in VQA_BENCHMARKS:
            raise BenchmarkError(f"unknown VQA benchmark {name!r}; choose from {', '.join(VQA_BENCHMARKS)}")
        suffix = prompt_suffix or None
        if name in ("vqav2", "okvqa"):
            items = _take(_vqav2(name, questions, annotations, images, suffix, notices), limit)
            bench = Benchmark(name, "vqa", "vqa", items, VQA_FORMAT, notices, sources)
            missing = sum(1 for it in items if not it.references)
            if annotations is not None and questions is not None and items and missing == len(items):
                raise BenchmarkError(
                    f"{annotations}: no annotation for any question_id of {questions}"
                    f"{' (first ' + str(len(items)) + ' questions)' if limit is not None else ''}; "
                    "are the questions and annotations files of the same split?")
            if annotations is not None and missing:
                notices.append(f"{missing} question(s) have no annotation (or an empty answers list) and are not scored")
        elif name == "vizwiz":
            items = _take(_vizwiz(annotations, questions, images, suffix), limit)
            bench = Benchmark(name, "vqa", "vqa", items, VIZWIZ_FORMAT, notices, sources)
        elif name == "textvqa":
            items = _take(_textvqa(annotations, questions, images, suffix), limit)
            bench = Benchmark(name, "vqa", "vqa", items, VQA_FORMAT, notices, sources)
        elif name == "gqa":
            items = _take(_gqa(questions, annotations, images, suffix, notices), limit)
            bench = Benchmark(name, "vqa", "exact", items, GQA_FORMAT, notices, sources)
        elif name == "pope":
            items = _take(_pope(questions, annotations, images, suffix), limit)
            bench = Benchmark(name, "vqa", "pope", items, POPE_FORMAT, notices, sources)
        else:
            items = _shard_vqa(shards, suffix, limit, notices)
            bench = Benchmark(name, "vqa", "vqa", items, VQA_FORMAT, notices, sources)
    else:
        raise BenchmarkError(f"unknown task {task!r} (expected caption or vqa)")
    if not bench.items:
        hint = "the files, --split and --limit" if task == "caption" else "the files and --limit"
        skipped = [n for n in notices if n.startswith("skipped ")]  # e.g. shards of conversations, no questions
        raise BenchmarkError(f"{name}: no items to evaluate ({'; '.join(skipped) + '; ' if skipped else ''}"
                             f"check {hint})")
    seen: set[str] = set()
    for it in bench.items:  # predictions are keyed by id: a repeated id would be scored with another's answer
        if it.id in seen:
            key = bench.submission.key_field
            raise BenchmarkError(f"{name}: {key} {it.id} occurs more than once in the input; ids must be unique "
                                 "(files merged from several splits, e.g. POPE's, need distinct ids)")
        seen.add(it.id)
    if limit is not None and len(bench.items) >= limit:  # the limit cut the benchmark (or just fit it)
        notices.append(f"--limit {limit}: the first {len(bench.items)} items only, not the benchmark's full score")
    return bench


# --------------------------------------------------------------------------- predictions files


def _key_value(item: Item, fmt: SubmissionFormat) -> Any:
    return item.meta.get(fmt.key_field, item.id)


def write_predictions(bench: Benchmark, predictions: Mapping[str, str], path: str | os.PathLike) -> int:
    """Write ``predictions`` (item id -> text) for the benchmark's items, in item order, in its
    submission format; items without a prediction are left out. Returns the number written."""
    fmt = bench.submission
    rows = []
    for it in bench.items:
        if it.id not in predictions:
            continue
        row: dict[str, Any] = {fmt.key_field: _key_value(it, fmt)}
        for m in fmt.meta_fields:
            if m in it.meta:
                row[m] = it.meta[m]
        reply = predictions[it.id]
        row[fmt.value_field] = fmt.submitted(reply) if fmt.submitted is not None else reply
        rows.append(row)
    if fmt.jsonl:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        atomic_write_json(path, rows, indent=None)
    return len(rows)


_JSON_TYPE = {int: "an integer", str: "a string", float: "a number with a fraction", bool: "a boolean",
              type(None): "null", list: "a list", dict: "an object"}


def _check_id_type(bench: Benchmark, key: Any, types: Mapping[str, type], all_types: set[type], where: str) -> None:
    """A prediction's id must have the JSON type the benchmark's own files give that item's id (COCO ``image_id``,
    VQA ``question_id``: integers; GQA ``questionId``, VizWiz ``image``: strings; shards: either), as the official
    evaluations compare them (pycocotools' and VQA's ``loadRes`` assert the result ids are the dataset's, GQA's
    ``eval.py`` looks predictions up by the string): ``"123"`` for 123 would match by coercion here only."""
    expected = types.get(str(key))
    if type(key) is expected or (expected is None and type(key) in all_types):
        return
    want = expected or next(iter(all_types), str)  # an id outside the evaluated set: the set's type(s)
    if expected is None and len(all_types) > 1:
        names = " or ".join(sorted(_JSON_TYPE.get(t, t.__name__) for t in all_types))
    else:
        names = _JSON_TYPE.get(want, want.__name__)
    field_name = bench.submission.key_field
    given = "is null" if key is None else \
        f"{json.dumps(key, ensure_ascii=False)} is {_JSON_TYPE.get(type(key), type(key).__name__)}"
    raise BenchmarkError(f"{where}: {field_name} {given}; {bench.name} expects {names} {field_name} "
                         "(as its own files have it)")


def read_predictions(bench: Benchmark, path: str | os.PathLike) -> dict[str, str]:
    """Read a results file in the benchmark's submission format -> ``{item id: text}``.

    Accepts a JSON list or JSON lines either way. Raises :class:`BenchmarkError` on a malformed
    entry, a duplicated id, or an id of another JSON type than the benchmark's own files give it
    (:func:`_check_id_type`)."""
    fmt = bench.submission
    rows = _read_json_or_jsonl(path, "--predictions")
    types = {it.id: type(_key_value(it, fmt)) for it in bench.items}
    all_types = set(types.values())
    out: dict[str, str] = {}
    for i, r in enumerate(rows):
        where = f"{path}: entry {i}"
        if not isinstance(r, dict) or fmt.key_field not in r:
            raise BenchmarkError(f"{where}: expected an object with {fmt.key_field!r} (format: "
                                 f"{{{fmt.key_field!r}: ..., {fmt.value_field!r}: ...}})")
        _check_id_type(bench, r[fmt.key_field], types, all_types, where)
        value = r.get(fmt.value_field)
        for alt in fmt.alt_value_fields:
            if value is None:
                value = r.get(alt)
        if not isinstance(value, str):
            raise BenchmarkError(f"{where}: {fmt.value_field!r} must be a string")
        key = str(r[fmt.key_field])
        if key in out:
            raise BenchmarkError(f"{where}: duplicate prediction for {fmt.key_field} {key}")
        out[key] = value
    return out
