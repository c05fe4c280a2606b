"""The two exceptions of the shard-builder contract in ``data_pipelines``.

Contract: :class:`BuildError` is a run-level failure (a bad argument or unusable input) that a
builder's ``main`` turns into ``error: <message>`` on stderr and exit code 2
(``data_pipelines._common.cli``); :class:`SkipSample` is a per-input failure, raised while turning
one input into a sample, that the build loop (``data_pipelines._jobs``) records as a skip with its
``reason`` category and ``detail``. This module imports nothing else of the package, so every other
helper module can depend on it without import cycles.
"""

from __future__ import annotations

__all__ = ["BuildError", "SkipSample"]


class BuildError(Exception):
    """A bad argument or unusable input; ``main`` prints ``error: <message>`` and returns 2."""


class SkipSample(Exception):
    """Raised inside a job for an input that must be skipped; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
