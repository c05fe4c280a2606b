"""The webdataset-style streaming pipeline: shards -> records -> model samples -> collated batches.

:class:`VLMStream` is an ``IterableDataset`` written as an explicit list of stages (open_clip
style, see :meth:`VLMStream.stages`); each stage is a small generator function
``stage(items, ctx, **options) -> items`` over :class:`Item` s, defined in ``mmlm.data.stages``
(whose docstring gives the stage contract and what each stage does). Errors are values: a bad
sample keeps flowing as an ``Item`` with ``error`` set, so that it is counted exactly once, at its
place in the stream.

This module holds the configuration (:class:`StreamConfig`), rank detection
(:func:`detect_rank_world`) and :class:`VLMStream`; it re-exports :class:`StreamContext`,
:class:`Item` and :func:`iter_tar_groups` from ``mmlm.data.stages``, and ``SAMPLE_MODES``,
``record_to_conversation`` and ``vqa_answer`` from ``mmlm.data.targets``.

Two modes (``StreamConfig.split``):

* ``"train"`` -- a resampled **endless** stream. Each (rank, worker) draws shards with replacement
  (source by mixture weight, then a shard uniformly) from its own RNG, reads them, shuffles
  samples in a buffer, and so on. Everything is a pure function of
  ``(seed, epoch, rank, worker)`` and the data, so the stream is deterministic.
* ``"eval"`` -- a deterministic **finite** pass in which every sample is yielded exactly once
  across ranks and workers: whole shards are split over the ``world_size * num_workers`` units
  when there are at least that many shards (``shards[unit::units]``), otherwise every unit reads
  every shard and keeps the samples whose index modulo ``units`` is its own. No shuffling.

Stages (train | eval)::

    resample_shards | list_shards -> split_shards (eval) -> expand_tar -> split_samples (eval)
    -> to_records -> shuffle (train) -> number (positions; resume fast-forward)
    -> select_target -> decode -> encode -> handle_errors -> batch

``select_target`` asks ``mmlm.data.targets`` what each record trains (sample mode, mixed weights,
VQA suffix) and applies the ``caption_first_samples`` curriculum by position. ``encode`` makes
uint8 RGB ``pixel_values`` by default (``StreamConfig.uint8_pixels``): the model normalises them
on its device (``mmlm.pixels``).

``expand_tar`` reads only image/txt/json members (other members -- pickle, pth, npy, ... -- are
never read, let alone decoded). ``pipe:`` and remote shards are opened only when allowed.

Positions and exact resume. ``number`` gives each item after the shuffle buffer its *position*
in the worker's stream (0, 1, 2, ...). Each batch carries::

    loader_state = {"split", "rank", "world_size", "worker", "num_workers", "seed", "epoch",
                    "position": p,      # every position < p is consumed (emitted or skipped)
                    "done": [...],      # positions >= p consumed already (packing reorders)
                    "emitted": n,       # samples this worker has emitted in total
                    "batches": b,       # batches this worker has emitted in total
                    "snapshot": {...}}  # only in the batch whose position first reaches a new snapshot
    skipped = {reason: count}           # bad samples since this worker's previous batch

``worker`` is the *logical* worker: DataLoader worker ``i`` plays logical worker
``(i + worker_offset) % num_workers``; a resumed loader sets ``worker_offset`` to the number of
batches consumed modulo ``num_workers`` so that the DataLoader's round-robin continues where it
stopped. Restoring ``resume={worker: {"position", "done", "emitted"}}`` makes each worker skip
the consumed positions before anything is decoded (the tar is re-read, images are not decoded),
so the resumed stream yields exactly the batches the uninterrupted one would have.
Mixed-mode choices are seeded per position, never by a running RNG, so skipping is exact.

Snapshots bound the cost of a resume. Without one, a resumed worker re-reads its stream from the
start (only decoding is skipped), which grows with the run. Every ``StreamConfig.snapshot_every``
items, ``shuffle`` records the state of everything before ``number`` after the item it passes on:
the shard draw and the index in that shard of the next item to read, the shuffle buffer as
``[draw, index]`` references, and the buffer's RNG state; ``number`` adds its ``position``. A
batch carries the newest snapshot at or before its ``position`` once (the consumer keeps the last
one it got: ``VLMDataModule.record_consumed``). Restoring ``resume={worker: {..., "snapshot"}}``
replays the shard draws from the RNG (nothing read), reads back the buffered items (each referenced
shard up to its last wanted item), continues in the snapshot's shard after its consumed items and
numbers from the snapshot's position; ``number`` then skips the positions consumed after it. The
resumed stream is the same stream, and the re-read is bounded by ``snapshot_every`` plus the shards
the buffer referenced. A buffered item its shard no longer holds (the shard was rewritten since the
checkpoint) comes back as a ``bad_shard`` error, counted, not fatal.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mmlm.data.decode import DEFAULT_MAX_PIXELS
from mmlm.data.errors import ErrorBudget
from mmlm.data.sources import Source
from mmlm.data.stages import (  # StreamContext, Item, iter_tar_groups: re-exported
    Item, StreamContext, batch, decode, encode, expand_tar, fetch_items, handle_errors, iter_tar_groups, list_shards,
    number, rank_shards, resample_shards, select_target, shuffle, split_samples, split_shards, to_records,
)
from mmlm.data.targets import (  # record_to_conversation, vqa_answer, SAMPLE_MODES: re-exported
    SAMPLE_MODES, check_mixed_weights, check_sample_mode, compile_question_pattern, record_to_conversation,
    vqa_answer,
)

__all__ = [
    "SAMPLE_MODES", "SPLITS", "StreamConfig", "StreamContext", "Item", "VLMStream", "detect_rank_world",
    "record_to_conversation", "vqa_answer", "iter_tar_groups",
]

SPLITS = ("train", "eval")


# ------------------------------------------------------------------------------------ config
@dataclass
class StreamConfig:
    """How a stream turns shards into batches (see the module doc)."""

    split: str = "train"
    """``train`` (resampled endless stream) or ``eval`` (finite, every sample exactly once)."""
    batch_size: int = 16
    """Rows per batch (packing: rows of up to ``max_length`` tokens)."""
    seed: int = 0
    epoch: int = 0
    """Part of the stream's identity with ``seed``: another epoch is another stream."""
    shuffle_buffer: int = 1000
    """Samples in the shuffle buffer (train); 0 or 1: no shuffling."""
    sample_mode: str = "auto"
    """``auto`` | ``caption`` | ``conversation`` | ``vqa`` | ``mixed`` (see ``mmlm.data.targets``)."""
    mixed_weights: dict[str, float] | None = None
    """``sample_mode="mixed"``: relative weight of each kind (``caption``, ``conversation``,
    ``vqa``) when a record has several; missing kinds weigh 1."""
    caption_first_samples: int = 0
    """Training curriculum: the first N samples of the stream (over all ranks and workers) train
    their caption whatever ``sample_mode`` says (records without one follow ``sample_mode``).
    Captions supervise every object of an image densely, so a model trained from scratch grounds
    its image tokens on them before questions ask it to bind words to objects."""
    question_pattern: str | None = None
    """A regular expression: conversations and VQA records train only their questions that match it
    (``re.search``; records with none are skipped as ``no_target``); captions are not filtered."""
    vqa_suffix: str = ""
    """Appended to VQA questions (e.g. ``"\\nAnswer with a single word."``)."""
    prompt_loss_fraction: float = 0.0
    """This fraction of the samples (a seeded draw per sample) also trains on its prompt: labels on
    the user turns and template tokens, not only on the assistant's answers (image tokens never)."""
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    """Images with more pixels are skipped (``huge_image``)."""
    max_member_size: int | None = 128 << 20
    """Tar members larger than this many bytes are not read; their sample is a schema error."""
    max_bad_fraction: float | None = 0.05
    max_bad: int | None = None
    min_samples: int = 100
    """The per-worker error budget (see ``mmlm.data.errors``)."""
    allow_pipes: bool = False
    allow_remote: bool = False
    snapshot_every: int = 1000
    """Train: every this many samples a worker passes on, its stream records where it stands (the shard
    and sample it reads next, the shuffle buffer's content as references, the buffer's RNG), and the
    batches carry the newest such snapshot in their ``loader_state``: a resume re-reads at most this many
    samples plus the shuffle buffer's, however long the run was. 0: none (a resume re-reads the stream
    from its start). Snapshots do not change the stream."""
    uint8_pixels: bool = True
    """Batches carry ``pixel_values`` as uint8 RGB (the fitted images, not normalised), which
    ``VLM.encode_images`` normalises on the model's device: 4x fewer bytes from the loader workers
    and in pinned memory, and no float conversion in the workers; the model sees the same values
    (``mmlm.pixels``). False: normalised float32, as ``Processor.encode`` returns by default."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        check_sample_mode(self.sample_mode)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_mixed_weights(self.mixed_weights)
        compile_question_pattern(self.question_pattern)
        if self.caption_first_samples < 0:
            raise ValueError(f"caption_first_samples must be >= 0, got {self.caption_first_samples}")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {self.snapshot_every}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


def detect_rank_world() -> tuple[int, int]:
    """(rank, world size) from ``torch.distributed`` when initialised, else the ``RANK``/
    ``WORLD_SIZE`` environment (torchrun, Lightning), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


