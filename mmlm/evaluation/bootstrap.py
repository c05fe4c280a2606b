"""Bootstrap confidence intervals and the paired bootstrap test, over per-item statistics.

Contract
--------
Every metric we report is a function of *column sums* of a per-item statistics matrix
``values`` (N items x K columns): a mean is ``sum(score) / sum(1)``, corpus BLEU is a function of
the summed n-gram counts and lengths, POPE's precision is ``sum(tp) / (sum(tp) + sum(fp))``, a
per-question-type accuracy is ``sum(acc * [type == t]) / sum([type == t])``. A :class:`StatSpec`
holds that matrix and ``fn(totals) -> {metric key: value}`` (vectorised over rows of ``totals``).

A bootstrap resample of the items is then a vector of integer counts ``w`` (how often each item
was drawn, summing to N) and the resampled metric is ``fn(w @ values)``: no scorer is re-run,
so 1000 resamples cost a few matrix products even for 200k items (resamples are processed in
chunks of at most ``max_cells`` counts to bound memory).

* :func:`bootstrap_ci` -> percentile intervals ``{key: (lo, hi)}`` (``None`` when undefined in
  every resample, e.g. an empty group).
* :func:`paired_bootstrap` -> for two systems scored on the *same items in the same order*, the
  same resampled counts are applied to both; reports each system's value, the difference
  ``a - b``, its percentile interval and a two-sided p-value for "no difference" from the
  centred bootstrap distribution: ``p = (1 + #{|d* - d| >= |d|}) / (1 + R)`` (identical systems
  give exactly 1; a clearly better system gives ~1/(R+1)).

Metric keys are strings (``"CIDEr"``, ``"overall"``) or tuples naming a path
(``("perAnswerType", "yes/no")``); :func:`nest` turns them into JSON-ready nested dicts.
Seeded with ``numpy.random.default_rng(seed)``: same inputs, same seed -> same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

__all__ = [
    "MetricKey",
    "StatSpec",
    "resample_counts",
    "bootstrap_ci",
    "paired_bootstrap",
    "nest",
]

MetricKey = Union[str, tuple[str, ...]]
StatFn = Callable[[np.ndarray], Mapping[MetricKey, np.ndarray]]


@dataclass
class StatSpec:
    """Per-item statistics and the function that turns their (weighted) sums into metrics.

    ``values``: float array (N, K), one row per item in a fixed order; ``columns``: K names
    (documentation / debugging only); ``fn``: maps ``totals`` (R, K) to ``{key: array (R,)}``.
    """

    columns: tuple[str, ...]
    values: np.ndarray
    fn: StatFn

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def point(self) -> dict[MetricKey, float]:
        """Metrics on the full sample (every item counted once)."""
        totals = self.values.sum(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self.fn(totals)
        return {k: float(np.asarray(v)[0]) for k, v in out.items()}

    def subset(self, rows: np.ndarray) -> "StatSpec":
        """The same statistics restricted to (or reordered by) ``rows``."""
        return StatSpec(self.columns, self.values[rows], self.fn)


def resample_counts(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` bootstrap resamples of ``n`` items as a (size, n) matrix of draw counts."""
    idx = rng.integers(0, n, size=(size, n))
    idx += (np.arange(size, dtype=idx.dtype) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def _chunks(n: int, n_resamples: int, rng: np.random.Generator, max_cells: int) -> Iterator[np.ndarray]:
    per = max(1, int(max_cells) // max(1, n))
    done = 0
    while done < n_resamples:
        size = min(per, n_resamples - done)
        yield resample_counts(n, size, rng)
        done += size


def _collect(specs: list[StatSpec], n_resamples: int, seed: int, max_cells: int) -> list[dict[MetricKey, np.ndarray]]:
    """Apply the same resampled counts to every spec; returns per spec {key: (R,) values}."""
    n = specs[0].n
    for s in specs:
        if s.n != n:
            raise ValueError(f"specs disagree on the number of items ({s.n} != {n})")
    rng = np.random.default_rng(seed)
    parts: list[dict[MetricKey, list[np.ndarray]]] = [{} for _ in specs]
    for counts in _chunks(n, n_resamples, rng, max_cells):
        for spec, acc in zip(specs, parts):
            totals = counts @ spec.values
            with np.errstate(divide="ignore", invalid="ignore"):
                res = spec.fn(totals)
            for k, v in res.items():
                acc.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
    return [{k: np.concatenate(v) for k, v in acc.items()} for acc in parts]


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float] | None:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [50 * (1 - confidence), 100 - 50 * (1 - confidence)])
    return float(lo), float(hi)


def bootstrap_ci(
    spec: StatSpec,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_cells: int = 1 << 22,
) -> dict[MetricKey, tuple[float, float] | None]:
    """Percentile bootstrap intervals for every metric ``spec.fn`` produces.

    Items are resampled with replacement ``n_resamples`` times. Returns ``{}`` when
    ``n_resamples <= 0`` or there are no items.
    """
    if n_resamples <= 0 or spec.n == 0:
        return {}
    (samples,) = _collect([spec], n_resamples, seed, max_cells)
    return {k: _interval(v, confidence) for k, v in samples.items()}


def paired_bootstrap(
    spec_a: StatSpec,
    spec_b: StatSpec,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_cells: int = 1 << 22,
) -> dict[MetricKey, dict[str, Any]]:
    """Paired bootstrap test of system A vs system B on the same items (rows aligned).

    Returns ``{key: {"a", "b", "delta", "ci", "confidence", "p_value", "resamples"}}`` for keys
    both specs produce; ``delta = a - b``; ``ci`` is the percentile interval of the resampled
    differences.
    """
    if spec_a.n == 0:
        raise ValueError("paired bootstrap needs at least one common item")
    if n_resamples <= 0:
        raise ValueError("paired bootstrap needs n_resamples > 0")
    pa, pb = spec_a.point(), spec_b.point()
    sa, sb = _collect([spec_a, spec_b], n_resamples, seed, max_cells)
    out: dict[MetricKey, dict[str, Any]] = {}
    for key in pa:
        if key not in pb or key not in sa or key not in sb:
            continue
        d_obs = pa[key] - pb[key]
        d = sa[key] - sb[key]
        ok = np.isfinite(d)
        if not np.isfinite(d_obs) or not ok.any():
            continue
        d = d[ok]
        extreme = np.abs(d - d_obs) >= abs(d_obs) - 1e-12 * max(1.0, abs(d_obs))
        p = (1 + int(extreme.sum())) / (1 + d.size)
        out[key] = {
            "a": pa[key],
            "b": pb[key],
            "delta": d_obs,
            "ci": _interval(d, confidence),
            "confidence": confidence,
            "p_value": p,
            "resamples": int(d.size),
        }
    return out


def nest(flat: Mapping[MetricKey, Any]) -> dict[str, Any]:
    """``{"overall": x, ("perAnswerType", "yes/no"): y}`` -> ``{"overall": x, "perAnswerType": {"yes/no": y}}``
    (tuple keys of any length become nested paths)."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        path = k if isinstance(k, tuple) else (k,)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = v
    return out
