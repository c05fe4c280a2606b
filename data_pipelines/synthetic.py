"""Procedural shapes dataset: drawn scenes with exact captions and VQA, as shards and benchmarks.

Each image (``--image-size`` px, 32..512, default 72: three 24 px cells a side) shows 1 to 3 objects on a plain, noisy or
striped background in muted grey tones (never close to an object colour). An object has

* a shape: circle, square, triangle, star, diamond, cross;
* a colour: red, orange, yellow, green, cyan, blue, purple, white;
* a size: small, large;
* a position: top, left, center, right, bottom -- the five cells of a plus on a 3x3 grid, so each
  object has exactly one position word and the objects of an image occupy distinct cells.

Objects of one image have distinct (colour, shape) pairs. Small jitter in place, scale, rotation
and colour; sometimes an object is pulled towards the center one so they partly overlap.

Caption (canonical, a function of the scene): objects in reading order (top, left, center,
right, bottom), ``"a {size} {colour} {shape} {where}"`` joined by ", " and " and ", where is
``at the top | on the left | in the center | on the right | at the bottom``, e.g.
``"a small red star on the left and a large blue square at the bottom"``.

Questions (single-word answers): colour (``what color is the star?`` -> ``red``), shape
(``what shape is on the left?`` -> ``star``), size (``what size is the red star?`` -> ``small``),
count (``how many shapes are there?`` -> ``2``; also per colour/shape, answers 0..3, digits as in VQAv2),
position (``where is the red star?`` -> ``left``), exists (``is there a green circle?`` ->
``yes``/``no``, balanced). Objects are named unambiguously (shape, else size+shape, else shape+place).
Training conversations also ask half their size and position questions by shape alone where the
shape is unique (``where is the star?``), so that finding an object by its shape is trained as often
as finding it by its colour; val/test questions never take that form.

Output layout (``--out DIR``)::

    DIR/synthetic.json                     arguments, vocabulary, counts ("complete": true at the end)
    DIR/train/shard-000000.tar ...         one sample per image: KEY.png, KEY.txt (caption),
                                           KEY.json {"conversations": [...], "image_id", "objects"}
    DIR/{val,test}/shard-000000.tar ...    per image: KEY.png, KEY.txt, KEY.json {"captions": [caption],
                                           "image_id", "objects"}; then its 6 questions (one per type),
                                           keys KEY_q0..KEY_q5: KEY_qN.png (same bytes), KEY_qN.json
                                           {"question", "answers": [answer]*10, "question_id", "image_id",
                                           "question_type", "answer_type", "multiple_choice_answer"}
    DIR/{val,test}/images/{image_id}.png
    DIR/{val,test}/annotations/captions.json        COCO captions format
    DIR/{val,test}/annotations/questions.json       VQAv2 questions format
    DIR/{val,test}/annotations/vqa_annotations.json VQAv2 annotations format

Keys are ``{split}_%08d`` of the image id (the index within its split, from 0), so they are
unique over the dataset; question ids are ``image_id * 10 + N``. Train conversations start with
``"<image>\\n"`` in the first human turn and hold 3 to 5 question/answer turns. Every image is
seeded from ``(seed, split, index)`` and every shard is made by one task, so the output is
byte-identical for a seed whatever ``--workers``. A re-run over a half-done output keeps the
complete shards and makes the missing ones; an interrupted run (Ctrl-C) leaves only complete
shards and images behind. ``--shard-size`` counts samples; a val/test shard holds
``shard_size // 7`` images (at least 1) with their questions. Usage::

    python -m data_pipelines.synthetic --out data/shapes --train 20000 --val 500 --test 500
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmlm.data.schema import Record
from mmlm.data.writer import ShardWriter, resume_state, shard_name

from ._common import (
    BuildError,
    atomic_write_bytes,
    atomic_write_json,
    builder_main,
    builder_parser,
    parallel_map,
    progress,
    require_at_least_one,
    require_output_dir,
)
from .synthetic_render import RADIUS, encode_png, render
from .synthetic_scenes import (
    CELLS,
    COLORS,
    NUMBERS,
    PLURALS,
    POSITIONS,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    WHERE,
    Obj,
    Scene,
    article,
    caption_of,
    conversation_for,
    image_rng,
    objects_of,
    question_for,
    sample_scene,
)

# The scenes, their text and their drawing live in synthetic_scenes and synthetic_render; their
# names are re-exported here, where callers have always imported them from.
__all__ = [
    # dataset: this module
    "VERSION",
    "SPLITS",
    "ANSWER_TYPES",
    "N_HUMAN_ANSWERS",
    "image_key",
    "make_train",
    "make_eval",
    "Task",
    "run_task",
    "plan",
    "write_annotations",
    "make_parser",
    "check_args",
    "build",
    "run",
    "main",
    # scenes and their text: synthetic_scenes
    "SHAPES",
    "PLURALS",
    "COLORS",
    "SIZES",
    "POSITIONS",
    "CELLS",
    "WHERE",
    "NUMBERS",
    "QUESTION_TYPES",
    "Obj",
    "Scene",
    "image_rng",
    "sample_scene",
    "article",
    "caption_of",
    "objects_of",
    "question_for",
    "conversation_for",
    # drawing: synthetic_render
    "RADIUS",
    "render",
    "encode_png",
]

VERSION = 5
SPLITS = ("train", "val", "test")
ANSWER_TYPES = {"exists": "yes/no", "count": "number"}  # others: "other"
N_HUMAN_ANSWERS = 10


# ----------------------------------------------------------------------------- samples


def image_key(split: str, image_id: int) -> str:
    """``train_00000012``: unique over the whole dataset (image ids restart at 0 in each split)."""
    return f"{split}_{image_id:08d}"


def make_train(seed: int, index: int, size: int, render_image: bool = True) -> Record:
    rng = image_rng(seed, "train", index)
    scene = sample_scene(rng)
    conv = conversation_for(scene, rng)
    png = encode_png(render(scene, size)) if render_image else b""
    meta = {"image_id": index, "objects": objects_of(scene)}
    return Record(image_key("train", index), [png], ["png"], caption=caption_of(scene), conversations=conv, meta=meta)


def make_eval(seed: int, split: str, index: int, size: int, render_image: bool = True) -> tuple[list[Record], dict]:
    """The image sample, its 6 question samples, and its annotation entries."""
    rng = image_rng(seed, split, index)
    scene = sample_scene(rng)
    caption = caption_of(scene)
    png = encode_png(render(scene, size)) if render_image else b""
    key = image_key(split, index)
    recs = [
        Record(
            key,
            [png],
            ["png"],
            caption=caption,
            captions=[caption],
            meta={"image_id": index, "objects": objects_of(scene)},
        )
    ]
    ann: dict[str, list] = {"images": [], "captions": [], "questions": [], "vqa": []}
    ann["images"].append({"id": index, "file_name": f"{index}.png", "width": size, "height": size})
    ann["captions"].append({"image_id": index, "id": index, "caption": caption})
    for k, qtype in enumerate(QUESTION_TYPES):
        q, word = question_for(qtype, scene, rng, exists_yes=(index % 2 == 0) if qtype == "exists" else None)
        a = word  # as VQAv2 stores answers (numbers in digits: synthetic_scenes.NUMBERS), as trained
        qid = index * 10 + k
        atype = ANSWER_TYPES.get(qtype, "other")
        meta = {
            "question_id": qid,
            "image_id": index,
            "question_type": qtype,
            "answer_type": atype,
            "multiple_choice_answer": a,
        }
        recs.append(Record(f"{key}_q{k}", [png], ["png"], question=q, answers=[a] * N_HUMAN_ANSWERS, meta=meta))
        ann["questions"].append({"image_id": index, "question": q, "question_id": qid})
        ann["vqa"].append(
            {
                "question_id": qid,
                "image_id": index,
                "question_type": qtype,
                "answer_type": atype,
                "multiple_choice_answer": a,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i in range(N_HUMAN_ANSWERS)
                ],
            }
        )
    return recs, ann


# ----------------------------------------------------------------------------- tasks (one per shard)


@dataclass(frozen=True)
class Task:
    out: str  # split directory
    split: str
    shard: int
    start: int  # first image index
    stop: int
    seed: int
    size: int


def run_task(t: Task) -> dict[str, Any]:
    """Make one shard (unless it is already complete) and return its annotation entries."""
    out = Path(t.out)
    done = (out / shard_name("shard", t.shard)).exists()
    ann: dict[str, list] = {"images": [], "captions": [], "questions": [], "vqa": []}
    rendered = 0
    if t.split == "train":
        if not done:
            with ShardWriter(out, "shard", max_count=1 << 30, max_size=1 << 62, start_index=t.shard) as w:
                for i in range(t.start, t.stop):
                    w.write(make_train(t.seed, i, t.size))
            rendered = t.stop - t.start
        return {"ann": ann, "rendered": rendered, "images": t.stop - t.start}
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    writer = None if done else ShardWriter(out, "shard", max_count=1 << 30, max_size=1 << 62, start_index=t.shard)
    try:
        for i in range(t.start, t.stop):
            png_path = images_dir / f"{i}.png"
            need = writer is not None or not png_path.exists()
            recs, a = make_eval(t.seed, t.split, i, t.size, render_image=need)
            for k in ann:
                ann[k] += a[k]
            if need:
                rendered += 1
                atomic_write_bytes(png_path, recs[0].images[0])
            if writer is not None:
                for r in recs:
                    writer.write(r)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    return {"ann": ann, "rendered": rendered, "images": t.stop - t.start}


def plan(out: Path, split: str, n: int, shard_size: int, seed: int, size: int) -> list[Task]:
    per = shard_size if split == "train" else max(1, shard_size // (1 + len(QUESTION_TYPES)))
    return [Task(str(out / split), split, k, lo, min(n, lo + per), seed, size) for k, lo in enumerate(range(0, n, per))]


def _drop_temporaries(split_dir: Path) -> None:
    """Delete the temporary shards and images that killed workers left in ``split_dir``."""
    resume_state(split_dir, "shard", read_keys=False)  # removes .shard-*.tar.tmp
    for tmp in (split_dir / "images").glob(".*.png.tmp"):
        tmp.unlink(missing_ok=True)


def write_annotations(split_dir: Path, split: str, ann: dict[str, list], info: dict) -> None:
    d = split_dir / "annotations"
    info = dict(info, split=split)
    atomic_write_json(
        d / "captions.json",
        {"info": info, "licenses": [], "type": "captions", "images": ann["images"], "annotations": ann["captions"]},
    )
    atomic_write_json(
        d / "questions.json",
        {
            "info": info,
            "license": {},
            "task_type": "Open-Ended",
            "data_type": "synthetic-shapes",
            "data_subtype": split,
            "questions": ann["questions"],
        },
    )
    atomic_write_json(
        d / "vqa_annotations.json",
        {
            "info": info,
            "license": {},
            "data_type": "synthetic-shapes",
            "data_subtype": split,
            "annotations": ann["vqa"],
        },
    )


# ----------------------------------------------------------------------------- command line


def make_parser() -> argparse.ArgumentParser:
    p = builder_parser("synthetic", __doc__)
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    p.add_argument("--val", type=int, default=500, help="validation images, 6 questions each (default 500)")
    p.add_argument("--test", type=int, default=500, help="test images, 6 questions each (default 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, default=72, help="image side in pixels, 32..512 (default 72)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("train", "val", "test"):
        if getattr(args, name) < 0:
            raise BuildError(f"--{name} must be >= 0")
    if args.train + args.val + args.test == 0:
        raise BuildError("nothing to make: --train, --val and --test are all 0")
    if not 32 <= args.image_size <= 512:
        raise BuildError(f"--image-size must be in 32..512, got {args.image_size}")
    require_at_least_one(args.shard_size, "--shard-size")
    require_at_least_one(args.workers, "--workers")
    require_output_dir(args.out)


def build(
    out: str | os.PathLike,
    *,
    train: int = 20000,
    val: int = 500,
    test: int = 500,
    seed: int = 0,
    image_size: int = 72,
    shard_size: int = 1000,
    workers: int = 2,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish building) the dataset under ``out``; return the manifest (``synthetic.json``)."""
    out = Path(out)
    params = {
        "version": VERSION,
        "seed": seed,
        "image_size": image_size,
        "train": train,
        "val": val,
        "test": test,
        "shard_size": shard_size,
    }
    manifest_path = out / "synthetic.json"
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())["params"]
        except (ValueError, KeyError, TypeError):
            raise BuildError(f"{manifest_path} is unreadable; delete {out} or use another --out") from None
        if old != params:
            diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in params.items() if old.get(k) != v)
            raise BuildError(f"{out} was built with other arguments ({diff}); use another --out or delete it")
    elif out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} is not empty and has no synthetic.json; use an empty or new --out")
    manifest: dict[str, Any] = {
        "params": params,
        "complete": False,
        "vocabulary": {
            "shapes": list(SHAPES),
            "colors": list(COLORS),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
            "numbers": list(NUMBERS),
            "question_types": list(QUESTION_TYPES),
        },
    }
    atomic_write_json(manifest_path, manifest, indent=1)
    counts = {"train": train, "val": val, "test": test}
    tasks: list[Task] = []
    for split in SPLITS:
        if counts[split]:
            resume_state(out / split, "shard", read_keys=False)  # drops unfinished temp shards
            tasks += plan(out, split, counts[split], shard_size, seed, image_size)
    info = {"description": "mmlm synthetic shapes", "version": VERSION, "seed": seed, "image_size": image_size}
    ann: dict[str, dict[str, list]] = {s: {"images": [], "captions": [], "questions": [], "vqa": []} for s in SPLITS}
    t0 = time.perf_counter()
    rendered = 0
    bar = progress(sum(counts.values()), "synthetic", disable=not show_progress, unit="img")
    try:
        for task, res in zip(tasks, parallel_map(run_task, tasks, workers, chunk=1, ahead=2)):
            rendered += res["rendered"]
            for k, v in res["ann"].items():
                ann[task.split][k] += v
            bar.update(res["images"])
    except BaseException:  # Ctrl-C or an error: worker processes killed mid-shard leave temporaries
        for split in SPLITS:
            if counts[split]:
                _drop_temporaries(out / split)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    for split in ("val", "test"):
        if counts[split]:
            write_annotations(out / split, split, ann[split], info)
    summary = {}
    for split in SPLITS:
        if counts[split]:
            n_q = len(ann[split]["questions"])
            shards = len([t for t in tasks if t.split == split])
            summary[split] = {"images": counts[split], "questions": n_q, "shards": shards}
    manifest.update(
        complete=True,
        splits=summary,
        seconds=round(seconds, 2),
        rendered=rendered,
        images_per_second=round(rendered / seconds, 1) if seconds > 0 and rendered else None,
    )
    atomic_write_json(manifest_path, manifest, indent=1)
    return manifest


def run(args: argparse.Namespace) -> int:
    check_args(args)
    m = build(
        args.out,
        train=args.train,
        val=args.val,
        test=args.test,
        seed=args.seed,
        image_size=args.image_size,
        shard_size=args.shard_size,
        workers=args.workers,
        show_progress=not args.no_progress,
    )
    for split, s in m["splits"].items():
        extra = f", {s['questions']} questions" if s["questions"] else ""
        print(f"{split:>5}: {s['images']} images{extra} in {s['shards']} shards -> {args.out / split}")
    rate = f" ({m['images_per_second']} images/s)" if m["images_per_second"] else ""
    print(f"rendered {m['rendered']} images in {m['seconds']}s{rate} with {args.workers} workers")
    print(f"manifest: {args.out / 'synthetic.json'}")
    return 0


main = builder_main(run, make_parser)


if __name__ == "__main__":
    raise SystemExit(main())