# ------------------------------------------------------------------------------------ the dataset
class VLMStream(IterableDataset):
    """Shards -> collated batches (an ``IterableDataset``; use ``DataLoader(stream, batch_size=None)``).

    Args:
        sources: resolved sources (``mmlm.data.sources.resolve_sources``).
        processor: a ``Processor`` (its ``max_length``/``on_overflow`` apply; the DataModule passes a
            copy with ``on_overflow="drop"``).
        collate: ``PadCollate`` or ``PackCollate``.
        config: a :class:`StreamConfig`.
        rank, world_size: this process's place; None detects them (``detect_rank_world``).
        resume: ``{logical worker: {"position", "done", "emitted", "batches"[, "snapshot"]}}`` to continue from.
        worker_offset: DataLoader worker ``i`` plays logical worker ``(i + worker_offset) % num_workers``.

    Everything it holds pickles (DataLoader workers under ``spawn`` get a copy).
    """

    def __init__(self, sources: Sequence[Source], processor, collate, config: StreamConfig | None = None, *,
                 rank: int | None = None, world_size: int | None = None, resume: dict | None = None,
                 worker_offset: int = 0):
        super().__init__()
        self.sources = list(sources)
        if not self.sources or not any(s.shards for s in self.sources):
            raise ValueError("a stream needs at least one source with shards")
        self.processor = processor
        self.collate = collate
        self.config = config or StreamConfig()
        if rank is None or world_size is None:
            r, w = detect_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size: {rank}/{world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.set_resume(resume, worker_offset)

    def set_resume(self, resume: dict | None, worker_offset: int = 0) -> None:
        """Where each logical worker continues (see the class doc); takes effect at the next ``iter``."""
        self.resume = {int(k): dict(v) for k, v in (resume or {}).items()}
        self.worker_offset = int(worker_offset)

    def context(self) -> StreamContext:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return StreamContext(split=self.config.split, rank=self.rank, world_size=self.world_size,
                             worker=(physical + self.worker_offset) % num_workers, num_workers=num_workers,
                             seed=self.config.seed, epoch=self.config.epoch)

    def num_shards(self) -> int:
        return sum(len(s.shards) for s in self.sources)

    def stages(self, ctx: StreamContext, *, batched: bool = True) -> list[tuple[str, Callable]]:
        """The pipeline for ``ctx`` as an explicit list of ``(name, stage)``; stage(items) -> items."""
        cfg, P = self.config, functools.partial
        resume = self.resume.get(ctx.worker) if cfg.split == "train" else None
        train = cfg.split == "train"
        shard_level = not train and self.num_shards() >= ctx.units
        snapshot = (resume or {}).get("snapshot")  # train: restore the stages before `number` from it
        read = dict(allow_pipes=cfg.allow_pipes, allow_remote=cfg.allow_remote, max_member_size=cfg.max_member_size)
        out: list[tuple[str, Callable]] = []
        if train:
            out.append(("resample_shards", P(resample_shards, ctx=ctx, sources=self.sources,
                                             start=snapshot["draw"] if snapshot else 0)))
        else:
            out.append(("list_shards", P(list_shards, ctx=ctx, sources=self.sources)))
            if shard_level:
                out.append(("split_shards", P(split_shards, ctx=ctx)))
        drawn = len({u for src in self.sources for u in rank_shards(src.shards, ctx)}) if train else 0
        out.append(("expand_tar", P(expand_tar, ctx=ctx, **read, num_shards=drawn,
                                    first_draw=snapshot["draw"] if snapshot else 0,
                                    skip=snapshot["index"] if snapshot else 0)))
        if not train and not shard_level:
            out.append(("split_samples", P(split_samples, ctx=ctx)))
        out.append(("to_records", P(to_records, ctx=ctx)))
        if train:
            restore = None
            if snapshot:
                restore = (P(fetch_items, snapshot["buffer"], ctx, sources=self.sources, **read), snapshot["rng"])
            out.append(("shuffle", P(shuffle, ctx=ctx, bufsize=cfg.shuffle_buffer, snapshot_every=cfg.snapshot_every,
                                     restore=restore)))
        out.append(("number", P(number, ctx=ctx, resume=resume)))
        out.append(("select_target", P(select_target, ctx=ctx, mode=cfg.sample_mode, vqa_suffix=cfg.vqa_suffix,
                                       caption_conversation=self.processor.caption_conversation,
                                       caption_first=cfg.caption_first_samples, mixed_weights=cfg.mixed_weights,
                                       question_pattern=compile_question_pattern(cfg.question_pattern))))
        out.append(("decode", P(decode, ctx=ctx, max_pixels=cfg.max_pixels)))
        out.append(("encode", P(encode, ctx=ctx, processor=self.processor,
                                max_sample_length=self.collate.max_sample_length,
                                pixel_dtype="uint8" if cfg.uint8_pixels else "float",
                                prompt_loss_fraction=cfg.prompt_loss_fraction)))
        budget = ErrorBudget(cfg.max_bad_fraction, cfg.max_bad, cfg.min_samples,
                             where=f"{cfg.split} stream rank {ctx.rank} worker {ctx.worker}")
        out.append(("handle_errors", P(handle_errors, ctx=ctx, budget=budget)))
        if batched:
            out.append(("batch", P(batch, ctx=ctx, collate=self.collate, batch_size=cfg.batch_size, resume=resume)))
        return out

    def _run(self, batched: bool) -> Iterator:
        ctx = self.context()
        it: Any = None
        for _, stage in self.stages(ctx, batched=batched):
            it = stage(it)
        return it

    def __iter__(self) -> Iterator[dict]:
        return self._run(batched=True)

    def items(self) -> Iterator[Item]:
        """The unbatched items (good and bad) of this process's part of the stream: for inspection."""
        return self._run(batched=False)

    def with_config(self, **changes: Any) -> "VLMStream":
        """A copy with some ``StreamConfig`` fields changed."""
        return VLMStream(self.sources, self.processor, self.collate, dataclasses.replace(self.config, **changes),
                         rank=self.rank, world_size=self.world_size, resume=self.resume,
                         worker_offset=self.worker_offset)
