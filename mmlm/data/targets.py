"""What a record trains: the choice of target conversation for one :class:`~mmlm.data.schema.Record`.

Contract: pure functions of a ``Record``, the sample mode and options, and an ``rng`` (a
``random.Random`` the caller seeds per sample); they touch no global state, decode nothing and
never fall back silently. A record that cannot give what is asked raises
:class:`~mmlm.data.errors.BadSample` with its reason; a bad option raises ``ValueError``.

Sample modes (:data:`SAMPLE_MODES`, see :func:`record_to_conversation`):

* ``auto`` -- the first kind the record has, in the order of :data:`KINDS`: its conversation,
  else VQA, else its caption.
* ``caption`` / ``conversation`` / ``vqa`` -- that kind (``no_target`` when the record lacks it).
* ``mixed`` -- one of the kinds the record has, drawn with ``rng`` by relative weight
  (``mixed_weights``, default 1 each; a kind weighing 0 is never trained).

With ``question_pattern`` (a compiled regular expression), a conversation or VQA target keeps only
the question-answer turns whose question matches it (:func:`filter_turns`): a curriculum stage
can drill one kind of question. A record with no matching question is ``no_target``.

A target is a list of chat turns: a record's own ``conversations`` turns (copied, LLaVA
``from``/``value`` form), VQA as ``[user: question, newline, vqa_suffix, assistant: answer]`` (the user
text is ``mmlm.processing.vqa_prompt``'s, as in evaluation; the answer
from :func:`vqa_answer`), a caption as ``caption_conversation(caption)`` (the processor's caption
prompt). The streaming pipeline (``mmlm.data.stream``, stage ``select_target``) calls
:func:`record_to_conversation` once per sample.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

from mmlm.data.errors import EMPTY_CAPTION, NO_ANSWER, NO_TARGET, SCHEMA_ERROR, BadSample
from mmlm.data.schema import IMAGE_PLACEHOLDER, Record
from mmlm.processing import vqa_prompt

__all__ = ["SAMPLE_MODES", "KINDS", "record_to_conversation", "vqa_answer", "present_kinds",
           "check_sample_mode", "check_mixed_weights", "compile_question_pattern", "filter_turns"]

SAMPLE_MODES = ("auto", "caption", "conversation", "vqa", "mixed")
KINDS = ("conversation", "vqa", "caption")
"""The kinds of target a record can hold, in ``auto``'s order of preference."""


