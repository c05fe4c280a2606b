"""The builders from COCO and VQAv2 annotation files, on tiny inputs: from_coco (COCO captions and
Karpathy splits, per image or per caption) and from_vqav2 (questions with or without annotations)."""

from __future__ import annotations

import json
from pathlib import Path

from _builders_kit import images  # noqa: F401 - a fixture
from _builders_kit import OPTS, encode_image, inspect_ok, read_samples, skip_reasons, skipped_lines
from data_pipelines import from_coco, from_vqav2


# ----------------------------------------------------------------------------- from_coco


def _coco_images(images: Path) -> Path:
    d = images.parent / "coco"
    (d / "val2014").mkdir(parents=True)
    for i, color in [(1, (255, 0, 0)), (2, (0, 255, 0))]:
        (d / "val2014" / f"COCO_val2014_{i:012d}.jpg").write_bytes(encode_image(color, "JPEG"))
    (d / "val2014" / f"COCO_val2014_{3:012d}.jpg").write_bytes(b"corrupt")
    return d


def test_from_coco_captions_format(tmp_path, images):
    d = _coco_images(images)
    ann = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3, 4)],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A red square. "},
            {"image_id": 2, "id": 20, "caption": "green one"},
            {"image_id": 1, "id": 11, "caption": "something red"},
            {"image_id": 2, "id": 21, "caption": "   "},
            {"image_id": 3, "id": 30, "caption": "broken"},
            {"image_id": 4, "id": 40, "caption": "missing file"},
        ],
    }
    src = tmp_path / "captions_val2014.json"
    src.write_text(json.dumps(ann))
    out = tmp_path / "per_image"
    assert from_coco.main(["--annotations", str(src), "--images", str(d / "val2014"), "--out", str(out), *OPTS,
                           "--max-skip-fraction", "0.9"]) == 0  # mostly malformed on purpose
    recs = read_samples(out)
    assert sorted(recs) == ["000000000001", "000000000002"]
    r1 = recs["000000000001"]
    assert r1.captions == ["A red square.", "something red"] and r1.meta["image_id"] == 1
    assert r1.caption is None  # no KEY.txt repeating the first reference: training draws each once
    assert r1.images == [(d / "val2014" / f"COCO_val2014_{1:012d}.jpg").read_bytes()]
    assert recs["000000000002"].captions == ["green one"]
    # the blank reference caption of image 2 is dropped, and counted (never silently)
    assert skip_reasons(out) == {"missing image": 1, "not an image": 1, "empty caption": 1}
    assert {"key": "000000000002-21", "reason": "empty caption", "detail": ""} in skipped_lines(out)
    inspect_ok(out)

    out2 = tmp_path / "per_caption"
    argv = ["--annotations", str(src), "--images", str(d / "val2014"), "--out", str(out2), "--per-caption", *OPTS]
    assert from_coco.main(argv) == 0
    recs = read_samples(out2)
    assert sorted(recs) == ["000000000001-10", "000000000001-11", "000000000002-20"]
    assert recs["000000000001-11"].caption == "something red" and recs["000000000001-11"].meta["id"] == 11
    assert skip_reasons(out2)["empty caption"] == 1
    # resume: one pair's shard lost -> redone, nothing duplicated
    (out2 / "shard-000000.tar").unlink()
    assert from_coco.main(argv + ["--shard-size", "1"]) == 0
    assert sorted(read_samples(out2)) == sorted(recs)


def test_from_coco_karpathy(tmp_path, images):
    d = _coco_images(images)

    def entry(i, split):
        return {
            "cocoid": i,
            "filepath": "val2014",
            "filename": f"COCO_val2014_{i:012d}.jpg",
            "split": split,
            "sentences": [{"raw": f"caption {i} a", "sentid": i * 10}, {"raw": f"caption {i} b", "sentid": i * 10 + 1}],
        }

    src = tmp_path / "dataset_coco.json"
    src.write_text(
        json.dumps({"dataset": "coco", "images": [entry(1, "test"), entry(2, "restval"), entry(3, "train")]})
    )
    out = tmp_path / "out"
    assert (
        from_coco.main(["--annotations", str(src), "--images", str(d), "--out", str(out), *OPTS]) == 2
    )  # needs --split
    assert (
        from_coco.main(
            ["--annotations", str(src), "--images", str(d), "--split", "test", "restval", "--out", str(out), *OPTS]
        )
        == 0
    )
    recs = read_samples(out)
    assert sorted(recs) == ["000000000001", "000000000002"]
    assert recs["000000000002"].meta["split"] == "restval" and recs["000000000002"].captions == [
        "caption 2 a",
        "caption 2 b",
    ]


def test_from_coco_malformed_entries_are_one_line_errors(tmp_path, images, capsys):
    d = _coco_images(images)
    bad = {
        "coco": {"images": [{"id": 1, "file_name": None}], "annotations": [{"image_id": 1, "caption": "x"}]},
        "karpathy": {"dataset": "coco", "images": [{"cocoid": 1, "filename": "a.jpg", "split": "train",
                                                    "sentences": [{"raw": "x"}]}, 5]},
        "sentences": {"images": [{"cocoid": 1, "filename": "a.jpg", "split": "train", "sentences": ["x"]}]},
    }
    for name, data in bad.items():
        src = tmp_path / f"{name}.json"
        src.write_text(json.dumps(data))
        argv = ["--annotations", str(src), "--images", str(d / "val2014"), "--split", "train"]
        assert from_coco.main(argv + ["--out", str(tmp_path / name), *OPTS]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)


