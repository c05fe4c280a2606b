"""End-to-end evaluation per benchmark format with a fake predict_fn; --predictions scoring;
resume from the cache; --limit; paired bootstrap via --compare; the training callback."""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmlm.cli import eval as eval_cli
from mmlm.evaluation import runner
from mmlm.evaluation.benchmarks import BenchmarkError, load_benchmark

FAST = ["--tokenizer", "python", "--skip-metrics", "METEOR,SPICE"]


# --------------------------------------------------------------------------- fixtures


def png(path: Path | None, index: int) -> bytes:
    """An 8x8 PNG whose red channel encodes ``index`` (the fake model reads it back)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (index * 10, 20, 30)).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


CAPTIONS = ["a dog runs on the grass", "two men ride bikes", "a plate of food", "a cat on a couch"]


def fake_predict(answers: dict[str, str] | None = None, calls: list | None = None, fail_after: int | None = None):
    """Captions from the image's red channel; VQA answers looked up by prompt."""

    def fn(images, prompts):
        if calls is not None:
            if fail_after is not None and len(calls) >= fail_after:
                raise KeyboardInterrupt("simulated interruption")
            calls.append(len(images))
        out = []
        for im, p in zip(images, prompts):
            if p is None:
                out.append(CAPTIONS[im.getpixel((0, 0))[0] // 10 % len(CAPTIONS)])
            else:
                out.append((answers or {}).get(p.split("\n")[0], "no idea"))
        return out

    return fn


@pytest.fixture
def patch_model(monkeypatch):
    """Make `--model DIR` use a fake predict_fn; returns the dict of VQA answers to use."""
    answers: dict[str, str] = {}

    def factory(model_dir, **kw):
        return fake_predict(answers)

    monkeypatch.setattr(runner, "model_predict_fn", factory)
    return answers


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mmlm")
    sub = parser.add_subparsers(dest="command")
    eval_cli.add_parser(sub)
    args = parser.parse_args(["eval", *argv, "--no-progress"])
    return args.run(args)


def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    return d


def write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, obj in samples:
            for ext, data in (("png", image), ("json", json.dumps(obj).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def load(path: Path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- caption benchmarks


def karpathy(tmp_path: Path, dataset: str = "coco") -> tuple[Path, Path]:
    images = tmp_path / "images"
    entries = []
    for i in range(4):
        name = f"COCO_val2014_{i:012d}.jpg" if dataset == "coco" else f"{1000 + i}.jpg"
        sub = images / "val2014" / name if dataset == "coco" else images / name
        png(sub, i)
        e = {"filename": name, "imgid": i, "split": "test" if i < 3 else "train",
             "sentences": [{"raw": CAPTIONS[i]}, {"raw": CAPTIONS[i].replace("a ", "the ")}, {"raw": "something"}]}
        if dataset == "coco":
            e.update(filepath="val2014", cocoid=100 + i)
        entries.append(e)
    ann = tmp_path / f"dataset_{dataset}.json"
    ann.write_text(json.dumps({"images": entries, "dataset": dataset}))
    return ann, images


def test_coco_karpathy_model_then_predictions(tmp_path, patch_model, capsys):
    ann, images = karpathy(tmp_path)
    out = tmp_path / "out"
    assert cli("caption", "--benchmark", "coco-karpathy", "--model", str(model_dir(tmp_path)),
               "--annotations", str(ann), "--images", str(images), "--out", str(out), "--bootstrap", "50", *FAST) == 0
    printed = capsys.readouterr().out
    assert "CIDEr" in printed and "metrics.json" in printed
    preds = load(out / "predictions.json")
    assert preds == [{"image_id": 100 + i, "caption": CAPTIONS[i]} for i in range(3)]  # test split only
    m = load(out / "metrics.json")
    assert m["num_items"] == m["num_scored"] == 3 and m["tokenizer"] == "python"
    for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        lo, hi = m["ci95"][k]
        assert lo - 1e-9 <= m[k] <= hi + 1e-9, k
    assert m["Bleu_1"] > 0.9 and set(m["skipped_metrics"]) == {"METEOR", "SPICE"}
    rows = [json.loads(x) for x in (out / "per_item.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["100", "101", "102"] and "CIDEr" in rows[0]["scores"]

    # the same predictions scored without a model give the same numbers
    out2 = tmp_path / "out2"
    assert cli("caption", "--benchmark", "coco-karpathy", "--predictions", str(out / "predictions.json"),
               "--annotations", str(ann), "--out", str(out2), "--bootstrap", "50", *FAST) == 0
    m2 = load(out2 / "metrics.json")
    assert all(m2[k] == m[k] for k in ("Bleu_4", "ROUGE_L", "CIDEr"))

    # a predictions file that lacks items is refused (unless --allow-missing)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(preds[:2]))
    assert cli("caption", "--benchmark", "coco-karpathy", "--predictions", str(partial), "--annotations", str(ann),
               "--out", str(tmp_path / "o3"), *FAST) == 2
    assert "--allow-missing" in capsys.readouterr().err
    assert cli("caption", "--benchmark", "coco-karpathy", "--predictions", str(partial), "--annotations", str(ann),
               "--out", str(tmp_path / "o3"), "--allow-missing", *FAST) == 0
    assert load(tmp_path / "o3" / "metrics.json")["num_scored"] == 2


def test_flickr_coco_nocaps_formats(tmp_path, patch_model):
    ann, images = karpathy(tmp_path, "flickr30k")
    out = tmp_path / "flickr"
    assert cli("caption", "--benchmark", "flickr30k", "--model", str(model_dir(tmp_path)), "--annotations", str(ann),
               "--images", str(images), "--out", str(out), "--split", "test", *FAST) == 0
    assert [p["image_id"] for p in load(out / "predictions.json")] == [1000, 1001, 1002]

    for name in ("coco", "nocaps"):
        imgs = tmp_path / f"{name}_images"
        data = {
            "images": [{"id": 7 + i, "file_name": f"img{i}.png", "domain": ["in-domain", "out-domain"][i % 2]}
                       for i in range(4)],
            "annotations": [{"id": k, "image_id": 7 + i, "caption": c}
                            for k, (i, c) in enumerate((i, c) for i in range(4) for c in (CAPTIONS[i], "a thing"))],
        }
        for i in range(4):
            png(imgs / f"img{i}.png", i)
        a = tmp_path / f"{name}.json"
        a.write_text(json.dumps(data))
        o = tmp_path / name
        assert cli("caption", "--benchmark", name, "--model", str(model_dir(tmp_path)), "--annotations", str(a),
                   "--images", str(imgs), "--out", str(o), "--bootstrap", "20", *FAST) == 0
        m = load(o / "metrics.json")
        assert m["num_scored"] == 4 and m["CIDEr"] > 1
        assert ("perDomain" in m) == (name == "nocaps")
        if name == "nocaps":
            assert set(m["perDomain"]) == {"in-domain", "out-domain"}


def test_caption_shards_and_limit(tmp_path, patch_model):
    shard = write_tar(tmp_path / "shards" / "test-000000.tar", [
        (f"s{i}", png(None, i), {"captions": [CAPTIONS[i], "x y z"], "image_id": 50 + i}) for i in range(4)
    ])
    out = tmp_path / "out"
    assert cli("caption", "--benchmark", "shards", "--shards", str(shard.parent), "--model", str(model_dir(tmp_path)),
               "--out", str(out), "--limit", "2", *FAST) == 0
    m = load(out / "metrics.json")
    assert m["num_items"] == m["num_scored"] == 2
    assert "--limit 2: the first 2 items only, not the benchmark's full score" in m["notices"]  # a partial number
    assert load(out / "predictions.json") == [{"image_id": 50, "caption": CAPTIONS[0]},
                                              {"image_id": 51, "caption": CAPTIONS[1]}]
    # an edited checkpoint (its prompt, template, transform: not its weights) is a new run, not the cached one
    (model_dir(tmp_path) / "processor_config.json").write_text('{"caption_prompt": "Describe it."}')
    assert cli("caption", "--benchmark", "shards", "--shards", str(shard.parent), "--model", str(model_dir(tmp_path)),
               "--out", str(out), "--limit", "2", *FAST) == 2


# --------------------------------------------------------------------------- VQA benchmarks


def vqav2_files(tmp_path: Path, n: int = 4):
    images = tmp_path / "val2014"
    questions, anns = [], []
    kinds = [("what color", "other", "red"), ("how many", "number", "2"), ("is the", "yes/no", "yes"),
             ("what is", "other", "cat")]
    for i in range(n):
        qt, at, a = kinds[i % len(kinds)]
        png(images / f"COCO_val2014_{i:012d}.jpg", i)
        questions.append({"image_id": i, "question": f"q{i}: {qt} ?", "question_id": 1000 + i})
        answers = [a] * 6 + ["other"] * 4
        anns.append({"question_id": 1000 + i, "image_id": i, "question_type": qt, "answer_type": at,
                     "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, x in enumerate(answers)],
                     "multiple_choice_answer": a})
    q = tmp_path / "questions.json"
    q.write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    a = tmp_path / "annotations.json"
    a.write_text(json.dumps({"annotations": anns}))
    gold = {f"q{i}: {kinds[i % 4][0]} ?": kinds[i % 4][2] for i in range(n)}
    return q, a, images, gold


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_vqav2_style(tmp_path, patch_model, name):
    q, a, images, gold = vqav2_files(tmp_path)
    patch_model.update(gold)
    patch_model["q1: how many ?"] = "two"  # normalized to "2"
    patch_model["q3: what is ?"] = "dog"  # wrong
    out = tmp_path / "out"
    assert cli("vqa", "--benchmark", name, "--model", str(model_dir(tmp_path)), "--questions", str(q),
               "--annotations", str(a), "--images", str(images), "--out", str(out)) == 0
    m = load(out / "metrics.json")
    assert m["overall"] == 75.0
    assert m["perAnswerType"] == {"other": 50.0, "number": 100.0, "yes/no": 100.0}
    assert m["perQuestionType"]["what is"] == 0.0
    lo, hi = m["ci95"]["overall"]
    assert lo <= 75.0 <= hi and m["bootstrap"]["resamples"] == 1000
    preds = load(out / "predictions.json")
    assert preds[1] == {"question_id": 1001, "answer": "two"}
    # scoring the submission file reproduces the metrics
    assert cli("vqa", "--benchmark", name, "--predictions", str(out / "predictions.json"), "--questions", str(q),
               "--annotations", str(a), "--out", str(tmp_path / "again")) == 0
    assert load(tmp_path / "again" / "metrics.json")["overall"] == 75.0


def test_vizwiz_textvqa_gqa_pope_and_vqa_shards(tmp_path, patch_model):
    images = tmp_path / "imgs"
    for i in range(3):
        png(images / f"im{i}.jpg", i)
    answers10 = lambda a: [a] * 10  # noqa: E731
    patch_model.update({"what is it?": "a dog", "which color?": "Blue", "is there a cat in the image?": "No, there is not."})

    # VizWiz: list of {image, question, answers: [{answer, answer_confidence}]}
    viz = tmp_path / "vizwiz.json"
    viz.write_text(json.dumps([
        {"image": "im0.jpg", "question": "what is it?", "answer_type": "other",
         "answers": [{"answer": "dog", "answer_confidence": "yes"}] * 10},
        {"image": "im1.jpg", "question": "which color?", "answer_type": "other",
         "answers": [{"answer": "red", "answer_confidence": "yes"}] * 10},
    ]))
    out = tmp_path / "vizwiz"
    assert cli("vqa", "--benchmark", "vizwiz", "--model", str(model_dir(tmp_path)), "--annotations", str(viz),
               "--images", str(images), "--out", str(out)) == 0
    assert load(out / "metrics.json")["overall"] == 50.0
    assert load(out / "predictions.json")[0] == {"image": "im0.jpg", "answer": "a dog"}

    # TextVQA: {"data": [{question_id, question, image_id, answers}]}
    tv = tmp_path / "textvqa.json"
    tv.write_text(json.dumps({"data": [
        {"question_id": 5, "question": "which color?", "image_id": "im1", "answers": answers10("blue")},
        {"question_id": 6, "question": "what is it?", "image_id": "im2", "answers": ["dog"] * 2 + ["cat"] * 8},
    ]}))
    out = tmp_path / "textvqa"
    assert cli("vqa", "--benchmark", "textvqa", "--model", str(model_dir(tmp_path)), "--annotations", str(tv),
               "--images", str(images), "--out", str(out)) == 0
    assert load(out / "metrics.json")["overall"] == 80.0  # (1.0 + 0.6) / 2
    # TextVQA's own rule (EvalAI processing of the raw answers too): "the dog" matches "A dog"
    tv.write_text(json.dumps({"data": [
        {"question_id": 7, "question": "what is it?", "image_id": "im0", "answers": answers10("the dog")},
    ]}))
    out = tmp_path / "textvqa-raw"
    assert cli("vqa", "--benchmark", "textvqa", "--model", str(model_dir(tmp_path)), "--annotations", str(tv),
               "--images", str(images), "--out", str(out)) == 0
    m = load(out / "metrics.json")
    assert m["overall"] == 100.0 and m["accuracy_rule"].startswith("TextVQA")

    # GQA: {qid: {imageId, question, answer, types}} -> [{questionId, prediction}]; scored as LLaVA does
    # (reply lower-cased, trailing "." dropped, then compared exactly: "Dog." matches "dog")
    patch_model["what animal is it?"] = "Dog."
    gqa = tmp_path / "gqa.json"
    gqa.write_text(json.dumps({
        "201": {"imageId": "im0", "question": "what animal is it?", "answer": "dog",
                "types": {"structural": "query", "semantic": "obj"}},
        "202": {"imageId": "im1", "question": "which color?", "answer": "red",
                "types": {"structural": "choose", "semantic": "attr"}},
    }))
    out = tmp_path / "gqa"
    assert cli("vqa", "--benchmark", "gqa", "--model", str(model_dir(tmp_path)), "--questions", str(gqa),
               "--images", str(images), "--out", str(out)) == 0
    m = load(out / "metrics.json")
    assert m["overall"] == 50.0 and m["perAnswerType"] == {"open": 100.0, "binary": 0.0}
    # the submission holds the replies as scored, so GQA's eval.py (predicted == gold) gives the same number
    assert load(out / "predictions.json") == [{"questionId": "201", "prediction": "dog"},
                                             {"questionId": "202", "prediction": "blue"}]
    per_item = [json.loads(x) for x in (out / "per_item.jsonl").read_text().splitlines()]
    assert sorted(r["prediction"] for r in per_item) == ["Blue", "Dog."]  # the raw replies

    # POPE: jsonl {question_id, image, text, label} -> jsonl {question_id, prompt, text}
    pope = tmp_path / "pope.jsonl"
    pope.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": 1, "image": "im0.jpg", "text": "is there a cat in the image?", "label": "no", "category": "random"},
        {"question_id": 2, "image": "im1.jpg", "text": "which color?", "label": "no", "category": "random"},
        {"question_id": 3, "image": "im2.jpg", "text": "what is it?", "label": "yes", "category": "popular"},
    ]))
    out = tmp_path / "pope"
    assert cli("vqa", "--benchmark", "pope", "--model", str(model_dir(tmp_path)), "--questions", str(pope),
               "--images", str(images), "--out", str(out)) == 0
    m = load(out / "metrics.json")
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (1, 1, 1, 0)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["precision"] == 0.5 and m["recall"] == 1.0
    assert m["perCategory"]["popular"]["accuracy"] == 1.0 and "f1" in m["ci95"]
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert lines[0] == {"question_id": 1, "prompt": "is there a cat in the image?", "text": "No, there is not."}

    # our shards with question/answers
    shard = write_tar(tmp_path / "vqa-shards" / "s-000000.tar", [
        ("k0", png(None, 0), {"question": "what is it?", "answers": answers10("dog"), "question_id": 77,
                              "question_type": "what is", "answer_type": "other"}),
        ("k1", png(None, 1), {"question": "which color?", "answers": ["blue"]}),
    ])
    out = tmp_path / "shards"
    assert cli("vqa", "--benchmark", "shards", "--shards", str(shard), "--model", str(model_dir(tmp_path)),
               "--out", str(out)) == 0
    m = load(out / "metrics.json")
    assert m["overall"] == 100.0 and m["perQuestionType"] == {"what is": 100.0}
    assert load(out / "predictions.json") == [{"question_id": 77, "answer": "a dog"},
                                             {"question_id": "k1", "answer": "Blue"}]


# --------------------------------------------------------------------------- runner behaviour


def test_resume_after_interruption(tmp_path):
    q, a, images, gold = vqav2_files(tmp_path, n=7)
    bench = load_benchmark("vqa", "vqav2", questions=q, annotations=a, images=images)
    out = tmp_path / "out"
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(bench, fake_predict(gold, calls, fail_after=2), out, batch_size=2, progress=False,
                        fingerprint={"model": "m1"})
    cached = (out / "predictions.cache.jsonl").read_text().splitlines()
    assert len(cached) == 1 + 4 and not (out / "metrics.json").exists()
    with open(out / "predictions.cache.jsonl", "a") as f:
        f.write('{"id": "1006", "predic')  # a torn line from a crash mid-write
    calls2: list[int] = []
    report = runner.evaluate(bench, fake_predict(gold, calls2), out, batch_size=2, progress=False,
                             fingerprint={"model": "m1"}, n_resamples=10)
    assert sum(calls2) == 3 and report["overall"] == 100.0 and report["num_scored"] == 7
    assert len(load(out / "predictions.json")) == 7
    # a complete rerun predicts nothing; another model is refused unless resume=False
    calls3: list[int] = []
    runner.evaluate(bench, fake_predict(gold, calls3), out, progress=False, fingerprint={"model": "m1"}, n_resamples=0)
    assert calls3 == []
    with pytest.raises(runner.EvalError, match="different run"):
        runner.evaluate(bench, fake_predict(gold), out, progress=False, fingerprint={"model": "m2"})
    runner.evaluate(bench, fake_predict(gold, calls3), out, progress=False, fingerprint={"model": "m2"},
                    resume=False, n_resamples=0)
    assert sum(calls3) == 7


def test_cache_of_other_data_files_is_not_reused(tmp_path):
    """POPE's random/popular/adversarial files number their questions alike: a rerun into the same
    --out with another file must not take the first file's answers from the cache."""
    images = tmp_path / "imgs"
    png(images / "im0.jpg", 0)
    files = {}
    for name, question in (("random", "is there a cat in the image?"), ("adversarial", "is there a dog in the image?")):
        files[name] = tmp_path / f"coco_pope_{name}.json"
        row = {"question_id": 1, "image": "im0.jpg", "text": question, "label": "no"}
        files[name].write_text(json.dumps(row) + "\n")
    answers = {"is there a cat in the image?": "No", "is there a dog in the image?": "Yes"}
    out = tmp_path / "pope"
    bench = load_benchmark("vqa", "pope", questions=files["random"], images=images)
    assert runner.evaluate(bench, fake_predict(answers), out, progress=False, n_resamples=0)["accuracy"] == 1.0
    bench = load_benchmark("vqa", "pope", questions=files["adversarial"], images=images)
    with pytest.raises(runner.EvalError, match="different run.*data"):
        runner.evaluate(bench, fake_predict(answers), out, progress=False, n_resamples=0)
    assert runner.evaluate(bench, fake_predict(answers), out, progress=False, n_resamples=0,
                           resume=False)["accuracy"] == 0.0
    # a run that failed before predicting anything holds no predictions to protect: the fixed command just runs
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "predictions.cache.jsonl").write_text(json.dumps({"fingerprint": {"data": "another file"}}) + "\n")
    assert runner.evaluate(bench, fake_predict(answers), failed, progress=False, n_resamples=0)["accuracy"] == 0.0


def test_bad_images_are_counted_and_scored_as_wrong(tmp_path):
    """The score covers every item, as the official evaluations do, and the submission holds every id (their
    loadRes asserts it): an item whose image cannot be read counts as wrong instead of dropping out."""
    q, a, images, gold = vqav2_files(tmp_path, n=4)
    (images / f"COCO_val2014_{1:012d}.jpg").write_bytes(b"not a png")
    bench = load_benchmark("vqa", "vqav2", questions=q, annotations=a, images=images)
    report = runner.evaluate(bench, fake_predict(gold), tmp_path / "o", progress=False, n_resamples=0,
                             max_bad_fraction=0.25)
    assert report["num_skipped"] == 1 and report["num_scored"] == 4 and report["overall"] == 75.0
    assert any("unreadable images are scored as wrong" in n for n in report["notices"])
    submitted = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert len(submitted) == 4 and sum(r["answer"] == "" for r in submitted) == 1
    (images / f"COCO_val2014_{2:012d}.jpg").write_bytes(b"")
    with pytest.raises(runner.EvalError, match="unreadable images"):
        runner.evaluate(bench, fake_predict(gold), tmp_path / "o2", progress=False, max_bad_fraction=0.25)


def test_compare_paired_bootstrap(tmp_path, capsys):
    n = 60
    q, a, images, gold = vqav2_files(tmp_path, n=n)
    good = [{"question_id": 1000 + i, "answer": ["red", "2", "yes", "cat"][i % 4]} for i in range(n)]
    bad = [dict(p, answer="nope") if i % 3 else p for i, p in enumerate(good)]
    files = {}
    for name, preds in (("good", good), ("good_again", good), ("bad", bad)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(preds))
    base = ["vqa", "--benchmark", "vqav2", "--questions", str(q), "--annotations", str(a), "--bootstrap", "400"]
    assert cli(*base, "--predictions", str(files["bad"]), "--out", str(tmp_path / "bad")) == 0
    assert cli(*base, "--predictions", str(files["good"]), "--out", str(tmp_path / "good")) == 0
    assert cli(*base, "--predictions", str(files["good_again"]), "--out", str(tmp_path / "same"),
               "--compare", str(tmp_path / "good" / "metrics.json")) == 0
    same = load(tmp_path / "same" / "comparison.json")["metrics"]["overall"]
    assert same["delta"] == 0 and same["p_value"] == 1.0
    capsys.readouterr()
    assert cli(*base, "--predictions", str(files["good"]), "--out", str(tmp_path / "cmp"),
               "--compare", str(tmp_path / "bad" / "metrics.json")) == 0
    assert "paired bootstrap" in capsys.readouterr().out
    better = load(tmp_path / "cmp" / "comparison.json")
    assert better["common_items"] == n
    assert better["metrics"]["overall"]["delta"] > 50 and better["metrics"]["overall"]["p_value"] < 0.01


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert cli("vqa", "--benchmark", "vqav2", "--predictions", str(tmp_path / "p.json"),
               "--questions", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing.json" in err[0]
    q, a, images, _ = vqav2_files(tmp_path, n=2)
    assert cli("vqa", "--benchmark", "vqav2", "--model", str(tmp_path / "nope"), "--questions", str(q),
               "--images", str(images), "--out", str(tmp_path / "o")) == 2
    assert capsys.readouterr().err.startswith("error: --model")
    assert cli("vqa", "--benchmark", "vqav2", "--model", str(model_dir(tmp_path)), "--questions", str(q),
               "--images", str(images), "--out", str(tmp_path / "o"), "--compile", "--num-beams", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not beam search" in err[0] and not (tmp_path / "o").exists()
    # a model on VQAv2 annotations without the questions file would caption the images, not answer
    assert cli("vqa", "--benchmark", "vqav2", "--model", str(model_dir(tmp_path)), "--annotations", str(a),
               "--images", str(images), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--questions FILE is needed" in err[0] and not (tmp_path / "o").exists()


def test_wrong_shapes_and_mismatched_files_are_one_line_errors(tmp_path, capsys):
    q, a, images, _ = vqav2_files(tmp_path, n=3)
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"question_id": 1000 + i, "answer": "red"} for i in range(3)]))

    def fails(*argv: str, match: str) -> None:
        out = tmp_path / "o"
        assert cli(*argv, "--out", str(out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err
        assert not (out / "metrics.json").exists()

    # annotations of another split: no question_id in common is an error, not "nothing scored"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"annotations": [dict(x, question_id=x["question_id"] + 10**6)
                                                 for x in load(a)["annotations"]]}))
    fails("vqa", "--benchmark", "vqav2", "--predictions", str(preds), "--questions", str(q),
          "--annotations", str(other), match="no annotation for any question_id")
    # "answers" as a string would be scored as one answer per character
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [dict(x, answers="red") for x in load(a)["annotations"]]}))
    fails("vqa", "--benchmark", "vqav2", "--predictions", str(preds), "--questions", str(q),
          "--annotations", str(bad), match="'answers' must be a list")
    bad.write_text(json.dumps([{"image": "x.jpg", "question": "q?", "answers": "red"}]))
    fails("vqa", "--benchmark", "vizwiz", "--predictions", str(preds), "--annotations", str(bad),
          match="'answers' must be a list")
    # entries that are not objects
    bad.write_text(json.dumps({"123": "what?"}))
    fails("vqa", "--benchmark", "gqa", "--predictions", str(preds), "--questions", str(bad),
          match="expected a question object")
    bad.write_text(json.dumps({"images": [1, 2]}))
    fails("caption", "--benchmark", "coco-karpathy", "--predictions", str(preds), "--annotations", str(bad),
          match="expected an object")
    # POPE files merged without renumbering: a repeated question_id would take another's answer
    bad.write_text("".join(json.dumps({"question_id": 1, "image": "x.jpg", "text": t, "label": "no"}) + "\n"
                           for t in ("is there a cat?", "is there a dog?")))
    fails("vqa", "--benchmark", "pope", "--predictions", str(preds), "--questions", str(bad),
          match="question_id 1 occurs more than once")
    bad.write_bytes(b"\xff\xfe{}")
    fails("vqa", "--benchmark", "pope", "--predictions", str(preds), "--questions", str(bad), match="bad.json")


