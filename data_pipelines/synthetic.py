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
count (``how many shapes are there?`` -> ``two``; also per colour/shape, answers zero..three),
position (``where is the red star?`` -> ``left``), exists (``is there a green circle?`` ->
``yes``/``no``, balanced). Objects are named unambiguously (shape, else size+shape, else shape+place).

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
complete shards and makes the missing ones. ``--shard-size`` counts samples; a val/test shard
holds ``shard_size // 7`` images (at least 1) with their questions. Usage::

    python -m data_pipelines.synthetic --out data/shapes --train 20000 --val 500 --test 500
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmlm.data.schema import IMAGE_PLACEHOLDER, Record
from mmlm.data.writer import ShardWriter, resume_state, shard_name

from ._common import BuildError, atomic_write_bytes, atomic_write_json, cli, parallel_map, progress

VERSION = 3
SPLITS = ("train", "val", "test")
# Version 3 dropped the hexagon (at 64-72 px a small hexagon is hardly told from a circle: it was
# half of all shape confusions of a supervised probe) and drew small shapes larger.
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 30),
    "green": (30, 170, 50),
    "cyan": (30, 215, 225),
    "blue": (30, 70, 235),
    "purple": (145, 45, 200),
    "white": (250, 250, 250),
}
SIZES = ("small", "large")
POSITIONS = ("top", "left", "center", "right", "bottom")  # reading order: the caption's order
CELLS = {"top": (1, 0), "left": (0, 1), "center": (1, 1), "right": (2, 1), "bottom": (1, 2)}  # (col, row)
WHERE = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}
NUMBERS = ("zero", "one", "two", "three")
# Evaluation references are written as the VQAv2 annotation files write answers: numbers as
# digits. The official VQA evaluation turns a predicted "two" into "2" but leaves ten identical
# human answers untouched, so a reference "two" could never be matched. Training text keeps words.
REFERENCE_FORM = {word: str(i) for i, word in enumerate(NUMBERS)}
QUESTION_TYPES = ("color", "shape", "size", "count", "position", "exists")
ANSWER_TYPES = {"exists": "yes/no", "count": "number"}  # others: "other"
RADIUS = {"small": 0.32, "large": 0.46}  # in cell units
N_HUMAN_ANSWERS = 10


# ----------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str
    dx: float = 0.0  # centre offset, cell units
    dy: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0  # degrees
    tint: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in reading order
    background: str  # plain | noise | stripes
    bg_color: tuple[int, int, int]
    bg_color2: tuple[int, int, int]
    stripe_period: float  # fraction of the image side
    stripe_dir: int  # 0 horizontal, 1 vertical, 2 diagonal, 3 anti-diagonal
    noise_seed: int


