"""Build VQA shards from VQAv2 questions (+ annotations when the split has them).

Inputs: ``--questions v2_OpenEnded_mscoco_val2014_questions.json`` (``{"questions": [{"image_id",
"question", "question_id"}]}``) and optionally ``--annotations v2_mscoco_val2014_annotations.json``
(``{"annotations": [{"question_id", "image_id", "answers": [{"answer", "answer_confidence",
"answer_id"}], "multiple_choice_answer", "question_type", "answer_type"}]}``); test splits have no
annotations, and their samples carry the question only. Images are
``--images/COCO_{split}_{image_id:012d}.jpg`` (``--image-pattern`` changes this).

Output, one sample per question (the image bytes are repeated per question; each image is read
and checked once): ``KEY.jpg`` + ``KEY.json`` ``{"question", "answers": [10 answer strings],
"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
"answer_confidences": [...]}``. Key: the question id. A re-run with other inputs or options
(``--questions``, ``--annotations``, ``--images``, ``--split``, ``--image-pattern``,
``--resize-max``, ``--max-pixels``) into the same ``--out`` is an error (``OUT/PREFIX.manifest.json``
records what it was built from; ``--overwrite`` starts afresh). Usage::

    python -m data_pipelines.from_vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --images val2014/ --split val2014 --out shards/vqav2-val
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from pathlib import Path

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

DEFAULT_PATTERN = "COCO_{split}_{image_id:012d}.jpg"


def question_key(question_id: int) -> str:
    return str(int(question_id))


def group_by_image(questions: list[dict], annotations: dict[int, dict] | None) -> list[dict]:
    """[{image_id, items: [(question, annotation|None)]}] in order of first appearance."""
    groups: dict[int, dict] = {}
    for q in questions:
        try:
            image_id, qid = int(q["image_id"]), int(q["question_id"])
        except (KeyError, TypeError, ValueError):
            raise BuildError(f'question without "image_id"/"question_id": {str(q)[:80]}') from None
        ann = annotations.get(qid) if annotations is not None else None
        groups.setdefault(image_id, {"image_id": image_id, "items": []})["items"].append((q, ann))
    return list(groups.values())


def build_records(
    group: dict, *, images: Path, pattern: str, split: str, resize_max: int | None, max_pixels: int, need_answers: bool
) -> list[Record | Skip]:
    """Worker: one image and its questions -> one record per question."""
    image_id = group["image_id"]
    path = images / pattern.format(split=split, image_id=image_id)
    data, ext = load_image(path, resize_max=resize_max, max_pixels=max_pixels)
    out: list[Record | Skip] = []
    for q, ann in group["items"]:
        key = question_key(q["question_id"])
        text = q.get("question")
        if not isinstance(text, str) or not text.strip():
            out.append(Skip(key, "empty question"))
            continue
        if need_answers and ann is None:
            out.append(Skip(key, "no annotation", "question id missing from --annotations"))
            continue
        meta = {"question_id": int(q["question_id"]), "image_id": image_id}
        answers: list[str] = []
        if ann is not None:
            raw = ann.get("answers") or []
            answers = [a.get("answer") if isinstance(a, dict) else a for a in raw] if isinstance(raw, list) else None
            if answers is None or not all(isinstance(a, str) for a in answers):
                out.append(Skip(key, "bad annotation", "answers must be a list of strings or {answer: str}"))
                continue
            for f in ("question_type", "answer_type", "multiple_choice_answer"):
                if f in ann:
                    meta[f] = ann[f]
            confs = [a.get("answer_confidence") for a in raw if isinstance(a, dict)]
            if confs and len(confs) == len(answers):
                meta["answer_confidences"] = confs
        out.append(Record(key, [data], [ext], question=text, answers=answers, meta=meta))
    return out


def make_parser() -> argparse.ArgumentParser:
    p = builder_parser("from_vqav2", __doc__)
    p.add_argument("--questions", required=True, type=Path, help="VQAv2 questions json")
    p.add_argument("--annotations", type=Path, default=None, help="VQAv2 annotations json (omit for test splits)")
    p.add_argument("--images", required=True, type=Path, help="COCO image directory of the split")
    p.add_argument(
        "--split", required=True, help="COCO split name used in file names, e.g. train2014, val2014, test2015"
    )
    p.add_argument(
        "--image-pattern",
        default=DEFAULT_PATTERN,
        help=f"image file name under --images (default {DEFAULT_PATTERN!r}; '{{image_id:012d}}.jpg' for 2017 names)",
    )
    return with_output_and_image_args(p)


def run(args: argparse.Namespace) -> int:
    check_output_args(args)
    require_dir(args.images, "--images")
    try:
        args.image_pattern.format(split=args.split, image_id=1)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise BuildError(f"bad --image-pattern {args.image_pattern!r}: {e}") from None
    qdata = load_json(args.questions, "--questions")
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise BuildError(f'--questions {args.questions} has no "questions" list')
    annotations = None
    if args.annotations is not None:
        adata = load_json(args.annotations, "--annotations")
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise BuildError(f'--annotations {args.annotations} has no "annotations" list')
        try:
            annotations = {int(a["question_id"]): a for a in adata["annotations"]}
        except (KeyError, TypeError, ValueError):
            raise BuildError('an annotation without "question_id"') from None
        del adata
    groups = group_by_image(qdata["questions"], annotations)
    n_questions = len(qdata["questions"])
    del qdata
    if not groups:
        raise BuildError(f"no questions in {args.questions}")
    print(f"{n_questions} questions on {len(groups)} images" + ("" if annotations is not None else " (no annotations)"))

    def jobs() -> Iterator[Job]:
        for g in groups:
            yield Job(tuple(question_key(q["question_id"]) for q, _ in g["items"]), g)

    fn = functools.partial(
        build_records,
        images=args.images,
        pattern=args.image_pattern,
        split=args.split,
        need_answers=annotations is not None,
        **image_options(args),
    )
    manifest = build_manifest(
        "from_vqav2", args, ["questions", "annotations", "images"], ["split", "image_pattern", *IMAGE_OPTIONS]
    )
    return build_and_report(args, jobs(), fn, total=n_questions, manifest=manifest)


main = builder_main(run, make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
