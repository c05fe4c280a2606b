"""`mmlm eval` guards and fixes: VQAv2 test-dev images, GQA's exact match as LLaVA scores it,
images decoded as describe/training decode them, bad --device/--dtype/--skip-metrics/--tokenizer
refused before the model loads, the resume fingerprint's resolved numerics and absolute shard
paths, a run where nothing could be predicted failing, the contents of edited data files in the
fingerprint, and prediction ids of another type than the benchmark's."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmlm.evaluation import caption_metrics as cm
from mmlm.evaluation import runner
from mmlm.evaluation import vqa_metrics as vm
from mmlm.evaluation.benchmarks import Item, load_benchmark, load_image
from test_eval_runner import cli  # `mmlm eval ...` in this process


def png(path: Path, color=(200, 20, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), color).save(path, format="PNG")
    return path


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """`--model DIR` runs a fake predict_fn; returns (model dir, record) where record["loads"] lists
    the keyword arguments of each model load and record["images"] counts the images predicted."""
    record: dict = {"loads": [], "images": 0}

    def factory(model_dir, **kw):
        record["loads"].append(kw)

        def fn(images, prompts):
            record["images"] += len(images)
            return ["yes" if p else "a red square" for p in prompts]

        return fn

    monkeypatch.setattr(runner, "model_predict_fn", factory)
    d = tmp_path / "model"
    d.mkdir()
    return d, record


def vqav2_questions(tmp_path: Path, subtype: str, image_id: int = 262144) -> Path:
    q = tmp_path / f"OpenEnded_mscoco_{subtype}_questions.json"
    q.write_text(json.dumps({"data_subtype": subtype, "questions": [
        {"image_id": image_id, "question": "is it red?", "question_id": image_id * 1000}]}))
    return q


# --------------------------------------------------------------------------- 1. VQAv2 test-dev


def test_vqav2_test_dev_images_are_read_from_test2015(tmp_path, fake_model):
    """COCO ships test-dev images as test2015/COCO_test2015_*.jpg (no test-dev folder or name)."""
    q = vqav2_questions(tmp_path, "test-dev2015")
    image = png(tmp_path / "coco" / "test2015" / "COCO_test2015_000000262144.jpg")
    for folder in (tmp_path / "coco" / "test2015", tmp_path / "coco"):  # the images folder or its parent
        assert load_benchmark("vqa", "vqav2", questions=q, images=folder).items[0].image == str(image)
    model, record = fake_model
    out = tmp_path / "out"
    assert cli("vqa", "--benchmark", "vqav2", "--model", str(model), "--questions", str(q),
               "--images", str(tmp_path / "coco" / "test2015"), "--out", str(out)) == 0
    assert json.loads((out / "predictions.json").read_text()) == [{"question_id": 262144000, "answer": "yes"}]


# --------------------------------------------------------------------------- 2. GQA


@pytest.mark.parametrize("reply, gold, correct", [
    ("a laptop", "laptop", 0), ("No, it is not.", "no", 0), ("the left", "left", 0), ("t shirt", "t-shirt", 0),
    ("two", "2", 0), ("Yes.", "yes", 1), (" Left. ", "left", 1), ("t-shirt", "t-shirt", 1), ("yes..", "yes", 1),
])
def test_gqa_accuracy_is_llava_exact_match(reply, gold, correct):
    assert vm.gqa_accuracy(reply, [gold]) == correct


def test_gqa_is_scored_without_vqa_normalization(tmp_path, capsys):
    golds = {"1": "laptop", "2": "no", "3": "left", "4": "t-shirt", "5": "yes"}
    q = tmp_path / "testdev_balanced_questions.json"
    q.write_text(json.dumps({k: {"imageId": f"n{k}", "question": "q?", "answer": a, "isBalanced": True,
                                 "types": {"structural": "verify" if a in ("yes", "no") else "query"}}
                             for k, a in golds.items()}))
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"questionId": k, "prediction": r} for k, r in
                             zip(golds, ["a laptop", "No, it is not.", "the left", "t shirt", "Yes."])]))
    out = tmp_path / "out"
    assert cli("vqa", "--benchmark", "gqa", "--predictions", str(p), "--questions", str(q), "--out", str(out),
               "--bootstrap", "0") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["overall"] == 20.0 and m["perAnswerType"] == {"open": 0.0, "binary": 50.0}
    assert "LLaVA" in m["accuracy_rule"] and "no VQA normalization" in m["accuracy_rule"]


# --------------------------------------------------------------------------- 3. image decoding


def test_eval_decodes_images_as_describe_does(tmp_path):
    from mmlm.api import open_image

    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(rgba)  # fully transparent: white, as in training
    g16 = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(g16)  # 16-bit grey: scaled, not saturated
    for path, pixel in ((rgba, (255, 255, 255)), (g16, (117, 117, 117))):
        for source in (str(path), path.read_bytes()):  # files, and the bytes of a shard member
            im = load_image(source)
            assert im.mode == "RGB" and im.getpixel((3, 3)) == pixel, path
            assert np.array_equal(np.asarray(im), np.asarray(open_image(path)))


# --------------------------------------------------------------------------- 4./5. argument checks


def test_bad_device_and_dtype_fail_before_the_model_loads(tmp_path, fake_model, capsys, monkeypatch):
    model, record = fake_model
    q = vqav2_questions(tmp_path, "val2014", image_id=1)
    png(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    base = ["vqa", "--benchmark", "vqav2", "--model", str(model), "--questions", str(q),
            "--images", str(tmp_path / "val2014"), "--out", str(tmp_path / "o")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli(*base, "--device", "cuda") == 2
    assert one_error_line(capsys) == "error: --device cuda: CUDA is not available here (use --device cpu)"
    assert cli(*base, "--device", "tpu9") == 2
    assert "--device must be" in one_error_line(capsys)
    assert cli(*base, "--dtype", "fp8") == 2
    assert "--dtype" in one_error_line(capsys)
    assert record["loads"] == [] and not (tmp_path / "o").exists()


def caption_files(tmp_path: Path) -> tuple[Path, Path]:
    png(tmp_path / "imgs" / "a.png")
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                               "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"}]}))
    return ann, tmp_path / "imgs"


@pytest.mark.parametrize("names", ["CIDEr", "METEOR,ROUGE_L", "CIDEr-D", "Bleu"])
def test_unskippable_metrics_are_refused_up_front(tmp_path, fake_model, capsys, names):
    model, record = fake_model
    ann, images = caption_files(tmp_path)
    out = tmp_path / "out"
    assert cli("caption", "--benchmark", "coco", "--model", str(model), "--annotations", str(ann),
               "--images", str(images), "--out", str(out), "--tokenizer", "python", "--skip-metrics", names) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: --skip-metrics: cannot skip") and "METEOR and SPICE" in line
    assert record["loads"] == [] and not out.exists()


def test_skippable_metrics_are_skipped(tmp_path, fake_model):
    model, _ = fake_model
    ann, images = caption_files(tmp_path)
    out = tmp_path / "out"
    assert cli("caption", "--benchmark", "coco", "--model", str(model), "--annotations", str(ann),
               "--images", str(images), "--out", str(out), "--tokenizer", "python",
               "--skip-metrics", "meteor, SPICE", "--bootstrap", "0") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["skipped_metrics"] == {"METEOR": "skipped on request", "SPICE": "skipped on request"}
    assert m["CIDEr"] >= 0 and "ROUGE_L" in m
    with pytest.raises(ValueError, match="cannot skip CIDEr"):
        cm.score_captions({1: ["a"]}, {1: "a"}, tokenizer="python", skip=["CIDEr"])


def test_ptb_tokenizer_without_java_fails_up_front(tmp_path, fake_model, capsys, monkeypatch):
    monkeypatch.setattr(cm, "java_available", lambda: False)
    model, record = fake_model
    ann, images = caption_files(tmp_path)
    out = tmp_path / "out"
    assert cli("caption", "--benchmark", "coco", "--model", str(model), "--annotations", str(ann),
               "--images", str(images), "--out", str(out), "--tokenizer", "ptb") == 2
    assert "--tokenizer ptb needs Java" in one_error_line(capsys)
    assert record["loads"] == [] and not out.exists()


# --------------------------------------------------------------------------- 7. resume fingerprint


def test_resume_needs_the_same_resolved_device_and_dtype(tmp_path, fake_model, capsys, monkeypatch):
    model, record = fake_model
    q = vqav2_questions(tmp_path, "val2014", image_id=1)
    png(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    out = tmp_path / "out"
    base = ["vqa", "--benchmark", "vqav2", "--model", str(model), "--questions", str(q),
            "--images", str(tmp_path / "val2014"), "--out", str(out)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli(*base) == 0  # auto on a CPU machine: cpu, float32
    assert record["loads"][-1] == {**record["loads"][-1], "device": torch.device("cpu"), "dtype": torch.float32}
    m = json.loads((out / "metrics.json").read_text())
    assert (m["device"], m["dtype"]) == ("cpu", "float32")
    assert cli(*base, "--device", "cpu", "--dtype", "fp32") == 0 and record["images"] == 1  # the same run: resumed
    capsys.readouterr()
    assert cli(*base, "--dtype", "bf16") == 2
    assert "differs in: dtype" in one_error_line(capsys)
    # the same command on a GPU machine ("auto" -> cuda, bf16) must not add bf16 predictions to fp32 ones
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cli(*base) == 2
    assert "differs in: device, dtype" in one_error_line(capsys)
    assert record["images"] == 1


def test_shards_are_fingerprinted_as_absolute_paths(tmp_path, fake_model, monkeypatch):
    model, record = fake_model
    shard = tmp_path / "data" / "vqa-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
        for name, data in (("k0.png", buf.getvalue()), ("k0.json", json.dumps({"question": "red?",
                                                                                "answers": ["yes"]}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path / "data")
    assert cli("vqa", "--benchmark", "shards", "--shards", "vqa-000000.tar", "--model", str(model),
               "--out", str(out)) == 0
    fingerprint = json.loads((out / runner.CACHE_NAME).read_text().splitlines()[0])["fingerprint"]
    assert fingerprint["data"]["shards"] == str(shard)
    monkeypatch.chdir(tmp_path)  # the same shard named from elsewhere: the same run, resumed
    assert cli("vqa", "--benchmark", "shards", "--shards", "data/vqa-000000.tar", "--model", str(model),
               "--out", str(out)) == 0
    assert record["images"] == 1


# --------------------------------------------------------------------------- 8. nothing predicted


def test_a_run_that_predicts_nothing_fails(tmp_path, fake_model, capsys, monkeypatch):
    model, record = fake_model
    q = vqav2_questions(tmp_path, "val2014", image_id=5)  # its image is missing
    (tmp_path / "val2014").mkdir()
    out = tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli("vqa", "--benchmark", "vqav2", "--model", str(model), "--questions", str(q),
               "--images", str(tmp_path / "val2014"), "--out", str(out)) == 2
    line = one_error_line(capsys)
    assert "none of the 1 item(s) could be predicted" in line and "COCO_val2014_000000000005.jpg" in line
    assert not (out / "predictions.json").exists() and not (out / "metrics.json").exists()
    items = [Item(id="a", image=str(tmp_path / "nope.png"), prompt=None)]
    with pytest.raises(runner.EvalError, match="none of the 1"):
        runner.predict(items, lambda images, prompts: ["x"] * len(images), progress=False, max_bad_fraction=1.0)


def test_caption_annotations_that_match_no_image_id_are_an_error(tmp_path):
    """ids written as strings in one list and numbers in the other: it scored nothing, exit 0, with the message of a
    test split without references."""
    from mmlm.evaluation.benchmarks import BenchmarkError, load_benchmark

    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                               "annotations": [{"image_id": "1", "caption": "a red star"},
                                               {"image_id": "2", "caption": "a blue disc"}]}))
    with pytest.raises(BenchmarkError, match=r"no annotation's image_id is an id of its 'images' \(annotations: '1', "
                                             r"images: 1; numbers written as strings\?\)"):
        load_benchmark("caption", "coco", annotations=ann)
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}]}))  # a test split: no references
    assert not load_benchmark("caption", "coco", annotations=ann).has_references


# --------------------------------------------------------------------------- 9. data file contents


def test_a_data_file_edited_in_place_is_not_resumed(tmp_path, fake_model, capsys, monkeypatch):
    """The cache fingerprint held the questions file's path only: edited in place (same path, same size, even
    the same mtime), its old answers were taken for the new questions."""
    model, record = fake_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    q = vqav2_questions(tmp_path, "val2014", image_id=1)
    png(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    out = tmp_path / "out"
    base = ["vqa", "--benchmark", "vqav2", "--model", str(model), "--questions", str(q),
            "--images", str(tmp_path / "val2014"), "--out", str(out)]
    assert cli(*base) == 0 and record["images"] == 1
    assert cli(*base) == 0 and record["images"] == 1  # unchanged: resumed, nothing predicted again
    stat = q.stat()
    q.write_text(q.read_text().replace("is it red?", "is it tan?"))
    os.utime(q, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert q.stat().st_size == stat.st_size
    capsys.readouterr()
    assert cli(*base) == 2 and record["images"] == 1
    line = one_error_line(capsys)
    assert "different run (differs in: data_sha256.questions)" in line and "--no-resume" in line
    assert cli(*base, "--no-resume") == 0 and record["images"] == 2  # the edited questions, predicted afresh
    fingerprint = json.loads((out / runner.CACHE_NAME).read_text().splitlines()[0])["fingerprint"]
    assert fingerprint["data_sha256"] == {"questions": runner.file_sha256(q)}
    assert runner.file_sha256(q) == hashlib.sha256(q.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- 10. prediction id types


def test_prediction_ids_must_have_the_benchmark_s_type(tmp_path, capsys):
    """"123" for 123 matched by coercion (and 123 for GQA's "123"): the official tools match neither."""
    q = vqav2_questions(tmp_path, "val2014", image_id=1)  # question_id 1000 (an integer)
    a = tmp_path / "annotations.json"
    a.write_text(json.dumps({"annotations": [{"question_id": 1000, "image_id": 1, "answer_type": "yes/no",
                                              "question_type": "is it", "answers": ["yes"] * 10}]}))
    p = tmp_path / "p.json"
    base = ["vqa", "--benchmark", "vqav2", "--predictions", str(p), "--questions", str(q), "--annotations", str(a),
            "--bootstrap", "0"]
    p.write_text(json.dumps([{"question_id": "1000", "answer": "yes"}]))
    assert cli(*base, "--out", str(tmp_path / "o1")) == 2
    assert one_error_line(capsys) == (f"error: {p}: entry 0: question_id \"1000\" is a string; vqav2 expects an "
                                      "integer question_id (as its own files have it)")
    # an id outside the evaluated set is checked too (against the set's type), so is a float
    p.write_text(json.dumps([{"question_id": 1000, "answer": "yes"}, {"question_id": 7.0, "answer": "no"}]))
    assert cli(*base, "--out", str(tmp_path / "o2")) == 2
    assert "entry 1: question_id 7.0 is a number with a fraction; vqav2 expects an integer" in one_error_line(capsys)
    p.write_text(json.dumps([{"question_id": 1000, "answer": "yes"}]))
    assert cli(*base, "--out", str(tmp_path / "o3")) == 0

    # GQA: questionIds are strings in its files (and in its eval.py)
    g = tmp_path / "gqa.json"
    g.write_text(json.dumps({"20": {"imageId": "n1", "question": "q?", "answer": "yes"}}))
    p.write_text(json.dumps([{"questionId": 20, "prediction": "yes"}]))
    gqa = ["vqa", "--benchmark", "gqa", "--predictions", str(p), "--questions", str(g), "--bootstrap", "0"]
    assert cli(*gqa, "--out", str(tmp_path / "g1")) == 2
    assert "entry 0: questionId 20 is an integer; gqa expects a string questionId" in one_error_line(capsys)
    p.write_text(json.dumps([{"questionId": "20", "prediction": "yes"}]))
    assert cli(*gqa, "--out", str(tmp_path / "g2")) == 0

    # COCO captions: image_id an integer
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                               "annotations": [{"image_id": 1, "caption": "a red star"}]}))
    p.write_text(json.dumps([{"image_id": "1", "caption": "a red star"}]))
    assert cli("caption", "--benchmark", "coco", "--predictions", str(p), "--annotations", str(ann),
               "--out", str(tmp_path / "c1"), "--tokenizer", "python", "--skip-metrics", "METEOR,SPICE") == 2
    assert "image_id \"1\" is a string; coco expects an integer image_id" in one_error_line(capsys)