def image_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of one image: a function of (seed, split, index) only."""
    return random.Random(f"mmlm-synthetic/{seed}/{split}/{index}")


def _muted(rng: random.Random, lo: int = 75, hi: int = 150) -> tuple[int, int, int]:
    g = rng.randint(lo, hi)
    return tuple(max(0, min(255, g + rng.randint(-10, 10))) for _ in range(3))  # type: ignore[return-value]


def sample_scene(rng: random.Random) -> Scene:
    n = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    positions = sorted(rng.sample(POSITIONS, n), key=POSITIONS.index)
    pairs: set[tuple[str, str]] = set()
    objs = []
    for pos in positions:
        while True:
            pair = (rng.choice(tuple(COLORS)), rng.choice(SHAPES))
            if pair not in pairs:
                break
        pairs.add(pair)
        objs.append(
            Obj(
                shape=pair[1],
                color=pair[0],
                size=rng.choice(SIZES),
                position=pos,
                dx=rng.uniform(-0.1, 0.1),
                dy=rng.uniform(-0.1, 0.1),
                scale=rng.uniform(0.9, 1.05),
                rotation=rng.uniform(-8.0, 8.0),
                tint=(rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(-12, 12)),
            )
        )
    # occasionally pull a neighbour towards the center object so that they partly overlap
    if "center" in positions and n > 1 and rng.random() < 0.2:
        i = rng.choice([k for k, o in enumerate(objs) if o.position != "center"])
        o = objs[i]
        col, row = CELLS[o.position]
        pull = rng.uniform(0.2, 0.32)
        objs[i] = Obj(**{**asdict(o), "dx": o.dx + pull * (1 - col), "dy": o.dy + pull * (1 - row), "tint": o.tint})
    background = rng.choice(("plain", "noise", "stripes"))
    c1 = _muted(rng)
    shift = rng.choice((-1, 1)) * rng.randint(18, 30)  # same shift on every channel: stays grey
    c2 = tuple(max(0, min(255, v + shift)) for v in c1)
    return Scene(
        objects=tuple(objs),
        background=background,
        bg_color=c1,
        bg_color2=c2,  # type: ignore[arg-type]
        stripe_period=rng.uniform(0.06, 0.14),
        stripe_dir=rng.randrange(4),
        noise_seed=rng.getrandbits(63),
    )


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_of(scene: Scene) -> str:
    parts = [f"a {o.size} {o.color} {o.shape} {WHERE[o.position]}" for o in scene.objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def objects_of(scene: Scene) -> list[dict[str, str]]:
    return [{"shape": o.shape, "color": o.color, "size": o.size, "position": o.position} for o in scene.objects]


# ----------------------------------------------------------------------------- questions


def _name_without_color(scene: Scene, o: Obj) -> str:
    if sum(x.shape == o.shape for x in scene.objects) == 1:
        return f"the {o.shape}"
    if sum(x.shape == o.shape and x.size == o.size for x in scene.objects) == 1:
        return f"the {o.size} {o.shape}"
    return f"the {o.shape} {WHERE[o.position]}"


def question_for(qtype: str, scene: Scene, rng: random.Random, *, exists_yes: bool | None = None) -> tuple[str, str]:
    """One (question, answer) of ``qtype`` about ``scene``."""
    objs = scene.objects
    o = rng.choice(objs)
    if qtype == "color":
        return f"what color is {_name_without_color(scene, o)}?", o.color
    if qtype == "shape":
        return f"what shape is {WHERE[o.position]}?", o.shape
    if qtype == "size":
        return f"what size is the {o.color} {o.shape}?", o.size
    if qtype == "position":
        return f"where is the {o.color} {o.shape}?", o.position
    if qtype == "count":
        variant = rng.choice(("all", "all", "color", "shape"))
        if variant == "all":
            return "how many shapes are there?", NUMBERS[len(objs)]
        if variant == "color":
            color = o.color if rng.random() < 0.6 else rng.choice(tuple(COLORS))
            return f"how many {color} shapes are there?", NUMBERS[sum(x.color == color for x in objs)]
        shape = o.shape if rng.random() < 0.6 else rng.choice(SHAPES)
        return f"how many {PLURALS[shape]} are there?", NUMBERS[sum(x.shape == shape for x in objs)]
    if qtype == "exists":
        yes = rng.random() < 0.5 if exists_yes is None else exists_yes
        present = {(x.color, x.shape) for x in objs}
        if yes:
            color, shape = o.color, o.shape
        else:
            while True:  # a distractor that often shares the colour or the shape of an object
                r = rng.random()
                color = o.color if r < 0.35 else rng.choice(tuple(COLORS))
                shape = o.shape if 0.35 <= r < 0.7 else rng.choice(SHAPES)
                if (color, shape) not in present:
                    break
        return f"is there {article(color)} {color} {shape}?", "yes" if yes else "no"
    raise ValueError(f"unknown question type {qtype!r}")


def conversation_for(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    """3 to 5 distinct QA turns, the first human turn starting with ``<image>\\n``."""
    n = rng.randint(3, 5)
    types = list(QUESTION_TYPES)
    rng.shuffle(types)
    turns: list[dict[str, str]] = []
    asked: set[str] = set()
    attempts = 0
    while len(turns) < 2 * n and attempts < 50:
        qtype = types[(len(turns) // 2) % len(types)] if attempts < len(types) else rng.choice(QUESTION_TYPES)
        attempts += 1
        q, a = question_for(qtype, scene, rng)
        if q in asked:
            continue
        asked.add(q)
        prefix = f"{IMAGE_PLACEHOLDER}\n" if not turns else ""
        turns += [{"from": "human", "value": prefix + q}, {"from": "gpt", "value": a}]
    return turns


# ----------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def rotate(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        a = math.radians(rot)
        ca, sa = math.cos(a), math.sin(a)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]

    if shape == "square":
        h = r * 0.82
        return rotate([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "diamond":
        return rotate([(0, -r), (r * 0.66, 0), (0, r), (-r * 0.66, 0)])
    if shape == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)) + r * 0.12) for a in (-90, 30, 150)]
        return rotate(pts)
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a) + r * 0.05))
        return rotate(pts)
    if shape == "cross":
        w, L = r * 0.34, r * 0.95
        return rotate(
            [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]
        )
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, size: int):
    import numpy as np

    c1 = np.array(scene.bg_color, dtype=np.float32)
    if scene.background == "plain":
        arr = np.broadcast_to(c1, (size, size, 3))
    elif scene.background == "noise":
        rng = np.random.default_rng(scene.noise_seed)
        arr = c1 + rng.normal(0.0, 9.0, (size, size, 1)) + rng.normal(0.0, 3.0, (size, size, 3))
    else:
        c2 = np.array(scene.bg_color2, dtype=np.float32)
        y, x = np.mgrid[0:size, 0:size]
        coord = (y, x, x + y, x - y + size)[scene.stripe_dir]
        period = max(2.0, scene.stripe_period * size)
        band = (np.floor(coord / (period / 2)) % 2).astype(bool)[..., None]
        arr = np.where(band, c2, c1)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int):
    """Draw ``scene`` as a ``size`` x ``size`` RGB PIL image (2x supersampled up to 256 px)."""
    from PIL import Image, ImageDraw

    ss = 2 if size <= 256 else 1
    img = Image.fromarray(_background(scene, size), "RGB")
    if ss > 1:
        img = img.resize((size * ss, size * ss), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    cell = size * ss / 3.0
    for o in scene.objects:
        col, row = CELLS[o.position]
        cx, cy = (col + 0.5 + o.dx) * cell, (row + 0.5 + o.dy) * cell
        r = RADIUS[o.size] * o.scale * cell
        fill = tuple(max(0, min(255, c + t)) for c, t in zip(COLORS[o.color], o.tint))
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r, o.rotation), fill=fill)
    if ss > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return img


def encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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
        a = REFERENCE_FORM.get(word, word)  # references as VQAv2 stores them: numbers in digits
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
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.synthetic",
        description=__doc__.split("Usage::")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    if args.shard_size < 1:
        raise BuildError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers < 1:
        raise BuildError(f"--workers must be >= 1, got {args.workers}")
    if args.out.exists() and not args.out.is_dir():
        raise BuildError(f"--out {args.out} exists and is not a directory")


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
    for task, res in zip(tasks, parallel_map(run_task, tasks, workers, chunk=1, ahead=2)):
        rendered += res["rendered"]
        for k, v in res["ann"].items():
            ann[task.split][k] += v
        bar.update(res["images"])
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


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, make_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
