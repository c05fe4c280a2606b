"""Bad samples: what they are, how they are counted, and when a run stops.

Contract:

* A sample that cannot become a training sample is a :class:`BadSample` (``key``, ``reason``,
  ``detail``). ``reason`` is one of :data:`REASONS`, a short snake_case category; counts are kept
  per reason. Exceptions of other layers are mapped to reasons by :func:`classify`
  (``SchemaError`` -> ``schema_error`` or ``empty_caption``, ``SampleTooLong`` (an image span
  or every answer token past max_length) -> ``too_long``, tar/OS errors -> ``bad_shard``).
* :class:`ErrorBudget` counts good and bad samples and logs each bad one (python ``logging``,
  logger ``mmlm.data``, with the key, shard, reason and detail): the first :data:`LOG_FIRST` of
  each reason at WARNING, then (said once per reason) the rest at DEBUG. Reasons in
  :data:`FILTERED` (``no_target``: the record lacks what ``sample_mode`` asks for, e.g. a VQA
  record in a caption-only run) are deliberate filtering, not broken data: they are counted and
  logged at DEBUG level but do not count against the budget. It never sleeps
  (unlike webdataset's ``warn_and_sleep``). Past the budget -- more than ``max_bad`` bad samples,
  or a bad fraction above ``max_bad_fraction`` once at least ``min_samples`` samples were seen --
  it raises :class:`DataErrorBudgetExceeded` whose message gives the counts per reason and the
  last bad sample. :func:`budget_violation` is the same rule as a pure function (the DataModule
  applies it to the totals over all workers).
* :class:`DataErrorBudgetExceeded` takes a single message argument, so a DataLoader worker's
  exception is re-raised in the main process with the same type.

Nothing here touches global state at import.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from collections.abc import Mapping

__all__ = [
    "REASONS", "CORRUPT_IMAGE", "TRUNCATED_IMAGE", "HUGE_IMAGE", "SCHEMA_ERROR", "EMPTY_CAPTION",
    "NO_ANSWER", "NO_TARGET", "TOO_LONG", "BAD_SHARD", "ENCODE_ERROR", "FILTERED", "bad_count",
    "BadSample", "DataErrorBudgetExceeded", "ErrorBudget", "budget_violation", "classify", "LOGGER_NAME",
]

LOGGER_NAME = "mmlm.data"

CORRUPT_IMAGE = "corrupt_image"      # not decodable as an image (or not an allowed format)
TRUNCATED_IMAGE = "truncated_image"  # the image data ends early
HUGE_IMAGE = "huge_image"            # more pixels than the limit (decompression-bomb guard)
SCHEMA_ERROR = "schema_error"        # bad json, wrong field types, bad member naming, no usable field
EMPTY_CAPTION = "empty_caption"      # a caption sample whose caption is empty or whitespace
NO_ANSWER = "no_answer"              # a question without answers, or a conversation with an empty answer
NO_TARGET = "no_target"              # the record lacks what ``sample_mode`` asks for
TOO_LONG = "too_long"                # overflows max_length into an image span / no answer token left
BAD_SHARD = "bad_shard"              # an unreadable or truncated tar shard (the rest of it is skipped)
ENCODE_ERROR = "encode_error"        # the processor refused the sample (e.g. placeholder/image count)

REASONS: tuple[str, ...] = (
    CORRUPT_IMAGE, TRUNCATED_IMAGE, HUGE_IMAGE, SCHEMA_ERROR, EMPTY_CAPTION, NO_ANSWER, NO_TARGET,
    TOO_LONG, BAD_SHARD, ENCODE_ERROR,
)
FILTERED: frozenset[str] = frozenset({NO_TARGET})  # counted, but not against the error budget


class BadSample(ValueError):
    """A sample that is skipped: ``key`` names it, ``reason`` (one of REASONS) counts it."""

    def __init__(self, key: str | None, reason: str, detail: str = ""):
        super().__init__(f"{key}: {reason}" + (f": {detail}" if detail else ""))
        self.key = key
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across processes despite the 3-argument constructor
        return (type(self), (self.key, self.reason, self.detail))


class DataErrorBudgetExceeded(RuntimeError):
    """Too many bad samples: the run stops (the message says how many, of which kinds, and how to
    change the budget)."""


def classify(exc: BaseException, key: str | None = None) -> BadSample:
    """Any exception raised while turning a sample into model inputs -> a :class:`BadSample`."""
    if isinstance(exc, BadSample):
        return exc
    from mmlm.data.schema import SchemaError
    from mmlm.processing import SampleTooLong

    if isinstance(exc, SchemaError):
        reason = EMPTY_CAPTION if "empty caption" in exc.reason else SCHEMA_ERROR
        return BadSample(exc.key if key is None else key, reason, exc.reason)
    if isinstance(exc, SampleTooLong):
        return BadSample(key, TOO_LONG, str(exc))
    if isinstance(exc, (tarfile.TarError, EOFError, OSError)):
        return BadSample(key, BAD_SHARD, f"{type(exc).__name__}: {exc}")
    return BadSample(key, ENCODE_ERROR, f"{type(exc).__name__}: {exc}")


def bad_count(counts: Mapping[str, int]) -> int:
    """Skips that count against the budget (all reasons but :data:`FILTERED`)."""
    return sum(v for k, v in counts.items() if k not in FILTERED)


def budget_violation(good: int, bad: int, *, max_bad_fraction: float | None, max_bad: int | None,
                     min_samples: int) -> str | None:
    """Why ``bad`` bad samples out of ``good + bad`` exceed the budget, or None when they do not."""
    seen = good + bad
    if max_bad is not None and bad > max_bad:
        return f"{bad} bad samples > max_bad={max_bad}"
    if max_bad_fraction is not None and seen >= min_samples and seen and bad / seen > max_bad_fraction:
        return f"{bad} of {seen} samples were bad ({bad / seen:.1%} > max_bad_fraction={max_bad_fraction:g})"
    return None


def format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def budget_message(why: str, counts: Mapping[str, int], last: str | None = None, where: str = "") -> str:
    msg = f"data error budget exceeded{' in ' + where if where else ''}: {why}; skipped by reason: {format_counts(counts)}"
    if last:
        msg += f"; last: {last}"
    return msg + ". Fix or filter the data, or raise max_bad_fraction / max_bad."


LOG_FIRST = 10
"""Bad samples of one reason logged at WARNING by one :class:`ErrorBudget` (a loader worker), the rest at DEBUG."""


class ErrorBudget:
    """Counts good and bad samples, logs each bad one, stops past the budget (see module doc)."""

    def __init__(self, max_bad_fraction: float | None = 0.05, max_bad: int | None = None, min_samples: int = 100,
                 *, where: str = "", logger: logging.Logger | None = None):
        if max_bad_fraction is not None and not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1] or None, got {max_bad_fraction!r}")
        if max_bad is not None and max_bad < 0:
            raise ValueError(f"max_bad must be >= 0 or None, got {max_bad!r}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples!r}")
        self.max_bad_fraction = max_bad_fraction
        self.max_bad = max_bad
        self.min_samples = int(min_samples)
        self.where = where
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.good = 0
        self.bad = 0
        self.filtered = 0
        self.counts: Counter = Counter()
        self.last: str | None = None

    def ok(self, n: int = 1) -> None:
        """Count ``n`` good samples (then check the fraction)."""
        self.good += n
        self.check()

    def skip(self, error: BadSample, url: str | None = None) -> None:
        """Count, log and budget-check one bad sample (filtered ones: count and log at DEBUG)."""
        self.counts[error.reason] += 1
        where = f" (shard {url})" if url else ""
        text = f"{error.key!r}{where}: {error.reason}" + (f" ({error.detail})" if error.detail else "")
        if error.reason in FILTERED:
            self.filtered += 1
            self.logger.debug("filtered sample %s", text)
            return
        self.bad += 1
        self.last = text
        n = self.counts[error.reason]
        if n <= LOG_FIRST:
            self.logger.warning("skipped sample %s", text)
            if n == LOG_FIRST:
                self.logger.warning("%d samples skipped as %s%s: the next ones are logged at DEBUG level only (all "
                                    "are counted: data/skipped in the logs)", n, error.reason,
                                    f" in {self.where}" if self.where else "")
        else:
            self.logger.debug("skipped sample %s", text)
        self.check()

    def check(self) -> None:
        why = budget_violation(self.good, self.bad, max_bad_fraction=self.max_bad_fraction, max_bad=self.max_bad,
                               min_samples=self.min_samples)
        if why is not None:
            raise DataErrorBudgetExceeded(budget_message(why, self.counts, self.last, self.where))
