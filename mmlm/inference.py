"""The library side of ``mmlm describe`` and ``mmlm chat``: finding inputs, decoding images in a
background thread, JSONL results that resume, and printing streamed text exactly.

Inputs (:func:`discover_inputs`). Each PATH is, after brace expansion (``shard-{000..009}.tar``,
``{a,b}.jpg``; a path that exists literally is never expanded):

- an image file (any extension: a file named explicitly is always tried);
- a webdataset shard (``.tar``, ``.tar.gz``, ``.tgz``): each sample's first image, with the id
  ``SHARD#KEY``; a sample without an image, or a shard that cannot be read, is an error entry;
- a folder: its images (``IMAGE_EXTENSIONS``, case-insensitive) and shards, recursively (symlinked
  subfolders too, each real folder once), sorted, hidden files and folders skipped; a folder with
  neither is an error;
- a glob (``*``, ``?``, ``[...]``; ``**`` recurses): the images, shards and folders it matches.

A path that does not exist, a glob that matches nothing and an empty folder raise
``FileNotFoundError`` before anything is loaded or written. Ids are paths as given (joined for
folder contents), so re-runs from the same directory see the same ids. The same file given
twice is described once.

Decoding (:class:`PrefetchLoader`): a producer thread reads shards, decodes images with a small
thread pool (PIL releases the GIL) and hands whole batches to the consumer through a bounded
queue, so decoding overlaps generation and memory stays bounded. Images become RGB as training
decodes them (``mmlm.api.open_image``). An image that cannot be read becomes an entry with an ``error``
and no image; the run goes on.

Results (:func:`read_done`): one JSON object per line, ``{"path"|"key", "prompt", "text"}`` or
``{"path"|"key", "prompt", "error"}``. Appending and flushing per batch means a killed run loses
at most one batch and leaves at most one truncated last line; :func:`read_done` drops that line
(and the error lines of the images a run retries), rewrites the file atomically when it dropped
anything, and returns the ``(id, prompt)`` pairs already described.
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import os
import queue
import re
import sys
import tarfile
import threading
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmlm.io import atomic_write_bytes

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = re.compile(r"[*?\[]")


# ---------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class Source:
    """One input file: an image, or a shard whose samples are images."""

    path: str
    shard: bool = False


def is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def is_image_file(path: str) -> bool:
    return os.path.splitext(path)[1][1:].lower() in IMAGE_EXTENSIONS


def _brace_expand(spec: str) -> list[str]:
    if "{" not in spec or os.path.exists(spec):
        return [spec]
    from braceexpand import braceexpand

    return list(braceexpand(spec))


def _walk(folder: str) -> list[Source]:
    found = []
    visited: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):  # symlinked subfolders are searched too
        real = os.path.realpath(root)
        if real in visited:  # each real folder once: a link back up is no endless loop
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            if is_shard(path):
                found.append(Source(path, shard=True))
            elif is_image_file(path):
                found.append(Source(path))
    return sorted(found, key=lambda s: os.path.relpath(s.path, folder).split(os.sep))


def discover_inputs(paths: Iterable[str | os.PathLike]) -> list[Source]:
    """Expand PATHs (files, folders, globs, brace patterns, shards) into sources; see the module doc."""
    out: list[Source] = []
    seen: set[str] = set()

    def add(items: Iterable[Source]) -> None:
        for s in items:
            real = os.path.realpath(s.path)
            if real not in seen:
                seen.add(real)
                out.append(s)

    for raw in paths:
        for p in _brace_expand(os.fspath(raw)):
            if os.path.isdir(p):
                found = _walk(p)
                if not found:
                    raise FileNotFoundError(f"no images or .tar shards under folder {p}")
                add(found)
            elif os.path.isfile(p):
                add([Source(p, shard=is_shard(p))])
            elif _GLOB_CHARS.search(p):
                found = []
                for m in sorted(glob.glob(p, recursive=True)):
                    if os.path.isdir(m):
                        found += _walk(m)
                    elif is_shard(m) or is_image_file(m):
                        found.append(Source(m, shard=is_shard(m)))
                if not found:
                    raise FileNotFoundError(f"no images or shards match {p}")
                add(found)
            else:
                raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def shard_sample_keys(path: str) -> list[str]:
    """The sample keys of a shard, from its member headers only (no image is read or decoded).
    A shard that cannot be read counts as one (error) entry."""
    from mmlm.data.schema import split_member

    keys: list[str] = []
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for info in tar:
                if info.isfile():
                    key = split_member(info.name)[0]
                    if not keys or keys[-1] != key:
                        keys.append(key)
    except (tarfile.TarError, OSError, EOFError):
        keys.append("")
    return keys


def entry_ids(sources: Sequence[Source]) -> list[str]:
    """The id of every entry ``iter_entries`` will yield (shards: ``SHARD#KEY``)."""
    ids = []
    for s in sources:
        if s.shard:
            ids += [f"{s.path}#{k}" if k else s.path for k in shard_sample_keys(s.path)]
        else:
            ids.append(s.path)
    return ids


# ---------------------------------------------------------------------------------- entries
@dataclass
class Entry:
    """One thing to describe: ``id`` (a path, or ``SHARD#KEY``), how to get its image, or an error."""

    id: str
    field: str  # "path" or "key": the JSONL field the id goes in
    load: Callable[[], object] | None = None
    error: str | None = None


@dataclass
class Loaded:
    """An entry after decoding: an RGB PIL image, or the reason there is none."""

    id: str
    field: str
    image: object = None
    error: str | None = None


def _describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _open_bytes(data: bytes, member: str):
    from PIL import UnidentifiedImageError

    from mmlm.api import open_image

    try:
        return open_image(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image member {member} ({len(data)} bytes)") from None


def _iter_shard(path: str) -> Iterator[Entry]:
    from mmlm.data.schema import iter_tar_records

    pending: list[tuple[str, Exception]] = []
    records = iter_tar_records(path, check=False, on_error=lambda key, e: pending.append((key, e)))

    def errors() -> Iterator[Entry]:
        while pending:
            key, e = pending.pop(0)
            eid = path if key == os.fspath(path) else f"{path}#{key}"
            yield Entry(eid, "key", error=("unreadable shard: " if eid == path else "") + _describe_error(e))

    for rec in records:
        yield from errors()
        eid = f"{path}#{rec.key}"
        if not rec.images:
            yield Entry(eid, "key", error="the sample has no image")
        else:
            member = f"{rec.key}.{rec.image_exts[0]}"
            yield Entry(eid, "key", load=lambda data=rec.images[0], m=member: _open_bytes(data, m))
    yield from errors()


def iter_entries(sources: Iterable[Source], skip: Callable[[str], bool] = lambda _id: False) -> Iterator[Entry]:
    """Entries in input order, lazily (shards are streamed); ``skip(id)`` drops entries early."""
    from mmlm.api import open_image

    for s in sources:
        if s.shard:
            for e in _iter_shard(s.path):
                if not skip(e.id):
                    yield e
        elif not skip(s.path):
            yield Entry(s.path, "path", load=lambda p=s.path: open_image(p))


def _load(entry: Entry) -> Loaded:
    if entry.error is not None:
        return Loaded(entry.id, entry.field, error=entry.error)
    try:
        return Loaded(entry.id, entry.field, image=entry.load())
    except Exception as e:  # any unreadable image is an error entry, never the end of the run
        return Loaded(entry.id, entry.field, error=_describe_error(e))


_DONE = object()


class PrefetchLoader:
    """Batches of :class:`Loaded` entries, decoded by a background thread ahead of the consumer.

    ``workers`` threads decode the images of a batch in parallel; at most ``prefetch`` decoded
    batches wait in the queue. Use as an iterator; ``close()`` (or leaving a ``with`` block)
    stops the producer early.
    """

    def __init__(self, entries: Iterable[Entry], batch_size: int, *, workers: int = 4, prefetch: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.entries = entries
        self.batch_size = batch_size
        self.workers = workers
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="mmlm-image-loader", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="mmlm-decode") as pool:
                chunk: list[Entry] = []
                for entry in self.entries:
                    chunk.append(entry)
                    if len(chunk) == self.batch_size:
                        if not self._put(list(pool.map(_load, chunk))):
                            return
                        chunk = []
                if chunk and not self._put(list(pool.map(_load, chunk))):
                    return
            self._put(_DONE)
        except BaseException as e:  # surfaced in the consumer's thread
            self._put(e)

    def __iter__(self) -> Iterator[list[Loaded]]:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe_batches(vlm, processor, loader: Iterable[list[Loaded]], prompt: str | None, config,
                     stop_strings: Sequence[str] = ()) -> Iterator[list[dict]]:
    """Per batch of loaded entries, one result dict each (input order):
    ``{path|key, prompt, text}`` or ``{path|key, prompt, error}``. Generation is
    ``mmlm.api.generate_texts`` on the entries that have an image; a sampled text is seeded by the
    entry's path or key (``mmlm.generation.sample_seed``): the same in any batch or resumed run."""
    from mmlm.api import generate_texts

    shown_prompt = processor.config.caption_prompt if prompt is None else prompt
    for batch in loader:
        good = [x for x in batch if x.image is not None]
        texts = iter(generate_texts(vlm, processor, [x.image for x in good], [prompt] * len(good), config,
                                    stop_strings, seed_keys=[x.id for x in good]) if good else [])
        results = []
        for x in batch:
            r = {x.field: x.id, "prompt": shown_prompt}
            if x.image is None:
                r["error"] = x.error
            else:
                r["text"] = next(texts)
            results.append(r)
        yield results


# ---------------------------------------------------------------------------------- results
def result_id(record: dict) -> str | None:
    value = record.get("path", record.get("key"))
    return value if isinstance(value, str) else None


def read_done(path: str | Path, *, retry: Container[tuple[str, str]] | None = None, rewrite: bool = True,
              log=sys.stderr) -> set[tuple[str, str]]:
    """``(id, prompt)`` of every image a JSONL results file already describes.

    A truncated last line from a killed run (a ``{...`` with no newline after it) and the error
    lines of the images this run retries (``retry``: their ``(id, prompt)``; None: every error line)
    are dropped, and the file is rewritten atomically without them (the lines kept are kept byte for
    byte; the error lines of other images stay). ``rewrite=False`` only reads and checks. Any other
    line that is not a result (``{"path"|"key", "prompt", "text"|"error"}``) is a ``ValueError``
    and the file is left as it is: it was not written by ``mmlm describe`` (a dataset's JSONL, notes),
    and rewriting it would destroy it.
    """
    path = Path(path)
    if not path.exists():
        return set()
    if not path.is_file():
        raise IsADirectoryError(f"--out {path} is not a file")
    raw = path.read_bytes()
    keep: list[bytes] = []
    done: set[tuple[str, str]] = set()
    truncated = errors = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:  # surrogateescape: paths that are not UTF-8 round-trip (see open_results)
            record = json.loads(line.decode("utf-8", "surrogateescape"))
            ok = isinstance(record, dict) and result_id(record) is not None
        except json.JSONDecodeError:
            ok = False
        if not ok or not ("text" in record or "error" in record):
            if not ok and i == len(lines) - 1 and line.lstrip().startswith(b"{"):  # cut before its newline
                truncated += 1
                continue
            raise ValueError(f"{path}: line {i + 1} is not a result of mmlm describe; give --out a new file "
                             f"or one that mmlm describe wrote")
        if "text" not in record:
            if retry is None or (result_id(record), record.get("prompt")) in retry:
                errors += 1
                continue
        else:
            done.add((result_id(record), record.get("prompt")))
        keep.append(line)
    if rewrite and (truncated or errors or (raw and not raw.endswith(b"\n"))):
        atomic_write_bytes(path, b"".join(line + b"\n" for line in keep))
        if log is not None and (truncated or errors):
            parts = ["a truncated last line"] if truncated else []
            parts += [f"{errors} error line(s) to retry"] if errors else []
            print(f"{path}: dropped {' and '.join(parts)}", file=log)
    return done


def run_record_path(out: str | Path) -> Path:
    """The record of the settings a results file was written with: ``OUT.run.json`` next to it."""
    out = Path(out)
    return out.with_name(out.name + ".run.json")


def check_run_record(out: str | Path, settings: dict) -> None:
    """Refuses to add to ``out`` when it holds results written with other ``settings`` (another model or
    other generation options): a resumed file would mix the two runs' texts, and skipping the images it
    already has would keep the old run's. Raises ``ValueError`` naming the settings that differ. A results
    file without a record (an older mmlm's) is taken as it is."""
    record = run_record_path(out)
    if not Path(out).exists() or not record.exists():
        return
    try:
        old = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):
        raise ValueError(f"{record} is not a record of mmlm describe; delete it, or give --out a new file")
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples as lists)
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
        raise ValueError(f"--out {out} holds results written with other settings (differs in: {', '.join(differ)}); "
                         "give --out a new file, or delete it to start over")


