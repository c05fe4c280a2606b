"""Shared machinery for the shard builders in ``data_pipelines``: CLI, JSON inputs and file IO.

Every builder's ``main(argv) -> int`` uses argparse with ``--help``; a bad argument or unusable
input prints ``error: <one-line reason>`` to stderr and returns 2 (:class:`BuildError`); success
returns 0 (:func:`cli`). A builder module keeps only what is its own; the shape they share is::

    def make_parser():
        p = builder_parser("from_x", __doc__)   # prog "python -m data_pipelines.from_x", the docstring as help
        p.add_argument("--x", ...)              # the builder's own inputs and options
        return with_output_and_image_args(p)    # add_output_args + add_image_args

    def run(args):
        check_output_args(args)                 # then one call per input check:
        require_file(args.x, "--x")             # "error: --x PATH does not exist" (or is a directory)
        require_dir(args.images, "--images")    # "error: --images PATH is not a directory"
        ...                                     # jobs, fn = partial(build, **image_options(args)), manifest
        return build_and_report(args, jobs, fn, total=n, manifest=manifest)

    main = builder_main(run, make_parser)

:func:`add_image_root_arg` is the ``--image-root`` (from_llava: ``--images``) of the builders whose
input names images by a path relative to a folder; :data:`IMAGE_OPTIONS` names the options of
:func:`add_image_args` that change the samples (for the manifest). ``synthetic``, which has output
options of its own, uses :func:`require_at_least_one` and :func:`require_output_dir` (checks of
:func:`check_output_args`); ``inspect`` writes nothing and has exit codes of its own (1: a bad
sample), so it takes only :func:`builder_parser`. This module also reads JSON inputs
(:func:`load_json`, :func:`iter_json_array`) and writes files atomically (:func:`atomic_write_bytes`,
:func:`atomic_write_json`).

The rest of the shared machinery lives in modules that each do one thing, and every name is
re-exported here (see ``__all__``) so ``from data_pipelines._common import X`` keeps working:

* ``data_pipelines._errors``: :class:`BuildError` and :class:`SkipSample`.
* ``data_pipelines._progress``: :func:`progress`, the tqdm bar on stderr.
* ``data_pipelines._images``: decode checks, re-encoding and loading of images
  (``FORMAT_EXT``, ``PIL_DEFAULT_MAX_PIXELS``, :func:`decode_check`, :func:`prepare_image_bytes`,
  :func:`load_image`), with the image contract in its docstring.
* ``data_pipelines._jobs``: the parallel build loop (:class:`Job`, :class:`Skip`,
  :class:`BuildStats`, :func:`parallel_map`, :func:`run_job`, :func:`run_jobs`) and the output's
  manifest (:func:`build_manifest`, :func:`manifest_path`), with the work / resume / manifest /
  skip contract in its docstring.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._errors import BuildError, SkipSample
from ._images import FORMAT_EXT, PIL_DEFAULT_MAX_PIXELS, _encode, decode_check, load_image, prepare_image_bytes
from ._jobs import (
    BuildStats,
    Job,
    Skip,
    _JobRunner,
    _run_batch,
    _validated,
    build_manifest,
    manifest_path,
    parallel_map,
    run_job,
    run_jobs,
)
from ._progress import progress

__all__ = [
    # defined here
    "builder_parser",
    "add_output_args",
    "add_image_args",
    "add_image_root_arg",
    "with_output_and_image_args",
    "IMAGE_OPTIONS",
    "image_options",
    "check_output_args",
    "require_file",
    "require_dir",
    "require_at_least_one",
    "require_output_dir",
    "build_and_report",
    "cli",
    "builder_main",
    "iter_json_array",
    "load_json",
    "atomic_write_bytes",
    "atomic_write_json",
    # re-exported from ._errors
    "BuildError",
    "SkipSample",
    # re-exported from ._progress
    "progress",
    # re-exported from ._images
    "FORMAT_EXT",
    "PIL_DEFAULT_MAX_PIXELS",
    "decode_check",
    "_encode",
    "prepare_image_bytes",
    "load_image",
    # re-exported from ._jobs
    "Skip",
    "Job",
    "BuildStats",
    "parallel_map",
    "_run_batch",
    "run_job",
    "_validated",
    "_JobRunner",
    "build_manifest",
    "manifest_path",
    "run_jobs",
]


# ----------------------------------------------------------------------------- argparse


def builder_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m data_pipelines.NAME``: its ``--help`` is the module docstring ``doc``
    up to ``Usage::``, laid out as written."""
    return argparse.ArgumentParser(
        prog=f"python -m data_pipelines.{name}",
        description=doc.split("Usage::")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_output_args(p: argparse.ArgumentParser, *, shard_size: int = 1000) -> None:
    """``--out --overwrite --shard-size --max-shard-bytes --prefix --workers --no-progress --max-skip-fraction``."""
    p.add_argument("--out", required=True, type=Path, help="output directory for the tar shards (created)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the shards (PREFIX-NNNNNN.tar) already in --out and build afresh instead of resuming "
        "them; needed when --out was built from other input or options (see PREFIX.manifest.json there)",
    )
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
        help="stop with an error once more than this fraction of inputs is skipped (checked from 100 inputs on, "
        "and at the end; default 0.5)",
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
        help=f"skip images with more pixels than this (default {PIL_DEFAULT_MAX_PIXELS}; PIL refuses twice that)",
    )