def test_shard_ids_keep_their_own_types(tmp_path):
    """Shards: a sample's question_id as its JSON has it, else its key (a string); what eval writes reads back."""
    from mmlm.evaluation.benchmarks import BenchmarkError, read_predictions, write_predictions

    shard = tmp_path / "s-000000.tar"
    with tarfile.open(shard, "w") as tar:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
        for key, meta in (("k0", {"question_id": 77}), ("k1", {})):
            for name, data in ((f"{key}.png", buf.getvalue()),
                               (f"{key}.json", json.dumps({"question": "red?", "answers": ["yes"], **meta}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    bench = load_benchmark("vqa", "shards", shards=str(shard))
    p = tmp_path / "p.json"
    write_predictions(bench, {"77": "yes", "k1": "no"}, p)
    assert json.loads(p.read_text()) == [{"question_id": 77, "answer": "yes"}, {"question_id": "k1", "answer": "no"}]
    assert read_predictions(bench, p) == {"77": "yes", "k1": "no"}
    p.write_text(json.dumps([{"question_id": "77", "answer": "yes"}]))
    with pytest.raises(BenchmarkError, match="entry 0: question_id \"77\" is a string; shards expects an integer"):
        read_predictions(bench, p)
    p.write_text(json.dumps([{"question_id": None, "answer": "yes"}]))
    with pytest.raises(BenchmarkError, match="question_id is null; shards expects a string or an integer"):
        read_predictions(bench, p)