def test_caption_eval_without_pycocoevalcap_says_how_to_install(tmp_path, patch_model, capsys, monkeypatch):
    """Checked before the model describes anything: the scorers are only needed at the end."""
    import sys

    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # as if not installed
    ann, images = karpathy(tmp_path)
    out = tmp_path / "out"
    assert cli("caption", "--benchmark", "coco-karpathy", "--model", str(model_dir(tmp_path)),
               "--annotations", str(ann), "--images", str(images), "--out", str(out), *FAST) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: caption metrics are pycocoevalcap's") and "pip install pycocoevalcap" in line
    assert not out.exists()


def test_bad_compare_fails_before_any_work(tmp_path, capsys):
    q, a, images, gold = vqav2_files(tmp_path, n=3)
    bench = load_benchmark("vqa", "vqav2", questions=q, annotations=a, images=images)
    calls: list[int] = []
    out = tmp_path / "out"
    with pytest.raises(runner.EvalError, match="no such metrics file"):
        runner.evaluate(bench, fake_predict(gold, calls), out, progress=False, compare=tmp_path / "nope.json")
    assert calls == [] and not out.exists()  # nothing predicted, nothing written
    # a compare that fails late (no common items) leaves no per_item.jsonl without its metrics.json
    runner.evaluate(bench, fake_predict(gold), tmp_path / "a", progress=False, n_resamples=0)
    rows = (tmp_path / "a" / "per_item.jsonl").read_text().replace('"id": "10', '"id": "x10')
    (tmp_path / "a" / "per_item.jsonl").write_text(rows)
    with pytest.raises(runner.EvalError, match="no item ids in common"):
        runner.evaluate(bench, fake_predict(gold), out, progress=False, compare=tmp_path / "a")
    assert not (out / "per_item.jsonl").exists() and not (out / "metrics.json").exists()


