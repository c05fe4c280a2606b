"""VQA metrics: the official VQA accuracy (answer normalization ported from ``vqaEval.py``),
GQA's exact-match accuracy and POPE's yes/no metrics.

Contract
--------
* :func:`process_punctuation`, :func:`process_digit_article` are line-for-line ports of
  ``VQAEval.processPunctuation`` / ``VQAEval.processDigitArticle`` of the official VQA
  evaluation (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, master):
  the same ``contractions`` map, ``manualMap`` (number words -> digits), ``articles``,
  ``periodStrip``/``commaStrip`` regexes and ``punct`` list, quirks included (the period regex's
  "lookbehind" is really a lookahead, ``re.UNICODE`` is passed as the ``count`` of ``sub`` so at
  most 32 periods are stripped, the punctuation test looks at the *original* text).
* :func:`vqa_accuracy` follows ``VQAEval.evaluate`` for one question: the prediction is
  whitespace-cleaned, then punctuation- and digit/article-normalized; the human answers get
  ``processPunctuation`` only when they disagree (``len(set(answers)) > 1``), as officially; the
  accuracy is the mean over the leave-one-out subsets (drop annotator *i*) of
  ``min(#matches among the others / 3, 1)``. The official code removes "the same answer dict",
  which in the real annotations (distinct ``answer_id``) is exactly leave-one-out by position;
  we do it by position.
  Items with fewer than :data:`MIN_SOFT_ANSWERS` answers (single-reference data such as GQA-style
  shards) cannot reach 1.0 under that rule, so they are scored by exact match of the normalized
  prediction against any normalized answer instead (documented deviation for non-VQA-style data).
* Two benchmarks have their own official variant of that rule (same leave-one-out, other answer
  processing; the same exact-match fallback for fewer answers):
  :func:`textvqa_accuracy` is TextVQA's evaluator (EvalAI / pythia ``TextVQAAccuracyEvaluator``, as
  LLaVA and lmms-eval score TextVQA): prediction *and* every human answer go through
  :func:`evalai_normalize` (``EvalAIAnswerProcessor``: lower-case, drop ``,`` and ``?``, ``'s`` ->
  `` 's``, then the punctuation/digit/article steps), since TextVQA's answers are raw annotator text
  ("the beatles" must match "The Beatles"); :func:`vizwiz_accuracy` is the VizWiz-VQA evaluation
  (``VQAEval`` of the VizWiz challenge): the prediction is normalized as above, the human answers
  are compared as written (no ``processPunctuation``, even when they disagree).
* :func:`gqa_accuracy` is GQA's exact match as LLaVA's published GQA numbers are scored: LLaVA's
  ``scripts/convert_gqa_for_eval.py`` turns the (stripped) reply into ``text.rstrip('.').lower()``
  and GQA's official ``eval.py`` then compares it with the gold answer as written
  (``predicted == gold``). None of the VQA normalization applies: "a laptop" does not match
  "laptop", "t shirt" does not match "t-shirt", "two" does not match "2".
* :func:`vqa_report` aggregates per-item accuracies into the official ``overall``,
  ``perQuestionType`` and ``perAnswerType`` (percent, ``round(..., 2)``, the official arithmetic).
* :func:`pope_answer` maps free text to ``"yes"``/``"no"`` exactly like POPE's ``evaluate.py``
  (first sentence, commas removed, "no"/"not"/"No" as a word -> no, anything else -> yes);
  :func:`pope_report` gives ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` as
  fractions (POPE's own scale) plus ``overall`` = accuracy in percent (the key every VQA
  benchmark's metrics.json shares).

Everything here is pure: strings in, numbers out; no I/O, no global mutable state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CONTRACTIONS",
    "MANUAL_MAP",
    "ARTICLES",
    "PUNCT",
    "PERIOD_STRIP",
    "COMMA_STRIP",
    "MIN_SOFT_ANSWERS",
    "clean_whitespace",
    "process_punctuation",
    "process_digit_article",
    "normalize_answer",
    "vqa_accuracy",
    "evalai_normalize",
    "textvqa_accuracy",
    "vizwiz_accuracy",
    "exact_match",
    "gqa_prediction",
    "gqa_accuracy",
    "vqa_report",
    "pope_answer",
    "pope_report",
]

# --------------------------------------------------------------------------- official tables

CONTRACTIONS: Mapping[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}

MANUAL_MAP: Mapping[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: tuple[str, ...] = ("a", "an", "the")

# Verbatim from vqaEval.py. "(?!<=\d)" is a (buggy) negative *lookahead* for "<=digit", so in
# effect: a period not followed by a digit is removed ("yes." -> "yes", "1.5" stays).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT: tuple[str, ...] = (
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): the flag lands in `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

MIN_SOFT_ANSWERS = 4
"""Items with at least this many human answers use the official soft accuracy; fewer -> exact match."""


# --------------------------------------------------------------------------- normalization


def clean_whitespace(text: str) -> str:
    """``answer.replace('\\n', ' ').replace('\\t', ' ').strip()`` as in ``VQAEval.evaluate``."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(in_text: str) -> str:
    """Port of ``VQAEval.processPunctuation``.

    Each punctuation mark is deleted when it touches a space in the *original* text (or the text
    contains a digit,digit group), else replaced by a space; then periods not followed by a digit
    are removed (at most 32, as officially).
    """
    out_text = in_text
    has_digit_comma = re.search(COMMA_STRIP, in_text) is not None
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or has_digit_comma:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return PERIOD_STRIP.sub("", out_text, count=_PERIOD_STRIP_COUNT)


