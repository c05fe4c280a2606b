"""Caption metrics with pycocoevalcap's own scorers: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE.

Contract
--------
:func:`score_captions` returns exactly the numbers ``pycocoevalcap.eval.COCOEvalCap`` reports
(same tokenizer, same scorer classes, same inputs, names ``Bleu_1``..``Bleu_4``, ``METEOR``,
``ROUGE_L``, ``CIDEr``, ``SPICE``, fractions as pycocoevalcap reports them), but it calls the
scorers directly instead of ``COCOEvalCap.evaluate()``, because that builds the SPICE scorer
first, which downloads Stanford CoreNLP and fails offline before anything is computed.

Java and its absence
  * Tokenization: ``"ptb"`` is pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1, Java).
    ``"python"`` is :func:`python_ptb_tokenize`, a documented pure-Python approximation of it
    (lower-case; PTB-style splitting of punctuation, brackets (-> ``-lrb-`` etc., kept, as the
    Java path keeps them after lower-casing), clitics (``don't`` -> ``do n't``, ``dog's`` ->
    ``dog 's``, also before punctuation: ``man's.`` -> ``man 's``); then the same ``PUNCTUATIONS`` list is removed). ``"auto"`` uses PTB when
    ``java`` is on PATH, else the Python one, and says so in ``notices``. Numbers from the two
    tokenizers agree on ordinary captions but are not guaranteed identical: metrics.json records
    which one was used (``tokenizer``).
  * METEOR needs Java (Meteor 1.5 jar); without it METEOR is skipped and listed in ``skipped``.
  * SPICE needs Java and Stanford CoreNLP 3.6.0 in ``pycocoevalcap/spice/lib``
    (:func:`spice_available`); otherwise it is skipped with a notice. It never downloads.
  * Only those two can be skipped on request (:data:`SKIPPABLE_METRICS`, the ones that start a
    JVM); :func:`check_skip_metrics` rejects any other name, and ``mmlm eval`` calls it (and
    :func:`resolve_tokenizer`) on its arguments before any model is loaded.

Per-item statistics (for confidence intervals and paired tests, see :mod:`.bootstrap`)
  * ``Bleu_n``: per item we keep BLEU's sufficient statistics (hypothesis length, closest
    reference length, n-gram guesses and clipped matches). Corpus BLEU of any resample is
    recomputed *exactly* from their sums (:func:`bleu_from_totals`); the per-item sentence BLEU
    that pycocoevalcap also returns is stored for inspection only.
  * ``CIDEr``: per-item scores with the document frequencies of the *full* reference set held
    fixed (not recomputed per resample: that would re-run CIDEr R times; with fixed df the
    corpus score is exactly the mean of the item scores, so a resample mean is cheap and the
    interval is centred on the reported value).
  * ``ROUGE_L``, ``SPICE``: the corpus score is the mean of the item scores (exact).
  * ``METEOR``: the corpus score aggregates alignment statistics, so it is not the mean of the
    per-segment scores (on ordinary data the mean is markedly higher). Intervals and paired tests
    use the mean of the per-segment scores rescaled by ``corpus / mean`` of the full run (the
    per-item ``stats.meteor_scale``), so they are centred on the reported METEOR and a comparison
    shows each run's reported value (an approximation, noted in metrics.json).

Breakdowns (e.g. nocaps ``perDomain``): each subset is re-scored as its own corpus with BLEU,
METEOR (the same Meteor 1.5 scorer, in the same JVM as the overall score; only when the overall
METEOR is computed: Java present, not skipped), ROUGE_L, CIDEr (document frequencies of the subset,
like the official nocaps evaluation) and the SPICE mean.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bootstrap import MetricKey, StatSpec

__all__ = [
    "CAPTION_METRICS",
    "SKIPPABLE_METRICS",
    "PTB_PUNCTUATIONS",
    "BLEU_STAT_COLUMNS",
    "CaptionScores",
    "java_available",
    "spice_available",
    "python_ptb_tokenize",
    "tokenize",
    "resolve_tokenizer",
    "check_skip_metrics",
    "score_captions",
    "bleu_from_totals",
    "caption_stat_spec",
]

CAPTION_METRICS: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# the metrics a run may leave out: each starts a JVM; BLEU, ROUGE_L and CIDEr cost next to nothing
SKIPPABLE_METRICS: tuple[str, ...] = ("METEOR", "SPICE")
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS (compared after lower-casing, so the
# upper-case bracket names never match and "-lrb-" etc. survive, as in the Java path).
PTB_PUNCTUATIONS: tuple[str, ...] = (
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
)
BLEU_STAT_COLUMNS: tuple[str, ...] = (
    "testlen", "reflen", "guess_1", "guess_2", "guess_3", "guess_4",
    "correct_1", "correct_2", "correct_3", "correct_4",
)
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")


# --------------------------------------------------------------------------- environment


def java_available() -> bool:
    """True when a ``java`` executable is on PATH."""
    return shutil.which("java") is not None


def _pycocoevalcap_dir() -> str | None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return None
    paths = list(getattr(pycocoevalcap, "__path__", []))  # a namespace package: no __file__
    return os.path.abspath(paths[0]) if paths else None


def require_pycocoevalcap() -> None:
    """Raise a one-line ``ImportError`` naming the install command when pycocoevalcap is missing."""
    if _pycocoevalcap_dir() is None:
        raise ImportError("caption metrics are pycocoevalcap's official scorers, which are not installed: "
                          "pip install pycocoevalcap (or pip install -e '.[dev]')")


def spice_available() -> bool:
    """True when SPICE can run offline: Java plus Stanford CoreNLP 3.6.0 (jar and models) in
    ``pycocoevalcap/spice/lib`` (what ``get_stanford_models`` would otherwise download)."""
    root = _pycocoevalcap_dir()
    if root is None or not java_available():
        return False
    lib = os.path.join(root, "spice", "lib")
    return all(
        os.path.exists(os.path.join(lib, name))
        for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
    )


# --------------------------------------------------------------------------- tokenization

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_QUOTED_WORDS = frozenset({"'n'"})  # "rock 'n' roll": one token in PTB
# abbreviations PTBTokenizer keeps with their period (a small, caption-relevant subset)
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st mt jr sr vs etc prof inc co ltd ave blvd rd gen col capt lt sgt rev hon fig approx".split()
)
_TOKEN_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[\u2018\u2019\u201b\u2032]"), "'"),
    (re.compile(r"[\u201c\u201d\u201e\u2033\"]"), " `` "),  # double quotes -> `` / '' (both removed)
    (re.compile(r"\.\.\.|\u2026"), " ... "),
    (re.compile(r"--+|\u2014|\u2013"), " -- "),
    (re.compile(r"([()\[\]{}])"), r" \1 "),
    (re.compile(r"([!?]+)"), r" \1 "),  # runs like "?!" stay one token, as in PTB
    (re.compile(r"([;$#%])"), r" \1 "),
    (re.compile(r"(?<!\d),|,(?!\d)"), " , "),  # commas, but not inside numbers like 1,000
    (re.compile(r"(?<!\d):|:(?!\d)"), " : "),  # colons, but not inside times like 10:30
    (re.compile(r"(?<=\w)(n't)\b"), r" \1"),
    (re.compile(r"(?<=\w)('s|'re|'ve|'ll|'d|'m)\b"), r" \1"),
    (re.compile(r"\b(can)(not)\b"), r"\1 \2"),
    (re.compile(r"\b(gon|wan)(na)\b"), r"\1 \2"),
    (re.compile(r"\b(got)(ta)\b"), r"\1 \2"),
)


def _keeps_period(stem: str, last: bool) -> bool:
    """Does ``stem + "."`` stay one token? Abbreviations (``dr.``, ``u.s.``) always; single
    letters (initials) when not at the end of the line."""
    if stem in _ABBREVIATIONS or "." in stem:
        return True
    return len(stem) == 1 and stem.isalpha() and not last


def _split_token(tok: str, last: bool) -> list[str]:
    """Peel quotes/periods/hyphens off the ends of one whitespace-delimited chunk.

    A chunk that starts with a clitic the rules above split off (``man's.`` -> ``man`` + ``'s.``)
    keeps the clitic whole and splits what follows it, as PTBTokenizer does (``'s.`` -> ``'s`` ``.``,
    ``'s-jersey`` -> ``'s`` ``-`` ``jersey``), instead of peeling the clitic's quote off."""
    if tok in _BRACKETS:
        return [_BRACKETS[tok]]
    if tok in PTB_PUNCTUATIONS or tok in _CLITICS or tok in _QUOTED_WORDS:
        return [tok]
    for clitic in _CLITICS:
        if tok.startswith(clitic) and len(tok) > len(clitic) and not tok[len(clitic)].isalnum():
            return [clitic] + _split_token(tok[len(clitic):], last)
    lead: list[str] = []
    trail: list[str] = []
    while len(tok) > 1 and tok[0] in "'`-":
        lead.append(tok[0])
        tok = tok[1:]
    while len(tok) > 1 and tok[-1] in "'`-.":
        if tok[-1] == "." and _keeps_period(tok[:-1], last and not trail):
            break
        trail.insert(0, tok[-1])
        tok = tok[:-1]
    return lead + [tok] + trail


