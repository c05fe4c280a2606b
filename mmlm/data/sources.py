"""Shard specs -> data sources (lists of shard URLs with mixture weights), and opening a shard.

Contract:

* A *spec* is one of

  - a string or path: a file (``data/a.tar``, ``file:data/a.tar``), a directory (its ``*.tar``,
    sorted by name, hidden files excluded) or a brace pattern (``data/train-{000000..000009}.tar``);
  - a list of such strings: one source made of all of them, in order;
  - a mapping ``{"shards": <string or list>, "weight": float = 1.0, "name": str = ""}``: one source;
  - a list of mappings: several sources, mixed by weight in training (a shard is drawn from source
    ``i`` with probability ``weight_i / sum(weights)``; sources with equally sized shards are then
    mixed in those proportions by samples too). Evaluation reads every source once, in order.

* Only local paths are allowed by default. ``pipe:CMD`` specs (a shell command whose stdout is the
  tar) are refused unless ``allow_pipes=True``; URLs (``http://``, ``s3://``, ...) are refused
  unless ``allow_remote=True`` (they are read through webdataset's ``gopen``, i.e. ``curl`` & co).
  Refusals are one-line ``ValueError`` s that say how to allow them.
* :func:`parse_sources` checks the spec's form (no file-system access); :func:`resolve_sources`
  also expands local patterns and directories (``FileNotFoundError`` for a missing path, and a
  ``ValueError`` for a source that matches no shard).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Union

__all__ = ["Source", "SourceSpec", "parse_sources", "resolve_sources", "url_kind", "check_url", "open_shard",
           "ShardSpec"]

ShardSpec = Union[str, "os.PathLike[str]", Sequence[Any], Mapping[str, Any]]
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SOURCE_KEYS = ("shards", "weight", "name")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed but not yet expanded source: raw shard patterns and a weight."""

    patterns: tuple[str, ...]
    weight: float = 1.0
    name: str = ""


@dataclass(frozen=True)
class Source:
    """A source whose shard URLs are known (local paths, ``pipe:`` commands or URLs)."""

    shards: tuple[str, ...]
    weight: float = 1.0
    name: str = ""


def url_kind(url: str) -> str:
    """``"local"`` (plain path or ``file:``), ``"pipe"`` (``pipe:``) or ``"remote"`` (``scheme://``)."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith("file:"):
        return "local"
    m = _SCHEME.match(url)
    if m and len(m.group(1)) > 1:  # "C://" style drive letters are not schemes
        return "remote"
    return "local"


def check_url(url: str, *, allow_pipes: bool = False, allow_remote: bool = False) -> str:
    """Return ``url``'s kind; raise a one-line ``ValueError`` for a refused pipe or remote URL."""
    kind = url_kind(url)
    if kind == "pipe" and not allow_pipes:
        raise ValueError(f"shard spec {url!r} runs a shell command; pipe: specs are refused unless allow_pipes=True")
    if kind == "remote" and not allow_remote:
        raise ValueError(f"shard spec {url!r} is a remote URL; only local paths are read unless allow_remote=True")
    return kind


def _local_path(url: str) -> str:
    """``file:///a/b`` -> ``/a/b``; ``file:a/b`` -> ``a/b``; ``~`` expanded."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif url.startswith("file:"):
        url = url[len("file:"):]
    return os.path.expanduser(url)


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{where}: shards must be a string, a path or a list of them, got {type(value).__name__}")
    out = []
    for v in value:
        if not isinstance(v, (str, os.PathLike)):
            raise ValueError(f"{where}: shard entries must be strings or paths, got {type(v).__name__}: {v!r:.80}")
        s = os.fspath(v)
        if not s.strip():
            raise ValueError(f"{where}: empty shard spec")
        out.append(s)
    if not out:
        raise ValueError(f"{where}: no shards given")
    return tuple(out)


def _source_from_mapping(m: Mapping, i: int) -> SourceSpec:
    where = f"source {i}"
    unknown = sorted(set(m) - set(_SOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {list(_SOURCE_KEYS)}")
    if "shards" not in m:
        raise ValueError(f"{where}: needs a 'shards' entry (a pattern, a directory or a list)")
    weight = m.get("weight", 1.0)
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: weight must be a number, got {weight!r}") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}: weight must be a positive finite number, got {weight!r}")
    name = str(m.get("name") or "")
    return SourceSpec(_patterns(m["shards"], where), weight, name or f"source{i}")


def parse_sources(spec: ShardSpec, *, allow_pipes: bool = False, allow_remote: bool = False) -> list[SourceSpec]:
    """Check a spec's form and refused schemes; no file-system access (see module doc)."""
    if spec is None:
        raise ValueError("no shard spec given")
    if isinstance(spec, Mapping):
        sources = [_source_from_mapping(spec, 0)]
    elif isinstance(spec, (str, os.PathLike)):
        sources = [SourceSpec(_patterns(spec, "shard spec"), 1.0, "source0")]
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        items = list(spec)
        if not items:
            raise ValueError("empty shard spec list")
        if all(isinstance(x, Mapping) for x in items):
            sources = [_source_from_mapping(x, i) for i, x in enumerate(items)]
        elif any(isinstance(x, Mapping) for x in items):
            raise ValueError("a shard spec list must hold either only patterns (one source) or only "
                             "{'shards': ..., 'weight': ...} mappings (several sources), not both")
        else:
            sources = [SourceSpec(_patterns(items, "shard spec"), 1.0, "source0")]
    else:
        raise ValueError(f"a shard spec must be a string, a list or a mapping, got {type(spec).__name__}")
    for src in sources:
        for p in src.patterns:
            check_url(p, allow_pipes=allow_pipes, allow_remote=allow_remote)
    return sources


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand  # a webdataset dependency

    if url_kind(pattern) != "local":
        return list(braceexpand(pattern))
    from mmlm.data.schema import expand_shards

    return expand_shards(_local_path(pattern))


def resolve_sources(spec: ShardSpec, *, allow_pipes: bool = False, allow_remote: bool = False) -> list[Source]:
    """Parse ``spec`` and expand each source's patterns into shard URLs (see module doc)."""
    out = []
    for src in parse_sources(spec, allow_pipes=allow_pipes, allow_remote=allow_remote):
        shards: list[str] = []
        for p in src.patterns:
            shards.extend(_expand(p))
        if not shards:
            raise ValueError(f"{src.name}: {list(src.patterns)} matches no .tar shard")
        out.append(Source(tuple(shards), src.weight, src.name))
    return out


def open_shard(url: str, *, allow_pipes: bool = False, allow_remote: bool = False) -> IO[bytes]:
    """A readable binary stream of the shard (local file, pipe or remote URL when allowed)."""
    kind = check_url(url, allow_pipes=allow_pipes, allow_remote=allow_remote)
    if kind == "local":
        return open(_local_path(url), "rb")
    from webdataset.gopen import gopen  # exists in webdataset 0.2.x and 1.x

    return gopen(url, "rb")