def write_run_record(out: str | Path, settings: dict) -> None:
    """Writes ``out``'s settings record (atomically), before any result is appended."""
    record = run_record_path(out)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(record, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())


def open_results(path: str | Path):
    """The JSONL results file, opened for appending (folders created). Paths that are not valid
    UTF-8 are written back as their original bytes (``surrogateescape``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8", errors="surrogateescape")


# ---------------------------------------------------------------------------------- streaming
class StreamPrinter:
    """Prints one reply as it is generated (an ``on_text(row, delta)`` callback for one row) so
    that what ends up printed is exactly the final text: leading and trailing whitespace and
    anything that may be (the start of) a stop string are held back until they are known to
    stay. ``finish(final)`` prints the rest and returns the final text."""

    def __init__(self, out=None, stop_strings: Sequence[str] = ()):
        self.out = out if out is not None else sys.stdout
        self.stop_strings = [s for s in stop_strings if s]
        self.buffer = ""
        self.shown = ""

    def _safe(self) -> str:
        text = self.buffer.lstrip()
        cut = len(text)
        for s in self.stop_strings:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, cut), 0, -1):
                if text[:cut].endswith(s[:k]):
                    cut -= k
                    break
        return text[:cut].rstrip()

    def __call__(self, row: int, delta: str) -> None:
        self.buffer += delta
        safe = self._safe()
        if len(safe) > len(self.shown) and safe.startswith(self.shown):
            self.out.write(safe[len(self.shown):])
            self.out.flush()
            self.shown = safe

    def finish(self, final: str, end: str = "\n") -> str:
        rest = final[len(self.shown):] if final.startswith(self.shown) else ""
        self.out.write(rest + end)
        self.out.flush()
        return final