def python_ptb_tokenize(text: str) -> str:
    """Pure-Python stand-in for ``PTBTokenizer -preserveLines -lowerCase`` + punctuation removal.

    Lower-cases, splits punctuation, brackets (-> ``-lrb-`` ...), symbols (``$ # %``) and
    clitics (``don't`` -> ``do n't``, ``cannot`` -> ``can not``) like the Penn Treebank
    tokenizer, keeps the period of common abbreviations and mid-line initials, then drops the
    tokens in :data:`PTB_PUNCTUATIONS`; returns the tokens joined by single spaces.
    """
    s = _LINE_BREAKS.sub(" ", text).lower()
    for pattern, repl in _TOKEN_RULES:
        s = pattern.sub(repl, s)
    chunks = s.split()
    out: list[str] = []
    for i, chunk in enumerate(chunks):
        last = all(c in PTB_PUNCTUATIONS for c in chunks[i + 1:])
        out.extend(t for t in _split_token(chunk, last) if t not in PTB_PUNCTUATIONS)
    return " ".join(out)


def _ptb_java(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {k: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in v] for k, v in captions.items()}
    if not any(data.values()):
        return {k: [] for k in data}
    out = PTBTokenizer().tokenize(data)
    result: dict[Hashable, list[str]] = {}
    for k, v in captions.items():
        toks = list(out.get(k, []))
        if len(toks) != len(v):  # trailing empty lines can be dropped by the Java side
            toks = toks + [""] * (len(v) - len(toks))
        result[k] = toks[: len(v)]
    return result


