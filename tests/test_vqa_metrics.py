"""Official VQA answer normalization/accuracy, exact match, POPE: hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from mmlm.evaluation import vqa_metrics as vm
from mmlm.evaluation.bootstrap import StatSpec, bootstrap_ci, nest, paired_bootstrap


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("two", "2"),  # manualMap digits
        ("Two", "2"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("the dog", "dog"),  # articles
        ("A Dog.", "dog"),
        ("an apple", "apple"),
        ("yes.", "yes"),  # periodStrip: a period not followed by a digit goes
        ("1.5", "1.5"),  # ... decimals stay
        ("1,000", "1000"),  # commaStrip present -> punctuation removed, not spaced
        ("dont", "don't"),  # contractions
        ("isnt", "isn't"),
        ("hi!", "hi"),
        ("x/y", "x y"),  # punctuation not touching a space -> a space
        ("red , blue", "red blue"),  # touching a space -> removed
        ("  yes\n", "yes"),
        ("it's", "it's"),  # "'" is not in the official punct list
    ],
)
def test_normalize_answer(raw, expected):
    assert vm.normalize_answer(raw) == expected


def test_process_punctuation_is_the_official_port():
    # the test for "touching a space" looks at the original text for every mark
    assert vm.process_punctuation("a-b") == "a b"
    assert vm.process_punctuation("a - b") == "a  b"
    assert vm.process_punctuation("(ok)") == " ok "
    # digit,digit anywhere -> every punctuation mark is deleted
    assert vm.process_punctuation("1,5 (x)") == "15 x"
    # periods: only those not followed by a digit, at most 32 (re.UNICODE passed as count)
    assert vm.process_punctuation("a.b.1.5.") == "ab.1.5"  # "b." is followed by a digit
    assert vm.process_punctuation("." * 40) == "." * 8
    assert vm.process_digit_article("The Three Cats") == "3 cats"


def ten(*pairs: tuple[str, int]) -> list[str]:
    out = [a for a, n in pairs for _ in range(n)]
    assert len(out) == 10
    return out


@pytest.mark.parametrize(
    "matching, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_accuracy(matching, expected):
    # k of 10 humans agree with the prediction: (10-k) subsets see k matches, k subsets see k-1
    answers = ten(("cat", matching), ("dog", 10 - matching))
    exact = ((10 - matching) * min(1, matching / 3) + matching * min(1, (matching - 1) / 3)) / 10 if matching else 0
    assert vm.vqa_accuracy("cat", answers) == pytest.approx(expected)
    assert vm.vqa_accuracy("cat", answers) == pytest.approx(exact, abs=1e-15)


def test_accuracy_normalizes_prediction_and_disagreeing_answers():
    assert vm.vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vm.vqa_accuracy("two", ten(("2", 3), ("3", 7))) == pytest.approx(0.9)
    assert vm.vqa_accuracy("1.5", ten(("1.5", 10))) == 1.0
    assert vm.vqa_accuracy("the red car", ten(("red car", 2), ("blue", 8))) == pytest.approx(0.6)
    # disagreeing human answers get processPunctuation (but not digits/articles), as officially
    assert vm.vqa_accuracy("t shirt", ten(("t-shirt", 4), ("shirt", 6))) == 1.0
    assert vm.vqa_accuracy("T-shirt", ten(("t-shirt", 4), ("shirt", 6))) == 1.0
    # ... including the quirk that a mark not touching a space becomes a space ("yes!" -> "yes ")
    assert vm.vqa_accuracy("yes", ten(("yes!", 4), ("no", 6))) == 0.0
    assert vm.vqa_accuracy("dont know", ten(("don't know", 4), ("no", 6))) == 1.0
    # agreeing answers are left untouched: an un-normalized reference cannot be matched
    assert vm.vqa_accuracy("two", ["two"] * 10) == 0.0


def test_few_answers_use_exact_match():
    assert vm.vqa_accuracy("Red.", ["red"]) == 1.0
    assert vm.vqa_accuracy("blue", ["red", "crimson"]) == 0.0
    assert vm.exact_match("Yes", "yes") == 1.0
    assert vm.exact_match("the table", ["table"]) == 1.0
    with pytest.raises(ValueError):
        vm.vqa_accuracy("x", [])


def test_textvqa_accuracy_processes_the_answers_too():
    # TextVQA's answers are raw annotator text: EvalAI's processor runs on them as on the prediction
    assert vm.evalai_normalize("The Beatles?") == "beatles"
    assert vm.evalai_normalize("Man's Hat, 1,000") == "man 's hat 1000"
    assert vm.textvqa_accuracy("the beatles", ["the beatles"] * 10) == 1.0  # VQAv2's rule: 0.0
    assert vm.textvqa_accuracy("two", ["two"] * 10) == 1.0
    assert vm.textvqa_accuracy("Coca-Cola", ten(("coca cola", 2), ("Coca-Cola", 1), ("pepsi", 7))) == pytest.approx(0.9)
    assert vm.textvqa_accuracy("pepsi", ten(("coca cola", 3), ("pepsi", 7))) == 1.0
    assert vm.textvqa_accuracy("fanta", ten(("coca cola", 3), ("pepsi", 7))) == 0.0
    assert vm.textvqa_accuracy("The Beatles", ["beatles"]) == 1.0  # few answers: exact match
    with pytest.raises(ValueError):
        vm.textvqa_accuracy("x", [])


def test_vizwiz_accuracy_compares_the_answers_as_written():
    # VizWiz's evaluation never runs processPunctuation on the human answers
    assert vm.vizwiz_accuracy("coca-cola", ten(("coca-cola", 4), ("pepsi", 6))) == 0.0  # VQAv2's rule: 1.0
    assert vm.vizwiz_accuracy("coca cola", ten(("coca cola", 4), ("pepsi", 6))) == 1.0
    assert vm.vizwiz_accuracy("Blue.", ten(("blue", 2), ("unanswerable", 8))) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        vm.vizwiz_accuracy("x", [])


def test_vqa_report_rounds_like_the_official_code():
    accs = [1.0, 0.3, 0.6, 0.0, 1 / 3]
    groups = [
        {"perAnswerType": "yes/no", "perQuestionType": "is the"},
        {"perAnswerType": "number", "perQuestionType": "how many"},
        {"perAnswerType": "number", "perQuestionType": "how many"},
        {"perAnswerType": "other", "perQuestionType": "what"},
        {"perAnswerType": "other", "perQuestionType": None},
    ]
    rep = vm.vqa_report(accs, groups)
    assert rep["overall"] == round(100 * sum(accs) / 5, 2) == 44.67
    assert rep["perAnswerType"] == {"yes/no": 100.0, "number": 45.0, "other": 16.67}
    assert rep["perQuestionType"] == {"is the": 100.0, "how many": 45.0, "what": 0.0}


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog", "no"),
        ("No", "no"),
        ("no.", "no"),
        ("I see a cat. No dog though", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # POPE's rule: anything without no/not/No is yes
    ],
)
def test_pope_answer(text, label):
    assert vm.pope_answer(text) == label


def test_pope_report_and_its_bootstrap_spec():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    rep = vm.pope_report(preds, labels)
    assert (rep["TP"], rep["FP"], rep["TN"], rep["FN"]) == (2, 1, 2, 1)
    assert rep["accuracy"] == pytest.approx(4 / 6)
    assert rep["precision"] == pytest.approx(2 / 3)
    assert rep["recall"] == pytest.approx(2 / 3)
    assert rep["f1"] == pytest.approx(2 / 3)
    assert rep["yes_ratio"] == pytest.approx(0.5)
    assert rep["overall"] == 66.67

    from mmlm.evaluation.runner import stat_spec

    rows = [{"stats": {"pred_yes": int(p == "yes"), "label_yes": int(lab == "yes")}} for p, lab in zip(preds, labels)]
    point = stat_spec("pope", rows).point()
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert point[k] == pytest.approx(rep[k])


def _mean_spec(x: np.ndarray) -> StatSpec:
    values = np.stack([np.ones_like(x), x], axis=1)
    return StatSpec(("n", "x"), values, lambda t: {"mean": t[:, 1] / t[:, 0]})


def test_bootstrap_interval_and_paired_test():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.7).astype(float)
    b = (rng.random(300) < 0.4).astype(float)
    ci = bootstrap_ci(_mean_spec(a), n_resamples=500, seed=3)["mean"]
    assert ci[0] < a.mean() < ci[1] and ci[1] - ci[0] < 0.2
    assert bootstrap_ci(_mean_spec(a), n_resamples=500, seed=3) == bootstrap_ci(_mean_spec(a), 500, seed=3)
    same = paired_bootstrap(_mean_spec(a), _mean_spec(a.copy()), n_resamples=500)["mean"]
    assert same["p_value"] == 1.0 and same["delta"] == 0.0
    better = paired_bootstrap(_mean_spec(a), _mean_spec(b), n_resamples=500)["mean"]
    assert better["delta"] > 0.2 and better["p_value"] < 0.01 and better["ci"][0] > 0
    assert nest({"overall": 1, ("perAnswerType", "yes/no"): 2}) == {"overall": 1, "perAnswerType": {"yes/no": 2}}
