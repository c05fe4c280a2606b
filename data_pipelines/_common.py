"""Shared machinery for the shard builders in ``data_pipelines``.

Every builder follows the same contract, implemented here once:

* ``main(argv) -> int``: argparse with ``--help``; a bad argument or unusable input prints
  ``error: <one-line reason>`` to stderr and returns 2 (:class:`BuildError`); success returns 0.
* Work is a stream of :class:`Job` s (a key or keys plus a small picklable payload) turned into
  :class:`~mmlm.data.schema.Record` s by a module-level function in ``--workers`` processes
  (ordered, with a bounded number of jobs in flight, so memory stays bounded), then written by one
  :class:`~mmlm.data.writer.ShardWriter` (``--shard-size`` samples per shard, atomic renames).
* Resume: keys already present in complete shards of ``--out`` are not redone, leftover temporary
  shards are removed and new shards are numbered after the existing ones, so re-running over a
  half-done output neither duplicates nor loses samples.
* Skips: an input that cannot become a valid sample (missing or undecodable image, schema error)
  is skipped with a reason; counts per reason are printed at the end and every skip is listed in
  ``OUT/skipped.jsonl`` (``{"key", "reason", "detail"}``). Past ``--max-skip-fraction`` (after
  100 inputs) the run stops with an error; a run that writes nothing while skipping is an error.
* Images: jpg/png/webp bytes are stored as they are (no re-encode) after PIL fully decodes them
  once to prove they are intact; other formats (gif, bmp, tiff, ...) are re-encoded to PNG;
  ``--resize-max PX`` re-encodes images whose longer side exceeds PX (EXIF orientation applied,
  JPEG/WEBP quality 95, PNG lossless, same format as the input).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from mmlm.data.schema import Record, SchemaError, check_record
from mmlm.data.writer import ResumeState, ShardWriter, resume_state

__all__ = [
    "BuildError",
    "Skip",
    "SkipSample",
    "Job",
    "BuildStats",
    "add_output_args",
    "add_image_args",
    "check_output_args",
    "cli",
    "run_jobs",
    "parallel_map",
    "load_image",
    "prepare_image_bytes",
    "decode_check",
    "iter_json_array",
    "load_json",
    "atomic_write_bytes",
    "atomic_write_json",
    "progress",
]

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PIL_DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold


class BuildError(Exception):
    """A bad argument or unusable input; ``main`` prints ``error: <message>`` and returns 2."""


class SkipSample(Exception):
    """Raised inside a job for an input that must be skipped; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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


# ----------------------------------------------------------------------------- argparse


def add_output_args(p: argparse.ArgumentParser, *, shard_size: int = 1000) -> None:
    """``--out --shard-size --max-shard-bytes --prefix --workers --no-progress --max-skip-fraction``."""
    p.add_argument("--out", required=True, type=Path, help="output directory for the tar shards (created)")
    p.add_argument("--shard-size", type=int, default=shard_size, help=f"samples per shard (default {shard_size})")
    p.add_argument(
        "--max-shard-bytes", type=int, default=1 << 30, help="start a new shard past this many bytes (default 1 GiB)"
    )
    p.add_argument("--prefix", default="shard", help="shard file name prefix: PREFIX-000000.tar (default shard)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2; 1 = in-process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-skip-fraction",
        type=float,
        default=0.5,
        help="stop with an error once more than this fraction of inputs is skipped (checked after 100; default 0.5)",
    )


def add_image_args(p: argparse.ArgumentParser) -> None:
    """``--resize-max --max-pixels``."""
    p.add_argument(
        "--resize-max",
        type=int,
        default=None,
        metavar="PX",
        help="re-encode images whose longer side exceeds PX down to PX (default: store original bytes)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=PIL_DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels than this (default {PIL_DEFAULT_MAX_PIXELS})",
    )


def check_output_args(args: argparse.Namespace) -> None:
    if args.shard_size < 1:
        raise BuildError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers < 1:
        raise BuildError(f"--workers must be >= 1, got {args.workers}")
    if not 0.0 < args.max_skip_fraction <= 1.0:
        raise BuildError(f"--max-skip-fraction must be in (0, 1], got {args.max_skip_fraction}")
    if getattr(args, "resize_max", None) is not None and args.resize_max < 1:
        raise BuildError(f"--resize-max must be >= 1, got {args.resize_max}")
    if args.out.exists() and not args.out.is_dir():
        raise BuildError(f"--out {args.out} exists and is not a directory")


