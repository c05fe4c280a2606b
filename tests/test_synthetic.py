"""data_pipelines.synthetic: determinism, captions and answers that match the scene, layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_pipelines import inspect as inspect_cli
from data_pipelines import synthetic as syn
from mmlm.data.schema import IMAGE_PLACEHOLDER, iter_tar_records

N = {"train": 30, "val": 6, "test": 4}
ARGS = ["--train", "30", "--val", "6", "--test", "4", "--seed", "3", "--shard-size", "14", "--no-progress"]
WHERE_WORD = {v: k for k, v in syn.WHERE.items()}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _outputs(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != "synthetic.json"}  # the manifest holds timings


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "data"
    assert syn.main(["--out", str(out), "--workers", "2", *ARGS]) == 0
    return out


# ----------------------------------------------------------------------------- an independent reading of the spec


def _parse_caption(caption: str) -> list[tuple[str, str, str, str]]:
    parts = re.split(r", | and (?=an? )", caption)
    out = []
    for part in parts:
        m = re.fullmatch(
            r"a (small|large) (\w+) (\w+) (at the top|on the left|in the center|on the right|at the bottom)", part
        )
        assert m, f"caption part {part!r} of {caption!r} is not canonical"
        out.append((m.group(1), m.group(2), m.group(3), WHERE_WORD[m.group(4)]))
    return out


def _answer(question: str, objs: list[dict]) -> str:
    """Answer a synthetic question from the object list alone."""
    numbers = ["0", "1", "2", "3"]  # digits, as VQAv2's references and the training text write them
    plural = {v: k for k, v in syn.PLURALS.items()}
    if m := re.fullmatch(
        r"what color is the (\w+)(?: (\w+))?(?: (at the top|on the left|in the center|on the right|at the bottom))?\?",
        question,
    ):
        if m.group(2):  # "the small star"
            size, shape = m.group(1), m.group(2)
            match = [o for o in objs if o["shape"] == shape and o["size"] == size]
        else:
            shape = m.group(1)
            match = [o for o in objs if o["shape"] == shape]
            if m.group(3):
                match = [o for o in match if o["position"] == WHERE_WORD[m.group(3)]]
        assert len(match) == 1, question
        return match[0]["color"]
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        return next(o["shape"] for o in objs if o["position"] == WHERE_WORD[m.group(1)])
    if m := re.fullmatch(r"(what size|where) is the (?:(\w+) )?(\w+)\?", question):
        kind, color, shape = m.groups()
        match = [o for o in objs if o["shape"] == shape and color in (None, o["color"])]
        assert len(match) == 1, question  # by shape alone (training only) when the shape is unique
        return match[0]["size" if kind == "what size" else "position"]
    if question == "how many shapes are there?":
        return numbers[len(objs)]
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return numbers[sum(o["color"] == m.group(1) for o in objs)]
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return numbers[sum(o["shape"] == plural[m.group(1)] for o in objs)]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == m.groups() for o in objs) else "no"
    raise AssertionError(f"unexpected question {question!r}")


# ----------------------------------------------------------------------------- tests


def test_layout_and_annotation_counts(built):
    manifest = json.loads((built / "synthetic.json").read_text())
    assert manifest["complete"] and manifest["params"]["seed"] == 3
    assert set(manifest["vocabulary"]["shapes"]) >= {"circle", "square", "triangle", "star", "diamond", "cross"}
    assert len(manifest["vocabulary"]["colors"]) == 8
    train = list(iter_tar_records(built / "train"))
    assert len(train) == N["train"] and {r.kind() for r in train} == {"conversation"}
    assert len(list((built / "train").glob("*.tar"))) == 3  # 14 + 14 + 2
    for split in ("val", "test"):
        n = N[split]
        d = built / split
        caps = json.loads((d / "annotations" / "captions.json").read_text())
        qs = json.loads((d / "annotations" / "questions.json").read_text())
        anns = json.loads((d / "annotations" / "vqa_annotations.json").read_text())
        assert [im["id"] for im in caps["images"]] == list(range(n))
        assert len(caps["annotations"]) == n
        assert len(qs["questions"]) == len(anns["annotations"]) == 6 * n
        assert len({q["question_id"] for q in qs["questions"]}) == 6 * n
        for a in anns["annotations"]:
            assert len(a["answers"]) == 10 and {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}
            assert a["answer_type"] == {"exists": "yes/no", "count": "number"}.get(a["question_type"], "other")
        assert sorted(p.name for p in (d / "images").iterdir()) == sorted(f"{i}.png" for i in range(n))
        recs = list(iter_tar_records(d))
        assert len(recs) == 7 * n and len({r.key for r in recs}) == 7 * n
        image_recs = [r for r in recs if r.kind() == "caption"]
        vqa = [r for r in recs if r.kind() == "vqa"]
        assert len(image_recs) == n and len(vqa) == 6 * n
        by_id = {r.meta["image_id"]: r for r in image_recs}
        for r in image_recs:
            assert (
                r.captions == [r.caption] and r.images[0] == (d / "images" / f"{r.meta['image_id']}.png").read_bytes()
            )
        for r in vqa:
            assert r.images == by_id[r.meta["image_id"]].images  # the image bytes are repeated
            assert r.answers == [r.meta["multiple_choice_answer"]] * 10
        exists = [r.answers[0] for r in vqa if r.meta["question_type"] == "exists"]
        assert abs(exists.count("yes") - exists.count("no")) <= 1  # balanced


def test_captions_and_answers_match_the_scene(built):
    n_checked = 0
    for split in ("train", "val"):
        recs = list(iter_tar_records(built / split))
        objs_by_image = {r.meta["image_id"]: r.meta["objects"] for r in recs if "objects" in r.meta}
        for r in recs:
            objs = objs_by_image[r.meta["image_id"]]
            if r.caption is not None:
                parsed = _parse_caption(r.caption)
                assert parsed == [(o["size"], o["color"], o["shape"], o["position"]) for o in objs]
                order = [syn.POSITIONS.index(p[3]) for p in parsed]
                assert order == sorted(order) and len(set(order)) == len(order)  # reading order, distinct cells
            if r.question is not None:
                assert _answer(r.question, objs) == r.answers[0]
                n_checked += 1
            for human, gpt in zip(r.conversations[::2], r.conversations[1::2]):
                q = human["value"].removeprefix(f"{IMAGE_PLACEHOLDER}\n")
                assert _answer(q, objs) == gpt["value"] and len(gpt["value"].split()) == 1
                n_checked += 1
            if r.conversations:
                assert r.conversations[0]["value"].startswith(f"{IMAGE_PLACEHOLDER}\n")
                assert 3 <= len(r.conversations) // 2 <= 5
    assert n_checked > 100


def test_only_training_asks_size_and_position_by_shape_alone(built):
    by_shape = re.compile(r"(what size|where) is the \w+\?")
    train = [t["value"] for r in iter_tar_records(built / "train") for t in r.conversations[::2]]
    assert any(by_shape.search(q) for q in train) and any(re.search(r"where is the \w+ \w+\?", q) for q in train)
    for split in ("val", "test"):
        questions = [r.question for r in iter_tar_records(built / split) if r.question is not None]
        assert questions and not any(by_shape.fullmatch(q) for q in questions)


def test_pixels_show_the_objects():
    """The object colour is drawn at the object's centre (unless another object covers it)."""
    checked = 0
    for i in range(40):
        scene = syn.sample_scene(syn.image_rng(0, "train", i))
        img = syn.render(scene, 64).convert("RGB")
        cell = 64 / 3
        for k, o in enumerate(scene.objects):
            col, row = syn.CELLS[o.position]
            x, y = (col + 0.5 + o.dx) * cell, (row + 0.5 + o.dy) * cell
            covered = any(
                abs((syn.CELLS[p.position][0] + 0.5 + p.dx) * cell - x) < cell * 0.8
                and abs((syn.CELLS[p.position][1] + 0.5 + p.dy) * cell - y) < cell * 0.8
                for p in scene.objects[k + 1 :]
            )
            if covered or o.shape == "cross" and o.size == "small":
                continue
            px = img.getpixel((int(x), int(y)))
            want = syn.COLORS[o.color]
            assert max(abs(a - b) for a, b in zip(px, want)) <= 14, (i, o, px)
            checked += 1
    assert checked > 40


