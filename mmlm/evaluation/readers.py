"""Per-benchmark readers: each benchmark's official files -> :class:`~mmlm.evaluation.benchmarks.Item` objects.

Contract: one reader per file format (Karpathy splits, COCO-style captions, VQA v2/OK-VQA,
VizWiz, TextVQA, GQA, POPE, our tar shards; the files each one reads are tabled in
:mod:`mmlm.evaluation.benchmarks`). A reader reads only what it needs from its files, keeps file
order, and yields (file readers: generators, cut to ``limit`` by the caller) or returns (shard
readers: they take ``limit`` themselves, since records of one id are merged or checked for
duplicates) :class:`Item` objects whose ``id`` is the submission key as text. Skipped entries are
reported as one line each in the caller's ``notices`` list, never silently. Bad input raises
:class:`~mmlm.evaluation.benchmarks.BenchmarkError` with a one-line reason naming the file.
Readers write nothing; choosing a reader, the scoring rule and the submission format is
:func:`mmlm.evaluation.benchmarks.load_benchmark`'s job (it imports this module when called).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmlm.evaluation.benchmarks import (
    KARPATHY_SPLITS,
    BenchmarkError,
    Item,
    _first_existing,
    _read_json,
    _read_json_or_jsonl,
    _require,
    vqa_prompt,
)


def _answers(entry: dict, where: str) -> tuple[str, ...]:
    """An entry's human answers: ``answers`` is a list of ``{"answer": ...}`` objects or strings
    (absent or null: none); anything else is a :class:`BenchmarkError` (a string would otherwise
    be read as one answer per character)."""
    raw = entry.get("answers")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BenchmarkError(f"{where}: 'answers' must be a list, got {type(raw).__name__}")
    out = []
    for j, a in enumerate(raw):
        if isinstance(a, dict):
            a = _require(a, "answer", f"{where}: answers[{j}]")
        elif not isinstance(a, str):
            raise BenchmarkError(f"{where}: answers[{j}] must be a string or an object with 'answer'")
        out.append(str(a))
    return tuple(out)


# --------------------------------------------------------------------------- caption readers


def _karpathy(name: str, annotations, images, split: str | None, caption_prompt) -> Iterator[Item]:
    data = _read_json(annotations, f"--annotations (Karpathy dataset_*.json for {name})")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise BenchmarkError(f"{annotations}: not a Karpathy split file (no 'images' list)")
    split = split or "test"
    if split not in KARPATHY_SPLITS:
        raise BenchmarkError(f"--split must be one of {', '.join(KARPATHY_SPLITS)}, got {split!r}")
    root = Path(images) if images else None
    seen: set[str] = set()
    for i, e in enumerate(entries):
        where = f"{annotations}: images[{i}]"
        if not isinstance(e, dict):
            raise BenchmarkError(f"{where}: expected an object, got {type(e).__name__}")
        if split != "all" and e.get("split") != split:
            continue
        filename = _require(e, "filename", where)
        if "cocoid" in e:
            image_id: Any = e["cocoid"]
        else:
            stem = Path(filename).stem
            image_id = int(stem) if stem.isdigit() else e.get("imgid", stem)
        refs = tuple(s.get("raw", " ".join(s.get("tokens", []))) for s in _require(e, "sentences", where))
        path = None
        if root is not None:
            cands = [root / e["filepath"] / filename] if e.get("filepath") else []
            path = _first_existing(cands + [root / filename])
        iid = str(image_id)
        if iid in seen:
            raise BenchmarkError(f"{where}: duplicate image id {iid}")
        seen.add(iid)
        yield Item(id=iid, image=path, prompt=caption_prompt, references=refs, meta={"image_id": image_id})


def _coco_captions(name: str, annotations, images, caption_prompt) -> Iterator[Item]:
    data = _read_json(annotations, f"--annotations (COCO-style captions json for {name})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BenchmarkError(f"{annotations}: not a COCO captions file (no 'images' list)")
    refs: dict[Any, list[str]] = {}
    for j, a in enumerate(data.get("annotations") or []):
        where = f"{annotations}: annotations[{j}]"
        refs.setdefault(_require(a, "image_id", where), []).append(str(_require(a, "caption", where)))
    ids = {im.get("id") for im in data["images"] if isinstance(im, dict)}
    if refs and not any(k in ids for k in refs):  # it would score nothing, as a test split without references
        some_ref, some_id = next(iter(refs)), next(iter(ids), None)
        raise BenchmarkError(f"{annotations}: no annotation's image_id is an id of its 'images' (annotations: "
                             f"{some_ref!r}, images: {some_id!r}; numbers written as strings?)")
    root = Path(images) if images else None
    for i, im in enumerate(data["images"]):
        where = f"{annotations}: images[{i}]"
        image_id = _require(im, "id", where)
        file_name = im.get("file_name")
        path = None
        if root is not None:
            if not file_name:
                raise BenchmarkError(f"{where}: missing field 'file_name'")
            path = _first_existing([root / file_name, root / Path(file_name).name])
        groups = {"perDomain": im.get("domain")} if name == "nocaps" and im.get("domain") else {}
        yield Item(
            id=str(image_id), image=path, prompt=caption_prompt,
            references=tuple(refs.get(image_id, ())), groups=groups, meta={"image_id": image_id},
        )


def _shard_records(shards, notices: list[str]):
    from mmlm.data.schema import iter_tar_records

    bad: list[str] = []

    def on_error(key: str, exc: Exception) -> None:
        bad.append(f"{key}: {exc}")

    try:
        yield from iter_tar_records(shards, on_error=on_error)
    except FileNotFoundError as e:
        raise BenchmarkError(str(e)) from None
    finally:
        if bad:
            notices.append(f"skipped {len(bad)} bad shard sample(s); first: {bad[0]}")


def _shard_captions(shards, caption_prompt, limit, notices: list[str]) -> list[Item]:
    if not shards:
        raise BenchmarkError("--benchmark shards needs --shards PATTERN (files, folders or {a..b} brace patterns)")
    order: list[str] = []
    by_id: dict[str, dict[str, Any]] = {}
    no_image = no_caption = 0
    for rec in _shard_records(shards, notices):
        refs = list(rec.captions) or ([rec.caption] if rec.caption else [])
        if not rec.images:
            no_image += 1
            continue
        if not refs:
            no_caption += 1
            continue
        raw_id = rec.meta.get("image_id", rec.key)
        iid = str(raw_id)
        if iid not in by_id:
            if limit is not None and len(order) >= limit:
                break
            order.append(iid)
            by_id[iid] = {"image": rec.images[0], "refs": [], "raw": raw_id}
        by_id[iid]["refs"].extend(refs)
    if no_image:
        notices.append(f"skipped {no_image} shard sample(s) without an image")
    if no_caption:
        notices.append(f"skipped {no_caption} shard sample(s) without caption/captions")
    return [
        Item(id=i, image=by_id[i]["image"], prompt=caption_prompt, references=tuple(by_id[i]["refs"]),
             meta={"image_id": by_id[i]["raw"]})
        for i in order
    ]


# --------------------------------------------------------------------------- vqa readers


# COCO ships no test-dev image folder: test-dev2015 is a subset of test2015, whose files are
# test2015/COCO_test2015_*.jpg, so a questions file's data_subtype names the folder via this map
_IMAGE_SUBTYPE = {"test-dev2015": "test2015"}


def _coco_image_candidates(root: Path, subtypes: list[str], image_id: int) -> list[Path]:
    """Where a COCO image may be: ``root`` is the split's image folder or its parent."""
    cands: list[Path] = []
    for sub in subtypes:
        name = f"COCO_{sub}_{int(image_id):012d}.jpg"
        cands += [root / name, root / sub / name]
    cands += [root / f"{int(image_id):012d}.jpg"]
    cands += [root / f"{image_id}.{ext}" for ext in ("jpg", "jpeg", "png", "webp")]
    return cands


