"""Validation under several processes: a loader worker count that leaves no rank without a sample.

Under DDP a rank without a single validation batch used to hang the run (its peers waited in a collective it
never joined; ``VLMModule`` now reduces val/loss so that it does not, but an empty rank still validates
nothing). The eval stream splits work over ``world_size * max(1, num_workers)`` units: whole shards per unit
when there are at least that many shards, else samples one by one (``mmlm.data.stages``: ``split_shards`` /
``split_samples``). :func:`val_worker_count` counts the samples in the second case (tar headers only,
:func:`count_shard_items`) and picks the largest worker count that gives every unit one;
``VLMDataModule.val_dataloader`` uses it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Optional

from mmlm.data.stages import read_shard

__all__ = ["count_shard_items", "val_worker_count"]


def _read_nothing(ext: str) -> bool:
    return False


def count_shard_items(url: str, *, allow_pipes: bool = False, allow_remote: bool = False,
                      max_member_size: Optional[int] = None, limit: Optional[int] = None) -> int:
    """How many items the eval stream's ``expand_tar`` yields for shard ``url`` (what ``split_samples``
    enumerates): ``mmlm.data.stages.read_shard``'s items, read with no member wanted, so only tar headers
    are parsed (a sample with a schema problem and a bad shard's error item count, as they do there).
    ``limit``: stop counting there (None: count all)."""
    if limit is not None and limit <= 0:
        return 0
    items = read_shard(url, allow_pipes=allow_pipes, allow_remote=allow_remote, max_member_size=max_member_size,
                       wanted=_read_nothing)
    with contextlib.closing(items):  # a count stopped at the limit closes the shard now
        return sum(1 for _ in itertools.islice(items, limit))


def val_worker_count(shards: Sequence[str], world: int, num_workers: int, *, allow_pipes: bool = False,
                     allow_remote: bool = False, max_member_size: Optional[int] = None) -> int:
    """The DataLoader worker count for a validation pass over ``shards`` split over ``world`` processes, so
    that no loader unit (rank x worker) -- and so no process -- is left without a sample: ``num_workers``
    unless the eval stream would split samples one by one (fewer shards than ``world * max(1,
    num_workers)`` units) over more units than there are samples; then the largest ``w <= num_workers``
    (0: in-process) whose split gives every unit at least one item (with ``world * max(1, w)`` units; with
    as many shards as units the stream splits whole shards, and each unit needs a non-empty one). Raises
    ``ValueError`` when not even one sample per process is possible. One process: ``num_workers`` (a single
    process never waits for another)."""
    units = world * max(1, num_workers)
    if world <= 1 or len(shards) >= units:
        # whole shards per unit: each unit has at least one shard. An empty shard can still starve a unit
        # (and with num_workers <= 1 its rank): not counted here, to avoid reading every val shard's headers
        return num_workers
    counts: list[int] = []
    for url in shards:  # fewer shards than units; stop as soon as every unit is sure to get an item
        counts.append(count_shard_items(url, allow_pipes=allow_pipes, allow_remote=allow_remote,
                                        max_member_size=max_member_size, limit=units - sum(counts)))
        if sum(counts) >= units:
            return num_workers
    total = sum(counts)  # exact: every shard was read to its end

    def feasible(w: int) -> bool:
        n = world * max(1, w)
        if len(shards) >= n:  # the stream splits whole shards (shards[unit::n])
            return all(any(counts[i] for i in range(unit, len(shards), n)) for unit in range(n))
        return total >= n  # samples one by one (index % n)

    for w in range(num_workers, -1, -1):
        if feasible(w):
            return w
    if total < world:
        raise ValueError(f"data.val has {total} sample(s) for {world} processes: a process would get no validation "
                         "batch and multi-process validation would hang; give data.val at least "
                         f"{world} samples or validate with fewer devices")
    raise ValueError(f"data.val has {total} sample(s) in {len(shards)} shards, split whole over {world} processes: "
                     "a process would get only empty shards, so no validation batch, and multi-process validation "
                     "would hang; remove the empty shards from data.val or validate with fewer devices")
