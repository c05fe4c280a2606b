"""The parallel build loop shared by the shard builders in ``data_pipelines``.

Contract of :func:`run_jobs`:

* Work is a stream of :class:`Job` s (a key or keys plus a small picklable payload) turned into
  :class:`~mmlm.data.schema.Record` s by a module-level function in ``--workers`` processes
  (ordered, with a bounded number of jobs in flight, so memory stays bounded: :func:`parallel_map`),
  then written by one :class:`~mmlm.data.writer.ShardWriter` (``--shard-size`` samples per shard,
  atomic renames).
* Resume: keys already present in complete shards of ``--out`` are not redone, leftover temporary
  shards are removed and new shards are numbered after the existing ones, so re-running over a
  half-done output neither duplicates nor loses samples.
* Manifest: what the output is built from (:func:`build_manifest`: the builder, its inputs'
  resolved paths and file sizes, the options that change the samples) is written atomically to
  ``OUT/PREFIX.manifest.json`` before any shard. Resuming over shards whose manifest differs is a
  :class:`~data_pipelines._errors.BuildError` naming what differs (keys such as line numbers
  would match samples of another input and silently drop new ones): use another ``--out``, or
  ``--overwrite``, which deletes the existing ``PREFIX-NNNNNN.tar`` shards and builds afresh.
  Shards without a manifest (built by an older version) are resumed as before.
* Empty input: no job at all is a :class:`~data_pipelines._errors.BuildError`, raised before
  anything is created or deleted.
* Skips: an input that cannot become a valid sample (missing or undecodable image, schema error)
  is skipped with a reason (:class:`Skip`, or :class:`~data_pipelines._errors.SkipSample` raised
  by the job function); counts per reason are printed at the end (:class:`BuildStats`) and every
  skip is listed in ``OUT/skipped.jsonl`` (``{"key", "reason", "detail"}``). Past
  ``--max-skip-fraction`` (checked from 100 inputs on, and at the end) the run stops with a
  :class:`~data_pipelines._errors.BuildError`; a run that writes nothing while skipping is an error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

from mmlm.data.schema import Record, SchemaError, check_record
from mmlm.data.writer import ResumeState, ShardWriter, resume_state

from ._errors import BuildError, SkipSample
from ._progress import progress

__all__ = ["Skip", "Job", "BuildStats", "parallel_map", "run_job", "build_manifest", "manifest_path", "run_jobs"]


@dataclass
class Skip:
    """A skipped input, as returned by a job function."""

    key: str
    reason: str
    detail: str = ""


@dataclass
class Job:
    """One unit of work: the output keys it will produce and a picklable payload."""

    keys: tuple[str, ...]
    payload: Any


# ----------------------------------------------------------------------------- parallel execution


def _run_batch(fn: Callable[[Any], Any], batch: list) -> list:
    return [fn(x) for x in batch]


def _default_sigterm() -> None:
    """A pool worker ends on SIGTERM (the pool's own terminate()), whatever handler the builder set."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def parallel_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, *, chunk: int = 16, ahead: int = 4
) -> Iterator[Any]:
    """``map(fn, items)`` over ``workers`` processes, in order, with at most
    ``workers * ahead`` chunks of ``chunk`` items in flight (bounded memory).
    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one)."""
    if workers <= 1:
        for x in items:
            yield fn(x)
        return
    it = iter(items)
    pending: deque = deque()
    with mp.get_context().Pool(workers, initializer=_default_sigterm) as pool:

        def submit() -> bool:
            batch = list(islice(it, chunk))
            if batch:
                pending.append(pool.apply_async(_run_batch, (fn, batch)))
            return bool(batch)

        for _ in range(workers * ahead):
            if not submit():
                break
        while pending:
            results = pending.popleft().get()
            submit()
            yield from results


# ----------------------------------------------------------------------------- the manifest


def build_manifest(
    builder: str, args: argparse.Namespace, inputs: Sequence[str], options: Sequence[str]
) -> dict[str, Any]:
    """What an output is built from: ``{"builder", "inputs": {"--flag": {"path", "size"} | None},
    "options": {"--flag": value}}`` for the ``args`` attributes named in ``inputs`` (files and
    directories: resolved path, plus the size of a file) and ``options`` (plain values)."""

    def describe(p: Any) -> dict[str, Any] | None:
        if p is None:
            return None
        p = Path(p).resolve()
        return {"path": str(p), "size": p.stat().st_size} if p.is_file() else {"path": str(p)}

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    return {
        "builder": builder,
        "inputs": {flag(n): describe(getattr(args, n)) for n in inputs},
        "options": {flag(n): getattr(args, n) for n in options},
    }