def test_callback_logs_metrics(tmp_path, monkeypatch):
    from mmlm.evaluation.callback import EvalCallback

    shard = write_tar(tmp_path / "s" / "s-000000.tar", [
        (f"k{i}", png(None, i), {"question": "what is it?", "answers": ["dog"] * 10, "question_id": i}) for i in range(3)
    ])
    monkeypatch.setattr(runner, "model_predict_fn", lambda model, **kw: fake_predict({"what is it?": "dog"}))

    class Module:
        def __init__(self):
            self.logged: dict[str, float] = {}
            self.vlm = type("V", (), {"training": True, "train": lambda self: setattr(self, "retrained", True)})()
            self.processor = object()

        def log(self, name, value, **kw):
            self.logged[name] = value

    class Trainer:
        global_step = 0
        is_global_zero = True

    cb, module, trainer = EvalCallback(str(shard), every_n_steps=2, limit=2, kind="vqa"), Module(), Trainer()
    for step in (0, 1, 2, 2):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, 0)
    assert module.logged == {"eval/vqa/overall": 100.0}
    assert cb.last_metrics["overall"] == 100.0 and getattr(module.vlm, "retrained", False)
    assert len(cb.benchmark().items) == 2
    assert cb.benchmark().items[0].prompt == "what is it?\nAnswer the question using a single word or phrase."
    # the run's own suffix (the processor's record) when it has one, an explicit one over both
    from types import SimpleNamespace

    trained = SimpleNamespace(config=SimpleNamespace(vqa_suffix=""))
    assert EvalCallback(str(shard), limit=1).benchmark(trained).items[0].prompt == "what is it?"
    assert EvalCallback(str(shard), limit=1, prompt_suffix="One word.").benchmark(trained).items[0].prompt \
        == "what is it?\nOne word."