def process_digit_article(in_text: str) -> str:
    """Port of ``VQAEval.processDigitArticle``: lower-case, number words -> digits, drop
    articles, expand apostrophe-less contractions (``dont`` -> ``don't``)."""
    out: list[str] = []
    for word in in_text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            out.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in out)


def normalize_answer(text: str) -> str:
    """The full normalization the official evaluation applies to a *prediction*:
    whitespace cleaning, :func:`process_punctuation`, :func:`process_digit_article`."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


# --------------------------------------------------------------------------- per-item scores


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers (0..1).

    With >= :data:`MIN_SOFT_ANSWERS` answers: leave-one-out average of ``min(matches/3, 1)``
    (e.g. 2 of 10 humans agree -> 8 subsets see 2 matches (2/3), 2 see 1 match (1/3) -> 0.6).
    With fewer answers: :func:`exact_match`. No answers -> ``ValueError``.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(answers) < MIN_SOFT_ANSWERS:
        return exact_match(prediction, answers)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    return _leave_one_out(normalize_answer(prediction), gts)


def _leave_one_out(res: str, gts: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets (drop answer *i*) of ``min(#matches / 3, 1)``."""
    matches = [a == res for a in gts]
    total = sum(matches)
    accs = [min(1.0, float(total - m) / 3) for m in matches]
    return float(sum(accs)) / len(accs)


def evalai_normalize(text: str) -> str:
    """Port of ``EvalAIAnswerProcessor.__call__`` (TextVQA's evaluator): lower-case, remove ``,``
    and ``?``, ``'s`` -> `` 's``, strip; then :func:`normalize_answer`'s steps. (Its comma regex
    differs from :data:`COMMA_STRIP`, but no comma is left by then, so neither ever matches.)"""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_answer(text)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA's official accuracy (0..1): :func:`evalai_normalize` on the prediction and on
    every human answer, then the leave-one-out average of ``min(matches/3, 1)``. Fewer than
    :data:`MIN_SOFT_ANSWERS` answers: exact match after that normalization."""
    if not answers:
        raise ValueError("textvqa_accuracy needs at least one reference answer")
    res = evalai_normalize(prediction)
    gts = [evalai_normalize(a) for a in answers]
    if len(gts) < MIN_SOFT_ANSWERS:
        return 1.0 if res in gts else 0.0
    return _leave_one_out(res, gts)


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz-VQA's official accuracy (0..1): the prediction normalized as in
    :func:`vqa_accuracy`, the human answers compared as written (the VizWiz evaluation never
    processes them), leave-one-out average of ``min(matches/3, 1)``. Fewer than
    :data:`MIN_SOFT_ANSWERS` answers: :func:`exact_match`."""
    if not answers:
        raise ValueError("vizwiz_accuracy needs at least one reference answer")
    if len(answers) < MIN_SOFT_ANSWERS:
        return exact_match(prediction, answers)
    return _leave_one_out(normalize_answer(prediction), list(answers))


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 when the normalized prediction equals any normalized answer, else 0.0 (the VQA rules'
    fallback for items with few answers; GQA has its own rule, :func:`gqa_accuracy`)."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    pred = normalize_answer(prediction)
    return 1.0 if any(normalize_answer(a) == pred for a in refs) else 0.0