def manifest_path(out: Path, prefix: str) -> Path:
    return Path(out) / f"{prefix}.manifest.json"


def _described(v: Any) -> str:
    if v is None:
        return "not given"
    if isinstance(v, dict) and "path" in v:
        return v["path"] + (f" ({v['size']} bytes)" if "size" in v else "")
    return json.dumps(v, ensure_ascii=False)


def _manifest_difference(old: Any, new: dict[str, Any]) -> str | None:
    """``None`` when ``old`` (as read from disk) equals ``new``, else what differs, in a few words."""
    new = json.loads(json.dumps(new))  # tuples -> lists, as read back
    if old == new:
        return None
    if not isinstance(old, dict):
        return "its manifest is not a JSON object"
    if old.get("builder") != new["builder"]:
        return f"built by {old.get('builder')}, now {new['builder']}"
    for part in ("inputs", "options"):
        was_all = old.get(part) if isinstance(old.get(part), dict) else {}
        for name, now in new[part].items():
            was = was_all.get(name, "<unrecorded>")
            if was != now:
                return f"{name} was {_described(was)}, now {_described(now)}"
    return "its manifest records other inputs or options"


def _check_manifest(out: Path, prefix: str, manifest: dict[str, Any], state: ResumeState) -> bool:
    """Raise :class:`BuildError` if ``out`` holds shards built from something else; return
    whether the manifest must be (re)written."""
    path = manifest_path(out, prefix)
    if not path.is_file():
        return True  # a new output, or one built before manifests existed: resumed as before
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = None
    diff = _manifest_difference(old, manifest)
    if diff is None:
        return False
    if not state.shards:  # nothing to resume: the manifest of an earlier run that wrote no shard
        return True
    raise BuildError(
        f"--out {out} holds shards built from other input ({diff}); "
        "use another --out, or --overwrite to delete them and build afresh"
    )


def _write_manifest(out: Path, prefix: str, manifest: dict[str, Any]) -> None:
    path = manifest_path(out, prefix)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the build loop


@dataclass
class BuildStats:
    """What a build did; printed by :meth:`summary`."""

    written: int = 0
    already_present: int = 0
    unanswered: int = 0  # questions written without answers (a test split's): not trainable, not scorable
    skipped: Counter = field(default_factory=Counter)
    shards: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    resumed: ResumeState | None = None

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self, out: Path) -> str:
        lines = [
            f"wrote {self.written} samples in {len(self.shards)} new shards to {out} ({self.seconds:.1f}s)",
        ]
        if self.already_present:
            lines.append(f"resumed: {self.already_present} samples were already present")
        if self.resumed is not None and self.resumed.removed_tmp:
            lines.append(f"removed {len(self.resumed.removed_tmp)} unfinished temporary shard(s)")
        if self.unanswered:
            lines.append(f"note: {self.unanswered} question(s) have no answers (kept, as a test split's): training "
                         "skips them (no_answer) and eval cannot score them")
        if self.skipped:
            lines.append(f"skipped {self.n_skipped} (see {out / 'skipped.jsonl'}):")
            lines.extend(f"  {n:8d}  {reason}" for reason, n in self.skipped.most_common())
        return "\n".join(lines)


def _validated(rec: Record) -> Record | Skip:
    try:
        check_record(rec)
    except SchemaError as e:
        return Skip(rec.key, "schema error", e.reason)
    return rec


def run_job(fn: Callable[[Any], list], job: Job) -> list[Record | Skip]:
    """Run ``fn(payload)`` turning :class:`SkipSample` into :class:`Skip` s for all the job's keys."""
    try:
        out = fn(job.payload)
    except SkipSample as e:
        return [Skip(k, e.reason, e.detail) for k in job.keys]
    except SchemaError as e:
        return [Skip(k, "schema error", e.reason) for k in job.keys]
    return [r if isinstance(r, Skip) else _validated(r) for r in out]


class _JobRunner:
    """Picklable wrapper: ``_JobRunner(fn)(job)`` == ``run_job(fn, job)``."""

    def __init__(self, fn: Callable[[Any], list]):
        self.fn = fn

    def __call__(self, job: Job) -> list:
        return run_job(self.fn, job)