def tokenize(captions: Mapping[Hashable, Sequence[str]], method: str) -> dict[Hashable, list[str]]:
    """Tokenize ``{key: [caption, ...]}`` with ``"ptb"`` (Java) or ``"python"``."""
    if method == "ptb":
        return _ptb_java(captions)
    if method == "python":
        return {k: [python_ptb_tokenize(c) for c in v] for k, v in captions.items()}
    raise ValueError(f"unknown tokenizer {method!r} (expected 'ptb' or 'python')")


def resolve_tokenizer(requested: str = "auto") -> tuple[str, list[str]]:
    """``"auto"|"ptb"|"python"`` -> (method, notices). ``"ptb"`` without Java raises."""
    if requested == "python":
        return "python", []
    if requested == "ptb":
        if not java_available():
            raise RuntimeError("--tokenizer ptb needs Java (no 'java' on PATH)")
        return "ptb", []
    if requested != "auto":
        raise ValueError(f"unknown tokenizer {requested!r} (expected auto, ptb or python)")
    if java_available():
        return "ptb", []
    return "python", ["Java not found: captions tokenized with the pure-Python PTB approximation "
                      "(numbers may differ slightly from the official Java PTBTokenizer)"]


def check_skip_metrics(names: Iterable[str] | str) -> tuple[str, ...]:
    """Metric names not to compute (a list, or one comma-separated string) -> their canonical
    spelling (case-insensitive, blanks dropped, no repeats).
    Raises a one-line ``ValueError`` for a name outside :data:`SKIPPABLE_METRICS`."""
    canonical = {m.lower(): m for m in SKIPPABLE_METRICS}
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    bad = [n for n in names if n.lower() not in canonical]
    if bad:
        raise ValueError(f"cannot skip {', '.join(bad)}: only {' and '.join(SKIPPABLE_METRICS)} can be skipped "
                         "(the other metrics are always computed)")
    return tuple(dict.fromkeys(canonical[n.lower()] for n in names))


