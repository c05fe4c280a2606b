"""The scenes of the synthetic shapes dataset and their text: vocabulary, sampling, captions, questions.

Contract: a :class:`Scene` (1 to 3 :class:`Obj` in reading order, plus its background) is a pure
function of the ``random.Random`` it is sampled from (:func:`image_rng` seeds one per
``(seed, split, index)``); its caption (:func:`caption_of`), object list (:func:`objects_of`),
questions (:func:`question_for`) and training conversation (:func:`conversation_for`) are pure
functions of the scene and of that generator, taken in a fixed order. Nothing here draws pixels
(``data_pipelines.synthetic_render``) or writes files (``data_pipelines.synthetic``, whose module
docstring describes the dataset). Any change to what these return changes the dataset's bytes:
bump ``data_pipelines.synthetic.VERSION`` with it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from mmlm.data.schema import IMAGE_PLACEHOLDER

# Version 5: training conversations also ask size and position by shape alone ("where is the star?").
# Version 4: count answers are digits. Version 3 dropped the hexagon (at 64-72 px a small hexagon is hardly told from a circle: it was
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
# Count answers are digits, in training text as in the references: VQAv2's annotations write numbers as
# digits, and the official evaluation leaves ten identical human answers unnormalised, so a reference
# "two" would never match; training on words would make the validation loss of count questions
# meaningless (version 4; version 3 trained words).
NUMBERS = ("0", "1", "2", "3")
QUESTION_TYPES = ("color", "shape", "size", "count", "position", "exists")


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


def question_for(qtype: str, scene: Scene, rng: random.Random, *, exists_yes: bool | None = None,
                 by_shape: bool = False) -> tuple[str, str]:
    """One (question, answer) of ``qtype`` about ``scene``.

    ``by_shape`` (training conversations only, never the val/test questions): size and position
    questions name an object whose shape is unique in the scene by its shape alone (``"where is the
    star?"``), as colour questions do, so that finding an object by its shape is asked for as often as
    finding it by its colour; other types, and objects whose shape repeats, are asked as usual."""
    objs = scene.objects
    o = rng.choice(objs)
    name = f"the {o.shape}" if by_shape and sum(x.shape == o.shape for x in objs) == 1 else f"the {o.color} {o.shape}"
    if qtype == "color":
        return f"what color is {_name_without_color(scene, o)}?", o.color
    if qtype == "shape":
        return f"what shape is {WHERE[o.position]}?", o.shape
    if qtype == "size":
        return f"what size is {name}?", o.size
    if qtype == "position":
        return f"where is {name}?", o.position
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
    """3 to 5 distinct QA turns, the first human turn starting with ``<image>\\n``; half the size and
    position questions name their object by its shape alone where that is unique (``by_shape``)."""
    n = rng.randint(3, 5)
    types = list(QUESTION_TYPES)
    rng.shuffle(types)
    turns: list[dict[str, str]] = []
    asked: set[str] = set()
    attempts = 0
    while len(turns) < 2 * n and attempts < 50:
        qtype = types[(len(turns) // 2) % len(types)] if attempts < len(types) else rng.choice(QUESTION_TYPES)
        attempts += 1
        q, a = question_for(qtype, scene, rng, by_shape=qtype in ("size", "position") and rng.random() < 0.5)
        if q in asked:
            continue
        asked.add(q)
        prefix = f"{IMAGE_PLACEHOLDER}\n" if not turns else ""
        turns += [{"from": "human", "value": prefix + q}, {"from": "gpt", "value": a}]
    return turns