@pytest.mark.slow
def test_real_tiny_checkpoint(tmp_path):
    """The --model path through mmlm.load/describe on a random-weight tiny checkpoint."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny import tiny_pair

    from mmlm.checkpoint import save_pretrained

    save_pretrained(tmp_path / "model", *tiny_pair())
    q, a, images, _ = vqav2_files(tmp_path, n=3)
    out = tmp_path / "out"
    assert cli("vqa", "--benchmark", "vqav2", "--model", str(tmp_path / "model"), "--questions", str(q),
               "--annotations", str(a), "--images", str(images), "--out", str(out), "--batch-size", "2",
               "--max-new-tokens", "4", "--device", "cpu") == 0
    m = load(out / "metrics.json")
    assert m["num_scored"] == 3 and m["generation"]["num_beams"] == 1 and m["generation"]["do_sample"] is False
    assert len(load(out / "predictions.json")) == 3
    compiled = tmp_path / "compiled"  # the compiled decode step predicts the same answers
    assert cli("vqa", "--benchmark", "vqav2", "--model", str(tmp_path / "model"), "--questions", str(q),
               "--annotations", str(a), "--images", str(images), "--out", str(compiled), "--batch-size", "2",
               "--max-new-tokens", "4", "--device", "cpu", "--compile") == 0
    assert load(compiled / "metrics.json")["generation"]["compile"] is True
    assert load(compiled / "predictions.json") == load(out / "predictions.json")


def test_shards_with_no_question_say_so_and_not_split(tmp_path):
    """`eval vqa` has no --split: the message names what the shards hold instead."""
    shard = write_tar(tmp_path / "s" / "s-000000.tar", [
        (f"k{i}", png(None, i), {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
        for i in range(2)
    ])
    with pytest.raises(BenchmarkError, match=r"no items to evaluate \(skipped 2 shard sample\(s\) without a question; "
                                             r"check the files and --limit\)$"):
        load_benchmark("vqa", "shards", shards=str(shard))


def test_two_runs_into_one_out_are_kept_apart(tmp_path):
    """A second run while the first writes its cache: refused (both appended to it, or one replaced it)."""
    from mmlm.evaluation import prediction

    q, a, images, gold = vqav2_files(tmp_path, n=4)
    bench = load_benchmark("vqa", "vqav2", questions=q, annotations=a, images=images)
    out = tmp_path / "o"
    held = prediction._lock_cache(out / runner.CACHE_NAME)  # as a running eval holds it
    with pytest.raises(runner.EvalError, match=r"^another mmlm eval is writing .*: wait for it to end, or use another"):
        runner.evaluate(bench, fake_predict(gold), out, progress=False, n_resamples=0)
    prediction._unlock(held)
    assert runner.evaluate(bench, fake_predict(gold), out, progress=False, n_resamples=0)["overall"] == 100.0
    assert not [p for p in os.listdir(out) if p.endswith(".lock")]


def test_a_failed_run_does_not_leave_an_earlier_run_s_results_as_its_own(tmp_path):
    q, a, images, gold = vqav2_files(tmp_path, n=4)
    bench = load_benchmark("vqa", "vqav2", questions=q, annotations=a, images=images)
    out = tmp_path / "o"
    runner.evaluate(bench, fake_predict(gold), out, progress=False, n_resamples=0)
    assert (out / "metrics.json").is_file() and (out / "predictions.json").is_file()
    for i in range(4):  # every image unreadable now: the new run fails
        (images / f"COCO_val2014_{i:012d}.jpg").write_bytes(b"")
    with pytest.raises(runner.EvalError):
        runner.evaluate(bench, fake_predict(gold), out, progress=False, n_resamples=0, resume=False)
    assert not (out / "metrics.json").exists() and not (out / "predictions.json").exists()
