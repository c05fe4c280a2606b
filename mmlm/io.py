"""Small file-system helpers: atomic writes of files and directories.

``atomic_dir(path)`` yields a temporary sibling directory; on success its files land in
``path`` (a rename when ``path`` does not exist yet, else one atomic ``os.replace`` per file,
so files already there and not rewritten are kept). On error nothing is left behind.
``atomic_write_text`` / ``atomic_write_bytes`` write a file through a temporary sibling and a rename.
What they leave has the permissions a plain ``open``/``mkdir`` would give (0666/0777 less the umask), not
the owner-only ones of the ``tempfile`` names they go through.
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
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: others could not read the result
        yield tmp
        file_mode = 0o666 & ~current_umask()
        for root, _, files in os.walk(tmp):  # some writers (safetensors) make their files 0600
            for name in files:
                os.chmod(Path(root) / name, file_mode)
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


def current_umask() -> int:
    """The process's umask (read without changing it where /proc says it, else set and restored)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (the file gets 0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))
