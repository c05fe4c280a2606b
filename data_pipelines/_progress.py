"""The progress bar shared by the shard builders in ``data_pipelines``.

Contract: :func:`progress` returns a tqdm bar that writes to stderr (stdout stays free for a
builder's results); tqdm is imported only when a bar is made. It has no other dependency in the
package, so both the CLI helpers (``data_pipelines._common``) and the build loop
(``data_pipelines._jobs``) can use it without import cycles.
"""

from __future__ import annotations

import sys

__all__ = ["progress"]


def progress(total: int | None, desc: str, disable: bool = False, unit: str = "sample"):
    """A tqdm bar on stderr (imported lazily)."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, mininterval=0.5, file=sys.stderr
    )