def add_image_root_arg(p: argparse.ArgumentParser, flag: str = "--image-root") -> None:
    """``--image-root`` (or ``flag``), default ``.``: the directory the input's relative image paths are read from."""
    p.add_argument(flag, type=Path, default=Path("."), help="directory image paths are relative to (default .)")


def with_output_and_image_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options every shard builder shares after its own (:func:`add_output_args`, then
    :func:`add_image_args`, in that order in ``--help``) and return ``p``."""
    add_output_args(p)
    add_image_args(p)
    return p


# the options of add_image_args that change the samples: the image loaders' keyword arguments
IMAGE_OPTIONS = ("resize_max", "max_pixels")


def image_options(args: argparse.Namespace) -> dict[str, Any]:
    """``{"resize_max": ..., "max_pixels": ...}`` from ``args`` (:func:`add_image_args`): the keyword
    arguments of :func:`load_image` and of the builders' worker functions that pass them on."""
    return {name: getattr(args, name) for name in IMAGE_OPTIONS}


# ----------------------------------------------------------------------------- checks (BuildError, one line)


def require_file(path: Path, flag: str) -> None:
    """``error: FLAG PATH does not exist`` (or ``... is a directory, not a file``) unless ``path`` is a file."""
    if Path(path).is_dir():
        raise BuildError(f"{flag} {path} is a directory, not a file")
    if not Path(path).is_file():
        raise BuildError(f"{flag} {path} does not exist")


def require_dir(path: Path, flag: str) -> None:
    """``error: FLAG PATH is not a directory`` unless ``path`` is one (missing, or a file)."""
    if not Path(path).is_dir():
        raise BuildError(f"{flag} {path} is not a directory")


def require_at_least_one(value: int, flag: str) -> None:
    """``error: FLAG must be >= 1, got VALUE`` for a count or size below 1."""
    if value < 1:
        raise BuildError(f"{flag} must be >= 1, got {value}")


def require_output_dir(path: Path, flag: str = "--out") -> None:
    """``error: --out PATH exists and is not a directory``: an output directory may not exist yet
    (it is created), but must not be a file."""
    if path.exists() and not path.is_dir():
        raise BuildError(f"{flag} {path} exists and is not a directory")


def check_output_args(args: argparse.Namespace) -> None:
    """The checks of :func:`add_output_args` (and of ``--resize-max`` where the parser has it), in the
    order a builder's ``run`` reports them, before its own."""
    require_at_least_one(args.shard_size, "--shard-size")
    require_at_least_one(args.workers, "--workers")
    require_at_least_one(args.max_shard_bytes, "--max-shard-bytes")
    if not 0.0 < args.max_skip_fraction <= 1.0:
        raise BuildError(f"--max-skip-fraction must be in (0, 1], got {args.max_skip_fraction}")
    if getattr(args, "resize_max", None) is not None:
        require_at_least_one(args.resize_max, "--resize-max")
    require_output_dir(args.out)
    if not args.prefix or "/" in args.prefix or args.prefix.startswith("."):
        raise BuildError(f"--prefix must be a file name that does not start with a dot, got {args.prefix!r}")