def cli(
    run: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> int:
    """Parse ``argv`` and call ``run(args)``; map :class:`BuildError` and friends to exit code 2."""
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def progress(total: int | None, desc: str, disable: bool = False, unit: str = "sample"):
    """A tqdm bar on stderr (imported lazily)."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, mininterval=0.5, file=sys.stderr
    )


# ----------------------------------------------------------------------------- JSON inputs


def load_json(path: Path, what: str) -> Any:
    """``json.load`` with a one-line :class:`BuildError` for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BuildError(f"{what} {path} is not valid JSON ({e})") from None


def iter_json_array(path: Path, what: str, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Stream the items of a top-level JSON array without loading the whole file."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{what} {path} does not exist")
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            more = f.read(chunk_chars)
            if not more:
                eof = True
                return False
            buf = buf[pos:] + more
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise BuildError(f"{what} {path} is not a JSON array")
        pos += 1
        first = True
        while True:
            skip_ws()
            if pos >= len(buf):
                raise BuildError(f"{what} {path} ends inside the array")
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise BuildError(f"{what} {path}: expected ',' at character {pos} of the current chunk")
                pos += 1
                skip_ws()
            first = False
            while True:
                try:
                    item, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if not eof and fill():
                        continue
                    raise BuildError(f"{what} {path} is not valid JSON ({e.msg})") from None
                if end == len(buf) and not eof and fill():  # a scalar may continue in the next chunk
                    continue
                break
            pos = end
            yield item


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to ``.NAME.tmp`` next to ``path`` and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, indent=indent).encode("utf-8"))


# ----------------------------------------------------------------------------- images


def decode_check(data: bytes, max_pixels: int = PIL_DEFAULT_MAX_PIXELS):
    """Fully decode ``data`` with PIL; return the loaded image or raise :class:`SkipSample`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise SkipSample("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.size[0] * im.size[1] > max_pixels:
                    raise SkipSample("image too large", f"{im.size[0]}x{im.size[1]}")
                im.verify()
            im = Image.open(io.BytesIO(data))
            im.load()
            return im
    except SkipSample:
        raise
    except UnidentifiedImageError:
        raise SkipSample("not an image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise SkipSample("image too large", str(e)[:80]) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise SkipSample("undecodable image", f"{type(e).__name__}: {e}"[:120]) from None


def _encode(im, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        if im.mode not in ("RGB", "L", "CMYK"):
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=95)
    elif fmt == "WEBP":
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        im.save(buf, format="WEBP", quality=95)
    else:
        if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        im.save(buf, format="PNG")
    return buf.getvalue()


def prepare_image_bytes(
    data: bytes, *, resize_max: int | None = None, max_pixels: int = PIL_DEFAULT_MAX_PIXELS
) -> tuple[bytes, str]:
    """Check and normalise encoded image bytes; return ``(bytes, ext)``.

    jpg/png/webp under ``resize_max`` are returned unchanged; other formats become PNG; bigger
    images are downscaled (longer side = ``resize_max``) and re-encoded in their own format.
    """
    from PIL import Image, ImageOps

    im = decode_check(data, max_pixels)
    fmt = im.format or ""
    ext = FORMAT_EXT.get(fmt)
    w, h = im.size
    too_big = resize_max is not None and max(w, h) > resize_max
    if ext is not None and not too_big:
        return data, ext
    try:
        im = ImageOps.exif_transpose(im)
        if too_big:
            scale = resize_max / max(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if im.mode in ("P", "1"):
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        out_fmt = fmt if ext is not None else "PNG"
        return _encode(im, out_fmt), FORMAT_EXT[out_fmt]
    except (OSError, ValueError) as e:
        raise SkipSample("undecodable image", f"re-encode failed: {e}"[:120]) from None


def load_image(
    path: Path, *, resize_max: int | None = None, max_pixels: int = PIL_DEFAULT_MAX_PIXELS
) -> tuple[bytes, str]:
    """Read and check an image file; :class:`SkipSample` ``missing image`` / ``unreadable image`` / ..."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing image", str(path)) from None
    except OSError as e:
        raise SkipSample("unreadable image", f"{path}: {e.strerror or e}") from None
    return prepare_image_bytes(data, resize_max=resize_max, max_pixels=max_pixels)


# ----------------------------------------------------------------------------- parallel execution


def _run_batch(fn: Callable[[Any], Any], batch: list) -> list:
    return [fn(x) for x in batch]


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
    with mp.get_context().Pool(workers) as pool:

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


# ----------------------------------------------------------------------------- the build loop


@dataclass
class BuildStats:
    """What a build did; printed by :meth:`summary`."""

    written: int = 0
    already_present: int = 0
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
) -> BuildStats:
    """The shared build loop (see the module docstring). ``fn(payload) -> list[Record | Skip]``
    runs in the workers; it may raise :class:`SkipSample` to skip the whole job."""
    out = Path(out or args.out)
    t0 = time.perf_counter()
    state = resume_state(out, args.prefix)
    if state.broken:
        names = ", ".join(p.name for p in state.broken)
        raise BuildError(f"unreadable shard(s) in {out}: {names}; delete them and re-run to redo their samples")
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
    return stats
