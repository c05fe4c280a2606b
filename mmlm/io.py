"""Small file-system helpers: atomic writes of files and directories.

``atomic_dir(path)`` yields a temporary sibling directory; on success its files land in
``path`` (a rename when ``path`` does not exist yet, else one atomic ``os.replace`` per file,
so files already there and not rewritten are kept). On error nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if not path.exists():
            os.rename(tmp, path)
            return
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a directory")
        for root, _, files in os.walk(tmp):
            rel = Path(root).relative_to(tmp)
            (path / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                os.replace(Path(root) / name, path / rel / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