def test_from_coco_duplicate_image_id_is_an_error(tmp_path, images, capsys):
    d = _coco_images(images)
    ann = {
        "images": [{"id": 1, "file_name": f"COCO_val2014_{1:012d}.jpg"}, {"id": 1, "file_name": "other.jpg"}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "red"}],
    }
    src = tmp_path / "dup.json"
    src.write_text(json.dumps(ann))
    out = tmp_path / "out"
    assert from_coco.main(["--annotations", str(src), "--images", str(d / "val2014"), "--out", str(out), *OPTS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "image id 1 " in err
    assert not out.exists()


def test_from_coco_writes_each_reference_once_and_evaluation_reads_them(tmp_path, images):
    from mmlm.evaluation.benchmarks import load_benchmark

    d = _coco_images(images)
    ann = {
        "images": [{"id": 1, "file_name": f"COCO_val2014_{1:012d}.jpg"}],
        "annotations": [{"image_id": 1, "id": i, "caption": f"c{i}"} for i in range(3)],
    }
    src = tmp_path / "c.json"
    src.write_text(json.dumps(ann))
    out = tmp_path / "out"
    assert from_coco.main(["--annotations", str(src), "--images", str(d / "val2014"), "--out", str(out), *OPTS]) == 0
    import tarfile

    with tarfile.open(out / "shard-000000.tar") as t:
        assert sorted(m.name for m in t.getmembers()) == ["000000000001.jpg", "000000000001.json"]
    rec = read_samples(out)["000000000001"]
    assert rec.caption is None and rec.captions == ["c0", "c1", "c2"]
    bench = load_benchmark("caption", "shards", shards=str(out))
    assert [tuple(it.references) for it in bench.items] == [("c0", "c1", "c2")]


# ----------------------------------------------------------------------------- from_vqav2


def test_from_vqav2(tmp_path, images):
    d = _coco_images(images)
    questions = {
        "questions": [
            {"image_id": 1, "question": "What color is it?", "question_id": 10},
            {"image_id": 2, "question": "Is it green?", "question_id": 20},
            {"image_id": 1, "question": "How many?", "question_id": 11},
            {"image_id": 3, "question": "Broken?", "question_id": 30},
        ]
    }

    def ann(qid, iid, answers, qtype, atype):
        return {
            "question_id": qid,
            "image_id": iid,
            "question_type": qtype,
            "answer_type": atype,
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        }

    annotations = {
        "annotations": [
            ann(10, 1, ["red"] * 9 + ["pink"], "what color is", "other"),
            ann(20, 2, ["yes"] * 10, "is it", "yes/no"),
            ann(11, 1, ["1"] * 10, "how many", "number"),
            ann(30, 3, ["?"] * 10, "none", "other"),
        ]
    }
    qp, ap = tmp_path / "q.json", tmp_path / "a.json"
    qp.write_text(json.dumps(questions))
    ap.write_text(json.dumps(annotations))
    out = tmp_path / "out"
    base = ["--questions", str(qp), "--images", str(d / "val2014"), "--split", "val2014", *OPTS]
    assert from_vqav2.main(base + ["--annotations", str(ap), "--out", str(out)]) == 0
    recs = read_samples(out)
    assert sorted(recs) == ["10", "11", "20"]
    r = recs["10"]
    assert r.question == "What color is it?" and r.answers == ["red"] * 9 + ["pink"]
    assert r.meta["question_id"] == 10 and r.meta["image_id"] == 1 and r.meta["question_type"] == "what color is"
    assert r.meta["answer_type"] == "other" and r.meta["multiple_choice_answer"] == "red"
    assert recs["11"].images == r.images == [(d / "val2014" / f"COCO_val2014_{1:012d}.jpg").read_bytes()]
    assert skip_reasons(out) == {"not an image": 1}
    inspect_ok(out)
    for pattern in ("{split.stem}", "{0}", "{image_id:s}"):  # one line, not a traceback
        assert from_vqav2.main(base + ["--image-pattern", pattern, "--out", str(tmp_path / "p")]) == 2
    # test split: no annotations, questions only
    out2 = tmp_path / "test"
    assert from_vqav2.main(base + ["--out", str(out2)]) == 0
    recs2 = read_samples(out2)
    assert sorted(recs2) == ["10", "11", "20"] and recs2["20"].answers == [] and recs2["20"].kind() == "vqa"
    inspect_ok(out2)


def test_from_vqav2_malformed_answers_are_skipped_not_split_or_crashing(tmp_path, images):
    d = _coco_images(images)
    qp, ap = tmp_path / "q.json", tmp_path / "a.json"
    questions = [{"image_id": 1, "question": f"q{q}?", "question_id": q} for q in (1, 2, 3)]
    qp.write_text(json.dumps({"questions": questions}))
    anns = [
        {"question_id": 1, "answers": "yes"},  # a string, not a list: never ["y", "e", "s"]
        {"question_id": 2, "answers": [{"raw_answer": "red", "answer_id": 1}]},  # no "answer": no KeyError
        {"question_id": 3, "answers": [{"answer": "red"}]},
    ]
    ap.write_text(json.dumps({"annotations": anns}))
    out = tmp_path / "out"
    args = ["--questions", str(qp), "--annotations", str(ap), "--images", str(d / "val2014"), "--split", "val2014"]
    assert from_vqav2.main(args + ["--out", str(out), *OPTS, "--max-skip-fraction", "0.9"]) == 0  # mostly malformed on purpose
    assert {k: r.answers for k, r in read_samples(out).items()} == {"3": ["red"]}
    assert skip_reasons(out) == {"bad annotation": 2}