def check_sample_mode(mode: str) -> None:
    """``ValueError`` unless ``mode`` is one of :data:`SAMPLE_MODES`."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"sample_mode must be one of {SAMPLE_MODES}, got {mode!r}")


def check_mixed_weights(weights: dict[str, float] | None) -> None:
    """``ValueError`` unless ``weights`` (None allowed) maps kinds of :data:`KINDS` to weights >= 0
    (0: never trained; a kind not named weighs 1), not all of them 0."""
    bad = {k: w for k, w in (weights or {}).items() if k not in KINDS or not w >= 0}
    if bad:
        raise ValueError(f"mixed_weights must map {list(KINDS)} to weights >= 0, got {bad}")
    if weights and all(float(weights.get(k, 1.0)) == 0 for k in KINDS):
        raise ValueError(f"mixed_weights give every kind weight 0 ({weights}): nothing would train")


def compile_question_pattern(pattern: str | None) -> re.Pattern | None:
    """``pattern`` compiled (None stays None); ``ValueError`` naming the pattern when it is not a
    valid regular expression or is empty."""
    if pattern is None:
        return None
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"question_pattern must be a non-empty regular expression, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"question_pattern {pattern!r} is not a valid regular expression: {e}") from None


def _role_text(turn: dict) -> tuple[str, str]:
    role = turn.get("from", turn.get("role", ""))
    return {"human": "user", "gpt": "assistant"}.get(role, role), str(turn.get(_text_field(turn), ""))


def _text_field(turn: dict) -> str:
    return "value" if "value" in turn else "content"  # LLaVA from/value or chat role/content


def filter_turns(turns: list[dict], pattern: re.Pattern, key: str = "?") -> list[dict]:
    """The turns of a conversation reduced to the question-answer pairs whose question matches
    ``pattern`` (``re.search`` on the user turn's text without its ``<image>`` placeholders).

    System turns stay. A user turn counts as a question only when an assistant turn follows it.
    The images stay too: every ``<image>`` placeholder of the conversation moves to the start of
    the first kept question (``"<image>\\n"`` each, as LLaVA places one image), so the record's
    images and placeholders still pair up. Turns keep their form (``from``/``value`` or
    ``role``/``content``). No matching question: :class:`BadSample` ``no_target``.
    """
    placeholders = sum(_role_text(t)[1].count(IMAGE_PLACEHOLDER) for t in turns if _role_text(t)[0] == "user")
    strip = re.compile(re.escape(IMAGE_PLACEHOLDER) + r"\n?")
    kept: list[dict] = []
    first_question = None
    i = 0
    while i < len(turns):
        role, text = _role_text(turns[i])
        if role == "user" and i + 1 < len(turns) and _role_text(turns[i + 1])[0] == "assistant":
            question = strip.sub("", text)
            if pattern.search(question):
                if first_question is None:
                    first_question = len(kept)
                kept += [{**turns[i], _text_field(turns[i]): question}, dict(turns[i + 1])]
            i += 2
            continue
        if role == "system":
            kept.append(dict(turns[i]))
        i += 1
    if first_question is None:
        raise BadSample(key, NO_TARGET, f"no question matches question_pattern {pattern.pattern!r}")
    if placeholders:
        turn = kept[first_question]
        turn[_text_field(turn)] = f"{IMAGE_PLACEHOLDER}\n" * placeholders + turn[_text_field(turn)]
    return kept


def vqa_answer(rec: Record) -> str | None:
    """``meta["multiple_choice_answer"]`` when present, else the most common answer (ties: the
    first given), else None."""
    mc = rec.meta.get("multiple_choice_answer")
    if isinstance(mc, str) and mc.strip():
        return mc.strip()
    answers = [a.strip() for a in rec.answers if isinstance(a, str) and a.strip()]
    return Counter(answers).most_common(1)[0][0] if answers else None


def present_kinds(rec: Record) -> list[str]:
    """The kinds of :data:`KINDS` the record has (in that order), whether or not they are usable."""
    kinds = []
    if rec.conversations:
        kinds.append("conversation")
    if rec.question is not None:
        kinds.append("vqa")
    if rec.caption is not None or rec.captions:
        kinds.append("caption")
    return kinds


def _conversation_target(rec: Record) -> list[dict]:
    roles = {t.get("from") for t in rec.conversations}
    if not {"human", "gpt"} <= roles:
        raise BadSample(rec.key, SCHEMA_ERROR, "a conversation needs at least one human and one gpt turn")
    for i, t in enumerate(rec.conversations):
        if t.get("from") == "gpt" and not str(t.get("value", "")).strip():
            raise BadSample(rec.key, NO_ANSWER, f"conversations[{i}] (gpt) is empty")
    n = sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in rec.conversations)
    if n and n != len(rec.images):
        raise BadSample(rec.key, SCHEMA_ERROR, f"{n} {IMAGE_PLACEHOLDER} placeholders but {len(rec.images)} images")
    return [dict(t) for t in rec.conversations]


def _need_image(rec: Record, kind: str) -> None:
    if not rec.images:  # "describe the image" -> a caption, with no image, teaches hallucination
        raise BadSample(rec.key, SCHEMA_ERROR, f"a {kind} sample without an image")


def _vqa_target(rec: Record, suffix: str) -> list[dict]:
    if rec.question is None:
        raise BadSample(rec.key, NO_TARGET, "no question")
    if not rec.question.strip():
        raise BadSample(rec.key, SCHEMA_ERROR, "empty question")
    answer = vqa_answer(rec)
    if answer is None:
        raise BadSample(rec.key, NO_ANSWER, "a question without answers")
    _need_image(rec, "vqa")
    return [{"role": "user", "content": vqa_prompt(rec.question, suffix)}, {"role": "assistant", "content": answer}]


def _caption_target(rec: Record, rng: random.Random, caption_conversation: Callable[[str], list[dict]]) -> list[dict]:
    texts = ([rec.caption] if rec.caption is not None else []) + list(rec.captions)
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        if rec.caption is not None or rec.captions:
            raise BadSample(rec.key, EMPTY_CAPTION, "empty caption")
        raise BadSample(rec.key, NO_TARGET, "no caption")
    _need_image(rec, "caption")
    if rec.caption is not None and rec.captions and rec.caption.strip() in texts[1:]:
        texts = texts[1:]  # ``txt`` repeats one of the json ``captions``: draw each reference once
    return caption_conversation(texts[0] if len(texts) == 1 else rng.choice(texts))


def record_to_conversation(rec: Record, mode: str, rng: random.Random, *,
                           caption_conversation: Callable[[str], list[dict]], vqa_suffix: str = "",
                           mixed_weights: dict[str, float] | None = None,
                           question_pattern: re.Pattern | None = None) -> list[dict]:
    """The conversation a record trains, by ``mode``:

    * ``auto``: the conversation if the record has one, else VQA (question -> the most common
      answer or ``meta["multiple_choice_answer"]``), else the caption. The first kind *present*
      is used; if it is broken the sample is bad (no silent fall-back to another field).
    * ``caption`` / ``conversation`` / ``vqa``: that kind (``no_target`` when absent).
    * ``mixed``: one of the kinds present, chosen with ``rng`` (seeded per sample), with
      probabilities proportional to ``mixed_weights[kind]`` (default 1 each).

    Captions become ``caption_conversation(caption)`` (the processor's caption prompt; one caption
    picked with ``rng`` when the record has several); VQA questions get ``vqa_suffix`` appended.
    ``question_pattern``: conversations and VQA keep only the questions that match it
    (:func:`filter_turns`; captions are not filtered).
    Raises :class:`BadSample` (``empty_caption``, ``no_answer``, ``no_target``, ``schema_error``).
    """
    check_sample_mode(mode)
    present = present_kinds(rec)
    if mode == "auto":
        if not present:
            raise BadSample(rec.key, SCHEMA_ERROR, "no caption, captions, question or conversations")
        kind = present[0]
    elif mode == "mixed":
        if not present:
            raise BadSample(rec.key, SCHEMA_ERROR, "no caption, captions, question or conversations")
        if mixed_weights:  # a kind weighing 0 is never trained
            weights = {k: float(mixed_weights.get(k, 1.0)) for k in present}
            present = [k for k in present if weights[k] > 0]
            if not present:
                raise BadSample(rec.key, NO_TARGET, f"mixed_weights give every kind this record has ("
                                                    f"{', '.join(weights)}) weight 0")
        if len(present) == 1:
            kind = present[0]
        elif mixed_weights:
            kind = rng.choices(present, weights=[weights[k] for k in present])[0]
        else:
            kind = rng.choice(present)
    else:
        kind = mode
        if kind not in present:
            raise BadSample(rec.key, NO_TARGET, f"sample_mode={mode!r} but the record has no {mode} "
                                                f"(it has: {', '.join(present) or 'nothing usable'})")
    if kind in ("conversation", "vqa"):
        turns = _conversation_target(rec) if kind == "conversation" else _vqa_target(rec, vqa_suffix)
        return turns if question_pattern is None else filter_turns(turns, question_pattern, rec.key)
    return _caption_target(rec, rng, caption_conversation)