def test_sizes_32_to_512_render():
    scene = syn.sample_scene(syn.image_rng(1, "val", 5))
    for size in (32, 100, 512):
        assert syn.render(scene, size).size == (size, size)


def test_deterministic_and_independent_of_workers(built, tmp_path):
    one = tmp_path / "one"
    assert syn.main(["--out", str(one), "--workers", "1", *ARGS]) == 0
    assert _outputs(_files(one)) == _outputs(_files(built))
    other_seed = tmp_path / "seed4"
    assert syn.main(["--out", str(other_seed), "--workers", "1", *[a if a != "3" else "4" for a in ARGS]]) == 0
    assert (
        _outputs(_files(other_seed))["val/annotations/captions.json"]
        != _outputs(_files(built))["val/annotations/captions.json"]
    )


def test_resume_after_interruption(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    (out / "train" / "shard-000001.tar").unlink()
    (out / "val" / "shard-000001.tar").unlink()
    (out / "val" / "images" / "3.png").unlink()
    (out / "val" / "annotations" / "questions.json").unlink()
    (out / "train" / ".shard-000002.tar.tmp").write_bytes(b"half")
    assert syn.main(["--out", str(out), "--workers", "1", *ARGS]) == 0
    assert _outputs(_files(out)) == _outputs(_files(built))


def test_bad_arguments(tmp_path, capsys, built):
    assert syn.main(["--out", str(tmp_path / "x"), "--image-size", "16"]) == 2
    assert "--image-size" in capsys.readouterr().err
    # a different seed over an existing output is refused instead of mixing two datasets
    assert syn.main(["--out", str(built), *[a if a != "3" else "5" for a in ARGS]]) == 2
    assert "other arguments" in capsys.readouterr().err


def test_output_passes_inspect(built, capsys):
    assert inspect_cli.main([str(built), "--no-progress", "--samples", "1"]) == 0
    assert "OK" in capsys.readouterr().out