def _vqav2(name, questions, annotations, images, suffix, notices) -> Iterator[Item]:
    anns: dict[Any, dict] = {}
    if annotations is not None:
        adata = _read_json(annotations, "--annotations")
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise BenchmarkError(f"{annotations}: not a VQA annotations file (no 'annotations' list)")
        for j, a in enumerate(adata["annotations"]):
            anns[_require(a, "question_id", f"{annotations}: annotations[{j}]")] = a
    if questions is None:
        if not anns:
            raise BenchmarkError(f"{name} needs --questions (OpenEnded questions json) and, to score, --annotations")
        qlist = [{"question_id": q, "image_id": a.get("image_id"), "question": None} for q, a in anns.items()]
        subtypes = ["val2014"]
    else:
        qdata = _read_json(questions, "--questions")
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            raise BenchmarkError(f"{questions}: not a VQA questions file (no 'questions' list)")
        qlist = qdata["questions"]
        sub = qdata.get("data_subtype")
        subtypes = [_IMAGE_SUBTYPE.get(sub, sub)] if sub else ["val2014", "test2015", "train2014"]
    root = Path(images) if images else None
    for i, q in enumerate(qlist):
        where = f"{questions}: questions[{i}]"
        qid = _require(q, "question_id", where)
        image_id = q.get("image_id")
        a = anns.get(qid)
        refs = _answers(a, f"{annotations}: question_id {qid}") if a else ()
        groups = {"perQuestionType": a.get("question_type"), "perAnswerType": a.get("answer_type")} if a else {}
        path = None
        if root is not None and image_id is not None:
            path = _first_existing(_coco_image_candidates(root, subtypes, image_id))
        question = q.get("question")
        yield Item(
            id=str(qid), image=path, prompt=vqa_prompt(question, suffix) if question else None,
            references=refs, question=question, groups=groups, meta={"question_id": qid, "image_id": image_id},
        )


