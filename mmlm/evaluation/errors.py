"""The one exception type of :mod:`mmlm.evaluation`'s runner, prediction and scoring modules.

Contract
--------
:class:`EvalError` is a ``ValueError`` carrying a message meant for the user (bad input, a stale
prediction cache, too many unreadable images, an unusable ``--compare`` target). ``mmlm eval``
prints it as ``error: ...`` and exits with status 2; anything else is a bug and propagates.
This module imports nothing from the package, so every evaluation module can depend on it
without import cycles.
"""

from __future__ import annotations

__all__ = ["EvalError"]


class EvalError(ValueError):
    """A user-facing evaluation error (bad input, stale cache, too many bad images)."""