def run_jobs(
    args: argparse.Namespace,
    jobs: Iterable[Job],
    fn: Callable[[Any], list],
    *,
    total: int | None = None,
    desc: str = "build",
    out: Path | None = None,
    manifest: dict[str, Any] | None = None,
) -> BuildStats:
    """The shared build loop (see the module docstring). ``fn(payload) -> list[Record | Skip]``
    runs in the workers; it may raise :class:`SkipSample` to skip the whole job. ``manifest``
    (:func:`build_manifest`) is checked against and recorded in ``out``; ``args.overwrite``
    (when present and true) deletes the shards already there instead of resuming them."""
    out = Path(out or args.out)
    t0 = time.perf_counter()
    jobs = iter(jobs)
    first = next(jobs, None)  # before anything is created, deleted or checked
    if first is None:
        raise BuildError(f"{desc}: the input holds no samples; nothing to build")
    jobs = chain([first], jobs)
    overwrite = bool(getattr(args, "overwrite", False))
    state = resume_state(out, args.prefix, read_keys=not overwrite)
    if overwrite:
        for p in state.shards:  # only PREFIX-NNNNNN.tar: nothing else in --out is touched
            p.unlink()
        state = ResumeState(removed_tmp=state.removed_tmp)
    if state.broken:
        names = ", ".join(p.name for p in state.broken)
        raise BuildError(f"unreadable shard(s) in {out}: {names}; delete them and re-run to redo their samples")
    write_manifest = manifest is not None and _check_manifest(out, args.prefix, manifest, state)
    stats = BuildStats(resumed=state)
    skips_path = out / "skipped.jsonl"
    skips_tmp = out / ".skipped.jsonl.tmp"
    seen: set[str] = set()
    bar = progress(total, desc, disable=args.no_progress)

    def todo() -> Iterator[Job]:  # runs in this process, feeding the workers
        for job in jobs:
            fresh = tuple(k for k in job.keys if k not in state.keys)
            if len(fresh) < len(job.keys):
                stats.already_present += len(job.keys) - len(fresh)
                bar.update(len(job.keys) - len(fresh))
            if fresh:
                yield Job(fresh, job.payload)

    processed = 0
    out.mkdir(parents=True, exist_ok=True)
    if write_manifest:
        _write_manifest(out, args.prefix, manifest)
    skips = open(skips_tmp, "w", encoding="utf-8")
    try:
        with ShardWriter(
            out, args.prefix, max_count=args.shard_size, max_size=args.max_shard_bytes, start_index=state.next_index
        ) as writer:
            for results in parallel_map(_JobRunner(fn), todo(), args.workers):
                for r in results:
                    if r.key in state.keys:  # a job may return records for keys done earlier
                        continue
                    processed += 1
                    bar.update(1)
                    if not isinstance(r, Skip) and r.key in seen:
                        r = Skip(r.key, "duplicate key", "the input yields this key twice")
                    if isinstance(r, Skip):
                        stats.skipped[r.reason] += 1
                        line = {"key": r.key, "reason": r.reason, "detail": r.detail}
                        skips.write(json.dumps(line, ensure_ascii=False) + "\n")
                    else:
                        seen.add(r.key)
                        writer.write(r)
                        stats.written += 1
                        stats.unanswered += r.kind() == "vqa" and not r.answers
                if processed >= 100 and stats.n_skipped > args.max_skip_fraction * processed:
                    top = stats.skipped.most_common(1)[0][0]
                    raise BuildError(
                        f"{stats.n_skipped} of {processed} inputs skipped (most: {top!r}), over "
                        f"--max-skip-fraction {args.max_skip_fraction}; see {skips_path}"
                    )
        stats.shards = list(writer.shards)
    finally:
        bar.close()
        skips.close()
        os.replace(skips_tmp, skips_path)
    stats.seconds = time.perf_counter() - t0
    if stats.written == 0 and stats.already_present == 0 and stats.n_skipped:
        top = stats.skipped.most_common(1)[0][0]
        raise BuildError(f"all {stats.n_skipped} inputs were skipped (most: {top!r}); see {skips_path}")
    seen_all = processed + stats.already_present  # (a re-run retries the skipped inputs, not the written ones)
    if processed and stats.n_skipped > args.max_skip_fraction * seen_all:  # a small input is checked at its end
        top = stats.skipped.most_common(1)[0][0]
        raise BuildError(f"{stats.n_skipped} of {seen_all} inputs skipped (most: {top!r}), over --max-skip-fraction "
                         f"{args.max_skip_fraction}; see {skips_path} (the {stats.written} good samples are written: "
                         "fix the inputs and re-run with --overwrite, or raise --max-skip-fraction)")
    return stats