# ----------------------------------------------------------------------------- running a builder


def build_and_report(
    args: argparse.Namespace,
    jobs: Iterable[Job],
    fn: Callable[[Any], list],
    *,
    total: int | None,
    manifest: dict[str, Any],
) -> int:
    """The end of a builder's ``run``: :func:`run_jobs` (its progress bar named after the manifest's
    builder), then the build's summary on stdout; returns 0, the exit code of a build that finished."""
    stats = run_jobs(args, jobs, fn, total=total, desc=manifest["builder"], manifest=manifest)
    print(stats.summary(args.out))
    return 0


def cli(
    run: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> int:
    """Parse ``argv`` and call ``run(args)``; map :class:`BuildError` and ``OSError`` (a path that
    cannot be read or written) to ``error: ...`` and exit code 2, Ctrl-C to exit code 130 and SIGTERM
    (a scheduler's, ``timeout``'s) to 143, both after the same clean-up (no temporaries left)."""
    args = parser.parse_args(argv)
    previous = _on_sigterm_raise()
    try:
        return int(run(args) or 0)
    except Terminated:
        print("terminated; re-run the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except OSError as e:  # not a directory, permission denied, disk full, ...
        print(f"error: {e.strerror}: {e.filename}" if e.strerror and e.filename else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def builder_main(
    run: Callable[[argparse.Namespace], int | None], make_parser: Callable[[], argparse.ArgumentParser]
) -> Callable[[Sequence[str] | None], int]:
    """A builder's ``main(argv=None) -> int``: :func:`cli` of ``run`` over a fresh ``make_parser()``
    (``argv`` None: ``sys.argv[1:]``). Use: ``main = builder_main(run, make_parser)``."""

    def main(argv: Sequence[str] | None = None) -> int:
        return cli(run, make_parser(), argv)

    main.__module__, main.__qualname__ = run.__module__, "main"
    main.__doc__ = ("Run this builder on ``argv`` (None: ``sys.argv[1:]``); return the exit code: 0 when done, "
                    "2 on a bad argument or input, 130 on Ctrl-C, 143 on SIGTERM.")
    return main


class Terminated(KeyboardInterrupt):
    """SIGTERM in a builder: unwinds like Ctrl-C (temporary shards removed, the skip list kept)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _on_sigterm_raise():
    """Make SIGTERM raise :class:`Terminated` in this (main) thread; returns the previous handler (None
    when signals cannot be set here). Worker processes put the default back (``parallel_map``)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


# ----------------------------------------------------------------------------- JSON inputs


def load_json(path: Path, what: str) -> Any:
    """``json.load`` with a one-line :class:`BuildError` for a missing or malformed file."""
    path = Path(path)
    require_file(path, what)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BuildError(f"{what} {path} is not valid JSON ({e})") from None


def iter_json_array(path: Path, what: str, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Stream the items of a top-level JSON array without loading the whole file.

    The file is UTF-8 (a leading byte-order mark is allowed, as :func:`load_json` allows it);
    bytes that are not UTF-8 and malformed JSON are a :class:`BuildError`."""
    path = Path(path)
    require_file(path, what)
    try:
        yield from _iter_json_array(path, what, chunk_chars)
    except UnicodeDecodeError as e:
        raise BuildError(f"{what} {path} is not UTF-8 ({e.reason})") from None


# what may still continue a number that a chunk boundary cut ("1." | "5", "2e" | "-3")
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*\Z")


def _iter_json_array(path: Path, what: str, chunk_chars: int) -> Iterator[Any]:
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
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
                cut = end == len(buf) or (isinstance(item, (int, float)) and _NUMBER_TAIL.match(buf, end))
                if cut and not eof and fill():  # a scalar may continue in the next chunk
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