def _vizwiz(annotations, questions, images, suffix) -> Iterator[Item]:
    path_ = annotations or questions
    data = _read_json(path_, "--annotations (VizWiz val.json)")
    if not isinstance(data, list):
        raise BenchmarkError(f"{path_}: not a VizWiz annotations file (expected a JSON list)")
    root = Path(images) if images else None
    for i, e in enumerate(data):
        where = f"{path_}[{i}]"
        image = _require(e, "image", where)
        question = str(_require(e, "question", where))
        refs = _answers(e, where)
        groups = {"perAnswerType": e.get("answer_type")} if e.get("answer_type") else {}
        yield Item(
            id=str(image), image=str(root / image) if root else None, prompt=vqa_prompt(question, suffix),
            references=refs, question=question, groups=groups, meta={"image": image},
        )


def _textvqa(annotations, questions, images, suffix) -> Iterator[Item]:
    path_ = annotations or questions
    data = _read_json(path_, "--annotations (TextVQA json)")
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise BenchmarkError(f"{path_}: not a TextVQA file (no 'data' list)")
    root = Path(images) if images else None
    for i, e in enumerate(rows):
        where = f"{path_}: data[{i}]"
        qid = _require(e, "question_id", where)
        image_id = _require(e, "image_id", where)
        question = str(_require(e, "question", where))
        path = _first_existing([root / f"{image_id}.jpg", root / str(image_id)]) if root else None
        yield Item(
            id=str(qid), image=path, prompt=vqa_prompt(question, suffix),
            references=_answers(e, where), question=question,
            meta={"question_id": qid, "image_id": image_id},
        )


