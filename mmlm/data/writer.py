"""Write samples into numbered tar shards, atomically, deterministically, resumably.

Contract:

* :class:`ShardWriter` writes ``OUT/{prefix}-{index:06d}.tar`` starting at ``start_index``. Each
  shard is written under a temporary name ``OUT/.{prefix}-{index:06d}.tar.tmp`` and renamed
  (``os.replace``) once complete, so a reader listing ``*.tar`` never sees a half-written shard.
  A shard is complete when it holds ``max_count`` samples, when the next sample would push it
  past ``max_size`` bytes, or when the writer is closed. If the ``with`` block exits with an
  exception, the unfinished shard's temporary file is deleted (its samples are simply not
  written; :func:`resume_state` lets a re-run find and redo them).
* The writer never overwrites an existing complete shard (``FileExistsError``) unless
  ``overwrite=True``.
* Output is deterministic: members are written in a fixed order (images by index, then ``txt``,
  ``json``, then other extensions sorted), with ``mtime=0``, ``uid=gid=0``, empty owner names and
  mode ``0o444``; the same samples in the same order give byte-identical shards.
* :func:`resume_state` scans an output directory: removes leftover temporary files, returns the
  keys present in complete shards and the next free shard index.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .schema import IMAGE_EXTS, Record, SchemaError, check_record, record_to_members, split_member

__all__ = ["ShardWriter", "ResumeState", "resume_state", "shard_name", "tmp_name", "member_order"]

_DEFAULT_MAX_COUNT = 10_000
_DEFAULT_MAX_SIZE = 1 << 30  # 1 GiB


def shard_name(prefix: str, index: int) -> str:
    """``shard-000012.tar`` for ``("shard", 12)``."""
    return f"{prefix}-{index:06d}.tar"


def tmp_name(prefix: str, index: int) -> str:
    """The temporary name a shard is written under: ``.shard-000012.tar.tmp``."""
    return f".{shard_name(prefix, index)}.tmp"


def member_order(ext: str) -> tuple[int, int, str]:
    """Sort key for the members of one sample: images by index, txt, json, the rest by name."""
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return (0, 0, ext)
    head, _, tail = ext.partition(".")
    if head.isdigit() and tail in IMAGE_EXTS:
        return (0, int(head), tail)
    if ext == "txt":
        return (1, 0, ext)
    if ext == "json":
        return (2, 0, ext)
    return (3, 0, ext)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Write samples to ``out_dir/{prefix}-NNNNNN.tar`` shards; a context manager.

    Args:
        out_dir: directory (created if missing).
        prefix: shard file name prefix.
        max_count: samples per shard.
        max_size: approximate bytes per shard (a single bigger sample still gets its own shard).
        start_index: number of the first shard (use :func:`resume_state` to continue a run).
        overwrite: allow replacing existing complete shards.
        fsync: ``fsync`` each shard before renaming it (durability across power loss).

    ``write(record)`` / ``write_members(key, members)`` add one sample. ``shards`` lists the
    completed shard paths, ``count`` the samples written so far.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_count: int = _DEFAULT_MAX_COUNT,
        max_size: int = _DEFAULT_MAX_SIZE,
        *,
        start_index: int = 0,
        overwrite: bool = False,
        fsync: bool = False,
    ):
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if not prefix or "/" in prefix or prefix.startswith("."):
            raise ValueError(f"bad shard prefix {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = int(max_count)
        self.max_size = int(max_size)
        self.overwrite = overwrite
        self.fsync = fsync
        self.index = int(start_index)
        self.shards: list[Path] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._file: io.BufferedWriter | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._shard_count = 0
        self._shard_size = 0
        self._closed = False

    # -- shard lifecycle
    def _open(self) -> None:
        final = self.out_dir / shard_name(self.prefix, self.index)
        if final.exists() and not self.overwrite:
            raise FileExistsError(f"{final} exists; refusing to overwrite a complete shard")
        self._final = final
        self._tmp = self.out_dir / tmp_name(self.prefix, self.index)
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._shard_count = 0
        self._shard_size = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._final)
        self.shards.append(self._final)
        self._tar = self._file = None
        self.index += 1

    def _abort(self) -> None:
        for closer in (self._tar, self._file):
            try:
                if closer is not None:
                    closer.close()
            except Exception:
                pass
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar = self._file = None

    # -- writing
    def write(self, record: Record) -> None:
        """Write one :class:`Record` (converted with :func:`record_to_members`) after :func:`check_record`: a
        record that breaks the schema raises :class:`SchemaError` here, not a skip when it is read.
        (``write_members`` writes raw members unchecked: img2dataset-style shards, test fixtures.)"""
        check_record(record)
        self.write_members(record.key, record_to_members(record))

    def write_members(self, key: str, members: Mapping[str, bytes]) -> None:
        """Write one sample given as ``{extension: bytes}``; ``__key__``-style entries are ignored."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not key or "." in key.rpartition("/")[2] or key.startswith("/"):
            raise SchemaError(key, "a key must be non-empty, relative and have no dots")
        items = sorted(
            ((e, v) for e, v in members.items() if not e.startswith("__")), key=lambda kv: member_order(kv[0])
        )
        if not items:
            raise SchemaError(key, "a sample needs at least one member")
        size = sum(tarfile.BLOCKSIZE + -(-len(v) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for _, v in items)
        if self._tar is not None and (
            self._shard_count >= self.max_count or (self._shard_count and self._shard_size + size > self.max_size)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        for ext, data in items:
            if not ext or "/" in ext:
                raise SchemaError(key, f"bad member extension {ext!r}")
            if isinstance(data, str):
                data = data.encode("utf-8")
            data = bytes(data)
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._shard_count += 1
        self._shard_size += size
        self.count += 1

    def close(self) -> None:
        """Complete (rename) the current shard. Idempotent."""
        if self._closed:
            return
        if self._tar is not None:
            self._finish()
        self._closed = True

    def abort(self) -> None:
        """Drop the current unfinished shard (delete its temporary file) and close."""
        self._abort()
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class ResumeState:
    """What an output directory already holds (see :func:`resume_state`)."""

    keys: set[str] = field(default_factory=set)
    next_index: int = 0
    shards: list[Path] = field(default_factory=list)
    removed_tmp: list[Path] = field(default_factory=list)
    broken: list[Path] = field(default_factory=list)


_SHARD_RE = r"^{}-(\d{{6,}})\.tar$"


def resume_state(out_dir: str | os.PathLike, prefix: str = "shard", *, read_keys: bool = True) -> ResumeState:
    """Scan ``out_dir`` for a run to continue.

    Removes leftover temporary shards (``.{prefix}-*.tar.tmp``), lists the complete
    ``{prefix}-NNNNNN.tar`` shards, collects the sample keys they hold (streaming member headers
    only; member bytes are read but never decoded) and returns the next free shard index. A shard
    that cannot be read to the end is reported in ``broken`` and its keys are not counted; it is
    left in place (rename or delete it before resuming to have its samples redone).
    """
    out = Path(out_dir)
    state = ResumeState()
    if not out.is_dir():
        return state
    pat = re.compile(_SHARD_RE.format(re.escape(prefix)))
    top = -1
    for p in sorted(out.iterdir()):
        if p.name.startswith(f".{prefix}-") and p.name.endswith(".tar.tmp"):
            p.unlink()
            state.removed_tmp.append(p)
            continue
        m = pat.match(p.name)
        if not m:
            continue
        top = max(top, int(m.group(1)))
        state.shards.append(p)
        if not read_keys:
            continue
        try:
            keys = {split_member(info.name)[0] for info in _iter_infos(p)}
        except (tarfile.TarError, OSError, EOFError):
            state.broken.append(p)
            continue
        state.keys |= keys
    state.next_index = top + 1
    return state


def _iter_infos(path: Path):
    with tarfile.open(path, mode="r|*") as tar:
        for info in tar:
            if info.isfile():
                yield info