def gqa_prediction(prediction: str) -> str:
    """A reply as LLaVA submits it to GQA: stripped, trailing periods removed
    (``rstrip('.')``, as ``convert_gqa_for_eval.py``), lower-cased."""
    return prediction.strip().rstrip(".").lower()


def gqa_accuracy(prediction: str, answers: Sequence[str] | str) -> float:
    """GQA's accuracy of one reply (0 or 1): :func:`gqa_prediction` equals the gold answer as
    written (GQA's ``eval.py``: ``predicted == gold``); ``answers`` holds the gold answer."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("gqa_accuracy needs the gold answer")
    pred = gqa_prediction(prediction)
    return 1.0 if any(a == pred for a in refs) else 0.0


# --------------------------------------------------------------------------- aggregation


def _pct(values: Sequence[float], ndigits: int) -> float:
    return round(100 * float(sum(values)) / len(values), ndigits)


def vqa_report(
    accuracies: Sequence[float],
    groups: Sequence[Mapping[str, Any]] | None = None,
    ndigits: int = 2,
) -> dict[str, Any]:
    """Official-style aggregate: ``{"overall": pct, "<group key>": {value: pct}}``.

    ``accuracies`` are per-item 0..1 scores; ``groups[i]`` maps breakdown names (e.g.
    ``"perQuestionType"``, ``"perAnswerType"``) to the item's value; ``None`` values are left out
    of that breakdown. Percentages use the official ``round(100*sum/len, 2)``.
    """
    if not accuracies:
        raise ValueError("no items to aggregate")
    out: dict[str, Any] = {"overall": _pct(accuracies, ndigits)}
    if groups is None:
        return out
    buckets: dict[str, dict[str, list[float]]] = {}
    for acc, g in zip(accuracies, groups):
        for name, value in g.items():
            if value is None:
                continue
            buckets.setdefault(name, {}).setdefault(str(value), []).append(acc)
    for name, by_value in buckets.items():
        out[name] = {v: _pct(accs, ndigits) for v, accs in by_value.items()}
    return out


def pope_answer(text: str) -> str:
    """POPE's ``evaluate.py`` mapping of a free-text answer to ``"yes"`` / ``"no"``."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def pope_report(predictions: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """POPE metrics from yes/no predictions and labels (positive class = ``"yes"``).

    Returns ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (fractions, as POPE
    prints them; a 0/0 ratio is 0.0) and ``overall`` (accuracy in percent, 2 decimals) plus the
    confusion counts ``TP``, ``FP``, ``TN``, ``FN``.
    """
    tp = fp = tn = fn = 0
    for p, lab in zip(predictions, labels):
        pos, gold = p == "yes", lab == "yes"
        if pos and gold:
            tp += 1
        elif pos:
            fp += 1
        elif gold:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    if n == 0:
        raise ValueError("no items to aggregate")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = (tp + tn) / n
    return {
        "overall": round(100 * acc, 2),
        "accuracy": acc,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "TP": tp, "FP": fp, "TN": tn, "FN": fn,
    }