def _gqa(questions, annotations, images, suffix, notices) -> Iterator[Item]:
    path_ = questions or annotations
    data = _read_json(path_, "--questions (GQA *_balanced_questions.json)")
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path_}: not a GQA questions file (expected {{questionId: {{...}}}})")
    root = Path(images) if images else None
    unbalanced = 0
    for qid, q in data.items():
        where = f"{path_}: {qid}"
        if not isinstance(q, dict):
            raise BenchmarkError(f"{where}: expected a question object, got {type(q).__name__} "
                                 "(not a GQA questions file?)")
        if q.get("isBalanced") is False:
            unbalanced += 1
            continue
        image_id = _require(q, "imageId", where)
        question = str(_require(q, "question", where))
        types = q.get("types") or {}
        structural = types.get("structural")
        groups = {
            "perAnswerType": None if structural is None else ("open" if structural == "query" else "binary"),
            "perStructuralType": structural,
            "perSemanticType": types.get("semantic"),
        }
        yield Item(
            id=str(qid), image=str(root / f"{image_id}.jpg") if root else None, prompt=vqa_prompt(question, suffix),
            references=(str(q["answer"]),) if "answer" in q else (), question=question,
            groups={k: v for k, v in groups.items() if v is not None}, meta={"questionId": qid, "imageId": image_id},
        )
    if unbalanced:
        notices.append(f"skipped {unbalanced} unbalanced GQA question(s) (isBalanced=false), as GQA's eval does")


def _pope(questions, annotations, images, suffix) -> Iterator[Item]:
    path_ = questions or annotations
    rows = _read_json_or_jsonl(path_, "--questions (POPE jsonl with question_id, image, text, label)")
    root = Path(images) if images else None
    for i, e in enumerate(rows):
        where = f"{path_}: line {i + 1}"
        qid = _require(e, "question_id", where)
        image = _require(e, "image", where)
        question = str(e.get("text", e.get("question", "")))
        if not question:
            raise BenchmarkError(f"{where}: missing field 'text' (the question)")
        label = e.get("label", e.get("answer"))
        refs: tuple[str, ...] = ()
        if label is not None:
            label = str(label).strip().lower()
            if label not in ("yes", "no"):
                raise BenchmarkError(f"{where}: label must be yes or no, got {label!r}")
            refs = (label,)
        groups = {"perCategory": e["category"]} if e.get("category") else {}
        yield Item(
            id=str(qid), image=str(root / image) if root else None, prompt=vqa_prompt(question, suffix),
            references=refs, question=question, groups=groups,
            meta={"question_id": qid, "image": image, "prompt": question},
        )


def _shard_vqa(shards, suffix, limit, notices: list[str]) -> list[Item]:
    if not shards:
        raise BenchmarkError("--benchmark shards needs --shards PATTERN (files, folders or {a..b} brace patterns)")
    out: list[Item] = []
    seen: set[str] = set()
    no_image = no_question = 0
    for rec in _shard_records(shards, notices):
        if limit is not None and len(out) >= limit:
            break
        if rec.question is None or not rec.question.strip():
            no_question += 1
            continue
        if not rec.images:
            no_image += 1
            continue
        raw_id = rec.meta.get("question_id", rec.key)
        qid = str(raw_id)
        if qid in seen:
            raise BenchmarkError(f"shard sample {rec.key}: duplicate question_id {qid}")
        seen.add(qid)
        groups = {k: rec.meta.get(m) for k, m in (("perQuestionType", "question_type"), ("perAnswerType", "answer_type"))}
        out.append(Item(
            id=qid, image=rec.images[0], prompt=vqa_prompt(rec.question, suffix), references=tuple(rec.answers),
            question=rec.question, groups={k: str(v) for k, v in groups.items() if v is not None},
            meta={"question_id": raw_id, "image_id": rec.meta.get("image_id")},
        ))
    if no_question:
        notices.append(f"skipped {no_question} shard sample(s) without a question")
    if no_image:
        notices.append(f"skipped {no_image} shard sample(s) without an image")
    return out
