"""Caption metrics: identical to pycocoevalcap's COCOEvalCap; the no-Java fallback; BLEU stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmlm.evaluation import caption_metrics as cm

REFS = {
    1: ["A dog runs across the green grass.", "A brown dog is running on a lawn.", "The dog's running, fast!",
        "a dog playing outside", "A puppy (brown) runs in a field."],
    2: ["Two men ride bikes down a street.", "Two cyclists on a city road.", "People riding bicycles -- downtown.",
        "two men on bicycles", "Bikers travel along the road; it is sunny."],
    3: ["A plate of food with broccoli and rice.", "Food on a white plate.", "Some rice, broccoli and meat.",
        "a dinner plate with vegetables", "A healthy meal is served."],
    4: ["A cat sleeping on a couch.", "The cat is asleep on the sofa.", "A grey cat naps.",
        "cat lying on a couch", "A kitty rests on the furniture."],
    5: ["A red bus on the street.", "A double decker bus drives by.", "The bus is red.",
        "red bus in a city", "A bus waits at a stop."],
}
PREDS = {
    1: "A dog is running on the grass.",
    2: "Two men riding bikes on a street.",
    3: "A plate of rice and broccoli.",
    4: "a cat sleeping on a couch",
    5: "",  # an empty caption must not break anything
}


def _coco_files(tmp_path):
    ann = {
        "info": {}, "licenses": [], "type": "captions",
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in REFS],
        "annotations": [
            {"id": 10 * i + j, "image_id": i, "caption": c} for i, caps in REFS.items() for j, c in enumerate(caps)
        ],
    }
    res = [{"image_id": i, "caption": c} for i, c in PREDS.items()]
    a, r = tmp_path / "ann.json", tmp_path / "res.json"
    a.write_text(json.dumps(ann))
    r.write_text(json.dumps(res))
    return a, r


@pytest.mark.skipif(not cm.java_available(), reason="needs Java (pycocoevalcap PTBTokenizer, METEOR)")
def test_equal_to_cocoevalcap(tmp_path, monkeypatch):
    from pycocotools.coco import COCO
    import pycocoevalcap.eval as pe

    class NoSpice:  # COCOEvalCap builds Spice() first, which downloads CoreNLP: remove it
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(pe, "Spice", NoSpice)
    a, r = _coco_files(tmp_path)
    coco = COCO(str(a))
    official = pe.COCOEvalCap(coco, coco.loadRes(str(r)))
    official.params["image_id"] = list(REFS)
    official.evaluate()

    ours = cm.score_captions(REFS, PREDS, tokenizer="ptb")
    assert ours.tokenizer == "ptb"
    for m in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert ours.metrics[m] == official.eval[m], m
        for i in REFS:  # per-item scores too (the ones COCOEvalCap exposes)
            assert ours.per_item[i][m] == official.imgToEval[i][m], (m, i)
    assert "SPICE" in ours.skipped and "SPICE" not in ours.metrics

    # the bootstrap spec reproduces the corpus numbers from per-item statistics
    rows = [{"scores": ours.per_item[i], "stats": {"bleu": ours.bleu_stats[i]}} for i in REFS]
    point = cm.caption_stat_spec(rows).point()
    for m in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert point[m] == pytest.approx(ours.metrics[m], rel=1e-12, abs=1e-15), m
    assert point["METEOR"] == pytest.approx(np.mean([ours.per_item[i]["METEOR"] for i in REFS]))
    # ... and the runner's rows carry METEOR's corpus/segment-mean ratio, so its intervals and
    # paired tests are centred on the corpus METEOR that metrics.json reports (not the segment mean)
    from mmlm.evaluation.benchmarks import CAPTION_FORMAT, Benchmark, Item
    from mmlm.evaluation.bootstrap import bootstrap_ci
    from mmlm.evaluation.scoring import score, stat_spec

    items = [Item(id=str(i), image=None, prompt=None, references=tuple(REFS[i])) for i in REFS]
    bench = Benchmark("coco", "caption", "caption", items, CAPTION_FORMAT)
    result = score(bench, {str(i): PREDS[i] for i in REFS}, tokenizer="ptb", skip_metrics=["SPICE"])
    assert result.metrics["METEOR"] == official.eval["METEOR"]
    assert result.metrics["METEOR"] != pytest.approx(point["METEOR"])  # the segment mean differs
    for spec in (result.spec, stat_spec("caption", json.loads(json.dumps(result.rows)))):
        assert spec.point()["METEOR"] == pytest.approx(official.eval["METEOR"], rel=1e-12)
    lo, hi = bootstrap_ci(result.spec, 200, seed=0)["METEOR"]
    assert lo <= official.eval["METEOR"] <= hi
    # --compare against a run written before rows carried the ratio: derived from its metrics.json
    from mmlm.evaluation.scoring import compare_runs

    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"scoring": "caption", "METEOR": official.eval["METEOR"]}))
    (old / "per_item.jsonl").write_text("".join(
        json.dumps({**r, "stats": {"bleu": r["stats"]["bleu"]}}) + "\n" for r in result.rows))
    same = compare_runs(result.rows, "caption", old, n_resamples=50)["metrics"]["METEOR"]
    assert same["a"] == pytest.approx(official.eval["METEOR"]) and same["delta"] == pytest.approx(0, abs=1e-12)

    # the pure-Python tokenizer agrees with the Java PTBTokenizer on these captions
    java = cm.tokenize({i: REFS[i] + [PREDS[i]] for i in REFS}, "ptb")
    assert {i: [cm.python_ptb_tokenize(c) for c in REFS[i] + [PREDS[i]]] for i in REFS} == java


def test_without_java_falls_back_and_says_so(monkeypatch):
    monkeypatch.setattr(cm, "java_available", lambda: False)
    res = cm.score_captions(REFS, PREDS)  # tokenizer="auto"
    assert res.tokenizer == "python"
    assert any("Java" in n for n in res.notices)
    assert "Java" in res.skipped["METEOR"] and "METEOR" not in res.metrics
    assert "SPICE" in res.skipped
    assert set(res.metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert 0 < res.metrics["CIDEr"] < 10 and 0 < res.metrics["Bleu_4"] < 1
    with pytest.raises(RuntimeError, match="Java"):
        cm.score_captions(REFS, PREDS, tokenizer="ptb")


def test_python_tokenizer_matches_ptb_conventions():
    assert cm.python_ptb_tokenize("A dog's toy (red), isn't it?") == "a dog 's toy -lrb- red -rrb- is n't it"
    assert cm.python_ptb_tokenize("Two \"dogs\" play--fetch... in 1.5 hours; 1,000 times!") == \
        "two dogs play fetch in 1.5 hours 1,000 times"
    assert cm.python_ptb_tokenize("Dr. Who at St. Louis costs $5.") == "dr. who at st. louis costs $ 5"
    assert cm.python_ptb_tokenize("line\nbreak") == "line break"


# pycocoevalcap's PTBTokenizer (Java) output for each caption, recorded once; the test needs no Java
JAVA_PTB = {
    "a man's.": "a man 's",
    "its owner's.": "its owner 's",
    "An old red bus driving down the street, near St. Paul's.": "an old red bus driving down the street near st. paul 's",
    "James's.": "james 's",
    "It's a cat's.": "it 's a cat 's",
    "a cat's'.": "a cat 's",
    "the player's-jersey": "the player 's jersey",
    "a man's!": "a man 's",
    "a man's...": "a man 's",
    "The dog's bed.": "the dog 's bed",
    "the dogs'.": "the dogs",
    "a 'sup sign.": "a sup sign",
    "don't.": "do n't",
    "we'll see.": "we 'll see",
    "rock 'n' roll": "rock 'n' roll",
}


@pytest.mark.parametrize("caption", list(JAVA_PTB))
def test_python_tokenizer_keeps_clitics_before_punctuation_like_java(caption):
    assert cm.python_ptb_tokenize(caption) == JAVA_PTB[caption]


@pytest.mark.skipif(not cm.java_available(), reason="needs Java (pycocoevalcap PTBTokenizer)")
def test_recorded_java_outputs_are_still_javas():
    captions = list(JAVA_PTB)
    assert cm.tokenize({0: captions}, "ptb")[0] == [JAVA_PTB[c] for c in captions]


def test_bleu_from_totals_and_groups():
    res = cm.score_captions(REFS, PREDS, tokenizer="python", skip=["METEOR"],
                            groups={i: {"perDomain": "a" if i < 3 else "b"} for i in REFS})
    totals = np.sum([res.bleu_stats[i] for i in REFS], axis=0)
    assert np.allclose(cm.bleu_from_totals(totals)[0], [res.metrics[f"Bleu_{n}"] for n in range(1, 5)], rtol=1e-12)
    assert set(res.per_group["perDomain"]) == {"a", "b"}
    # a subset scored alone is its own corpus (CIDEr document frequencies of the subset)
    alone = cm.score_captions({i: REFS[i] for i in (1, 2)}, PREDS, tokenizer="python", skip=["METEOR"])
    assert res.per_group["perDomain"]["a"]["CIDEr"] == pytest.approx(alone.metrics["CIDEr"])
    assert res.per_group["perDomain"]["a"]["Bleu_4"] == pytest.approx(alone.metrics["Bleu_4"])
    with pytest.raises(ValueError, match="no prediction"):
        cm.score_captions(REFS, {1: "x"}, tokenizer="python")


@pytest.mark.skipif(not cm.java_available(), reason="needs Java (METEOR)")
def test_breakdowns_have_meteor_when_the_overall_has_it():
    """nocaps perDomain had every metric but METEOR; each subset is its own corpus, as for the other metrics."""
    groups = {i: {"perDomain": "in-domain" if i < 3 else "out-domain"} for i in REFS}
    res = cm.score_captions(REFS, PREDS, tokenizer="python", skip=["SPICE"], groups=groups)
    assert "METEOR" in res.metrics
    domains = res.per_group["perDomain"]
    alone = cm.score_captions({i: REFS[i] for i in (1, 2)}, PREDS, tokenizer="python", skip=["SPICE"])  # a JVM each
    assert domains["in-domain"]["METEOR"] == pytest.approx(alone.metrics["METEOR"], abs=1e-12)
    assert domains["in-domain"]["CIDEr"] == pytest.approx(alone.metrics["CIDEr"])
    assert 0 < domains["out-domain"]["METEOR"] < 1 and domains["out-domain"]["METEOR"] != res.metrics["METEOR"]
    assert all(list(s) == [m for m in cm.CAPTION_METRICS if m in s] for s in domains.values())  # the official order
    # skipped overall, skipped per domain
    res = cm.score_captions(REFS, PREDS, tokenizer="python", skip=["METEOR", "SPICE"], groups=groups)
    assert all("METEOR" not in s for s in res.per_group["perDomain"].values())