# --------------------------------------------------------------------------- BLEU statistics


def bleu_from_totals(totals: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1..4 from summed :data:`BLEU_STAT_COLUMNS` (shape (R, 10)) -> (R, 4).

    Same arithmetic as ``BleuScorer.compute_score`` (tiny/small smoothing, brevity penalty).
    """
    tiny, small = 1e-15, 1e-9
    totals = np.atleast_2d(np.asarray(totals, dtype=np.float64))
    testlen, reflen = totals[:, 0], totals[:, 1]
    guess, correct = totals[:, 2:6], totals[:, 6:10]
    prec = np.cumprod((correct + tiny) / (guess + small), axis=1)
    bleus = prec ** (1.0 / np.arange(1, 5))[None, :]
    ratio = (testlen + tiny) / (reflen + small)
    with np.errstate(divide="ignore", over="ignore"):
        bp = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, 1e-300)), 1.0)
    return bleus * bp[:, None]


def _bleu(gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]]):
    """pycocoevalcap's ``Bleu(4).compute_score`` (same scorer, same options), plus the per-item
    sufficient statistics: returns (corpus [4], per-item sentence bleu [4][N], stats (N, 10))."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for k in gts:
        scorer += (res[k][0], gts[k])
    score, per_item = scorer.compute_score(option="closest", verbose=0)
    stats = np.zeros((len(scorer.ctest), 10))
    for i, comps in enumerate(scorer.ctest):
        testlen = comps["testlen"]
        reflen = min((abs(length - testlen), length) for length in comps["reflen"])[1]
        stats[i, 0], stats[i, 1] = testlen, reflen
        stats[i, 2:6] = comps["guess"]
        stats[i, 6:10] = comps["correct"]
    return list(score), per_item, stats


# --------------------------------------------------------------------------- scoring


@dataclass
class CaptionScores:
    """Result of :func:`score_captions`.

    ``metrics``: official corpus scores; ``per_item[key]``: per-item scores (sentence BLEU,
    METEOR segment score, ROUGE_L, CIDEr, SPICE F); ``bleu_stats[key]``: the 10 BLEU sufficient
    statistics; ``skipped``: metric -> reason; ``per_group``: breakdown -> value -> metrics;
    ``tokenized``: the tokenized predictions.
    """

    metrics: dict[str, float]
    per_item: dict[Hashable, dict[str, float]]
    bleu_stats: dict[Hashable, list[float]]
    tokenizer: str
    skipped: dict[str, str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    per_group: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    tokenized: dict[Hashable, str] = field(default_factory=dict)


def _subset_scores(keys: list[Hashable], gts, res, per_item, meteor: float | None = None) -> dict[str, float]:
    from pycocoevalcap.cider.cider import Cider

    sub_g = {k: gts[k] for k in keys}
    sub_r = {k: res[k] for k in keys}
    out: dict[str, float] = {}
    bleu, _, _ = _bleu(sub_g, sub_r)
    out.update({f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    if meteor is not None:
        out["METEOR"] = meteor
    out["ROUGE_L"] = float(np.mean([per_item[k]["ROUGE_L"] for k in keys]))
    out["CIDEr"] = float(Cider().compute_score(sub_g, sub_r)[0])
    if all("SPICE" in per_item[k] for k in keys):
        out["SPICE"] = float(np.nanmean([per_item[k]["SPICE"] for k in keys]))
    return out


def score_captions(
    references: Mapping[Hashable, Sequence[str]],
    predictions: Mapping[Hashable, str],
    *,
    tokenizer: str = "auto",
    skip: Iterable[str] = (),
    groups: Mapping[Hashable, Mapping[str, Any]] | None = None,
) -> CaptionScores:
    """Score ``predictions[key]`` against ``references[key]`` (every key of ``references``).

    ``tokenizer``: ``"auto"``, ``"ptb"`` (Java) or ``"python"``; ``skip``: metric names not to
    compute (:data:`SKIPPABLE_METRICS`: ``"METEOR"``, ``"SPICE"``); ``groups[key]``: ``{breakdown: value}`` for
    per-subset scores. Raises ``ValueError`` for a key without prediction or references.
    """
    require_pycocoevalcap()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(references)
    if not keys:
        raise ValueError("no items to score")
    for k in keys:
        if k not in predictions:
            raise ValueError(f"no prediction for item {k!r}")
        if not references[k]:
            raise ValueError(f"item {k!r} has no reference captions")
    skip_set = set(check_skip_metrics(skip))

    method, notices = resolve_tokenizer(tokenizer)
    refs = {k: list(references[k]) for k in keys}
    preds = {k: [predictions[k] if isinstance(predictions[k], str) else ""] for k in keys}
    if method == "ptb":
        try:
            gts, res = tokenize(refs, "ptb"), tokenize(preds, "ptb")
        except Exception as e:  # e.g. unwritable pycocoevalcap dir, broken JVM
            if tokenizer == "ptb":
                raise
            method = "python"
            notices.append(f"Java PTBTokenizer failed ({type(e).__name__}: {e}); used the pure-Python approximation")
    if method == "python":
        gts, res = tokenize(refs, "python"), tokenize(preds, "python")

    metrics: dict[str, float] = {}
    per_item: dict[Hashable, dict[str, float]] = {k: {} for k in keys}
    skipped: dict[str, str] = {}

    bleu, bleu_items, stats = _bleu(gts, res)
    for n in range(4):
        metrics[f"Bleu_{n + 1}"] = float(bleu[n])
        for k, v in zip(keys, bleu_items[n]):
            per_item[k][f"Bleu_{n + 1}"] = float(v)
    bleu_stats = {k: [float(x) for x in row] for k, row in zip(keys, stats)}

    by: dict[str, dict[str, list[Hashable]]] = {}  # breakdown -> value -> keys (e.g. nocaps perDomain)
    for k in keys:
        for name, value in ((groups or {}).get(k) or {}).items():
            if value is not None:
                by.setdefault(name, {}).setdefault(str(value), []).append(k)

    group_meteor: dict[tuple[str, str], float] = {}
    if "METEOR" in skip_set:
        skipped["METEOR"] = "skipped on request"
    elif not java_available():
        skipped["METEOR"] = "needs Java (no 'java' on PATH)"
    else:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()  # one JVM for the corpus and every subset of a breakdown
            try:
                score, scores = meteor.compute_score(gts, res)
                for name, values in by.items():  # each subset its own corpus, as its official evaluation
                    for v, ks in values.items():
                        sub = meteor.compute_score({k: gts[k] for k in ks}, {k: res[k] for k in ks})[0]
                        group_meteor[name, v] = float(sub)
            finally:
                del meteor
            metrics["METEOR"] = float(score)
            for k, v in zip(keys, scores):
                per_item[k]["METEOR"] = float(v)
        except Exception as e:
            group_meteor = {}
            skipped["METEOR"] = f"METEOR failed: {type(e).__name__}: {e}"

    score, scores = Rouge().compute_score(gts, res)
    metrics["ROUGE_L"] = float(score)
    for k, v in zip(keys, scores):
        per_item[k]["ROUGE_L"] = float(v)

    score, scores = Cider().compute_score(gts, res)
    metrics["CIDEr"] = float(score)
    for k, v in zip(keys, scores):
        per_item[k]["CIDEr"] = float(v)

    if "SPICE" in skip_set:
        skipped["SPICE"] = "skipped on request"
    elif not spice_available():
        skipped["SPICE"] = ("needs Java and Stanford CoreNLP 3.6.0 in pycocoevalcap/spice/lib "
                            "(run pycocoevalcap's get_stanford_models once with network access)")
    else:
        try:
            from pycocoevalcap.spice.spice import Spice

            score, scores = Spice().compute_score(gts, res)
            metrics["SPICE"] = float(score)
            for k, v in zip(sorted(gts), scores):  # Spice returns items in sorted-key order
                per_item[k]["SPICE"] = float(v["All"]["f"])
        except Exception as e:
            skipped["SPICE"] = f"SPICE failed: {type(e).__name__}: {e}"

    per_group: dict[str, dict[str, dict[str, float]]] = {}
    for name, values in by.items():
        per_group[name] = {v: _subset_scores(ks, gts, res, per_item, group_meteor.get((name, v)))
                           for v, ks in values.items()}

    ordered = {m: metrics[m] for m in CAPTION_METRICS if m in metrics}
    return CaptionScores(
        metrics=ordered,
        per_item=per_item,
        bleu_stats=bleu_stats,
        tokenizer=method,
        skipped=skipped,
        notices=notices,
        per_group=per_group,
        tokenized={k: res[k][0] for k in keys},
    )


# --------------------------------------------------------------------------- bootstrap spec

_MEAN_METRICS = ("METEOR", "ROUGE_L", "CIDEr", "SPICE")


def caption_stat_spec(rows: Sequence[Mapping[str, Any]]) -> StatSpec:
    """Build the :class:`StatSpec` for caption metrics from per-item rows
    ``{"scores": {metric: x}, "stats": {"bleu": [10 numbers], "meteor_scale": s}}`` (the
    per_item.jsonl rows).

    Metrics present in every row's ``scores`` are included (means; METEOR's segment scores times
    ``meteor_scale`` when the rows have it, see the module docstring); BLEU comes from the stats.
    """
    means = [m for m in _MEAN_METRICS if rows and all(m in (r.get("scores") or {}) for r in rows)]
    has_bleu = bool(rows) and all(len((r.get("stats") or {}).get("bleu", ())) == 10 for r in rows)
    columns = ["n"] + (list(BLEU_STAT_COLUMNS) if has_bleu else []) + means
    values = np.zeros((len(rows), len(columns)))
    for i, r in enumerate(rows):
        vals = [1.0]
        if has_bleu:
            vals.extend(float(x) for x in r["stats"]["bleu"])
        scale = float((r.get("stats") or {}).get("meteor_scale") or 1.0)
        vals.extend(float(r["scores"][m]) * (scale if m == "METEOR" else 1.0) for m in means)
        values[i] = vals
    off = 1 + (10 if has_bleu else 0)

    def fn(totals: np.ndarray) -> dict[MetricKey, np.ndarray]:
        out: dict[MetricKey, np.ndarray] = {}
        if has_bleu:
            b = bleu_from_totals(totals[:, 1:11])
            for n in range(4):
                out[f"Bleu_{n + 1}"] = b[:, n]
        for j, m in enumerate(means):
            out[m] = totals[:, off + j] / totals[:, 0]
        return out

    return StatSpec(tuple(columns), values, fn)
