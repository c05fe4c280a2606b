"""The webdataset-style streaming pipeline: shards -> records -> model samples -> collated batches.

:class:`VLMStream` is an ``IterableDataset`` written as an explicit list of stages (open_clip
style, see :meth:`VLMStream.stages`); each stage is a small generator function
``stage(items, ctx) -> items`` over :class:`Item` s. Errors are values: a bad sample keeps flowing
as an ``Item`` with ``error`` set, so that it is counted exactly once, at its place in the stream.

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
                    "batches": b}       # batches this worker has emitted in total
    skipped = {reason: count}           # bad samples since this worker's previous batch

``worker`` is the *logical* worker: DataLoader worker ``i`` plays logical worker
``(i + worker_offset) % num_workers``; a resumed loader sets ``worker_offset`` to the number of
batches consumed modulo ``num_workers`` so that the DataLoader's round-robin continues where it
stopped. Restoring ``resume={worker: {"position", "done", "emitted"}}`` makes each worker skip
the consumed positions before anything is decoded (the tar is re-read, images are not decoded),
so the resumed stream yields exactly the batches the uninterrupted one would have.
Mixed-mode choices are seeded per position, never by a running RNG, so skipping is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mmlm.data.decode import DEFAULT_MAX_PIXELS, decode_image
from mmlm.data.errors import BAD_SHARD, SCHEMA_ERROR, TOO_LONG, BadSample, ErrorBudget, classify
from mmlm.data.schema import Record, SchemaError, is_image_ext, record_from_members, split_member
from mmlm.data.sources import Source, open_shard
from mmlm.data.targets import (  # record_to_conversation, vqa_answer, SAMPLE_MODES: re-exported
    SAMPLE_MODES, check_mixed_weights, check_sample_mode, present_kinds, record_to_conversation, vqa_answer,
)

__all__ = [
    "SAMPLE_MODES", "SPLITS", "StreamConfig", "StreamContext", "Item", "VLMStream", "detect_rank_world",
    "record_to_conversation", "vqa_answer", "iter_tar_groups",
]

SPLITS = ("train", "eval")
_WANTED_TEXT = ("txt", "json")


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
    vqa_suffix: str = ""
    """Appended to VQA questions (e.g. ``"\\nAnswer with a single word."``)."""
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
        if self.caption_first_samples < 0:
            raise ValueError(f"caption_first_samples must be >= 0, got {self.caption_first_samples}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


@dataclass(frozen=True)
class StreamContext:
    """Who is iterating: the split, rank/world and the logical worker, plus the seed."""

    split: str
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    seed: int = 0
    epoch: int = 0

    @property
    def unit(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def units(self) -> int:
        return self.world_size * self.num_workers

    def rng(self, purpose: str, *extra: Any) -> random.Random:
        """A ``random.Random`` seeded from (purpose, seed, epoch, rank, worker, extra): independent
        of ``PYTHONHASHSEED`` and of everything else that happens in the process."""
        parts = [purpose, self.seed, self.epoch, self.rank, self.worker, *extra]
        return random.Random(":".join(str(p) for p in parts))


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


# ------------------------------------------------------------------------------------ items
@dataclass
class Item:
    """One sample on its way through the stages; ``error`` set means it will be skipped."""

    key: str
    url: str
    members: dict[str, bytes] | None = None
    record: Record | None = None
    conversation: list[dict] | None = None
    images: list | None = None
    sample: dict | None = None
    error: BadSample | None = None
    position: int = -1


# ------------------------------------------------------------------------------------ tar reading
def _wanted(ext: str) -> bool:
    return ext in _WANTED_TEXT or is_image_ext(ext)


def iter_tar_groups(stream, url: str, *, max_member_size: int | None = None) -> Iterator[Item]:
    """Items (``members`` or ``error``) for each run of consecutive members sharing a key, read from
    a binary ``stream`` of a tar. Only image/txt/json members are read; others are skipped unread.
    A tar error propagates (the caller reports the shard)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    error: BadSample | None = None

    def flush() -> Item:
        return Item(key=key, url=url, members=None if error else members, error=error)

    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_member(info.name)
            if k != key:
                if key is not None:
                    yield flush()
                key, members, error = k, {}, None
            if error is not None:
                continue
            if not ext:
                error = BadSample(k, SCHEMA_ERROR, f"member {info.name!r} has no extension")
            elif not _wanted(ext):
                continue  # never read: pickle, pth, npy, cls, ...
            elif max_member_size is not None and info.size > max_member_size:
                error = BadSample(k, SCHEMA_ERROR, f"member {info.name!r} is {info.size} bytes (> {max_member_size})")
            elif ext in members:
                error = BadSample(k, SCHEMA_ERROR, f"duplicate member {info.name!r}")
            else:
                f = tar.extractfile(info)
                members[ext] = f.read() if f is not None else b""
    if key is not None:
        yield flush()


# ------------------------------------------------------------------------------------ stages
# Each stage: (items or None, ctx, **params) -> iterator. Bound with functools.partial in stages().

def rank_shards(shards: Sequence[str], ctx: StreamContext) -> Sequence[str]:
    """This rank's share of a source's shards (``shards[rank::world]``), so ranks train on disjoint
    samples; a source with fewer shards than ranks is shared whole (ranks may then overlap)."""
    if ctx.world_size > 1 and len(shards) >= ctx.world_size:
        return shards[ctx.rank::ctx.world_size]
    return shards


def resample_shards(_: None, ctx: StreamContext, *, sources: Sequence[Source]) -> Iterator[str]:
    """Train: shard URLs drawn forever with replacement (source by weight, then uniformly among
    this rank's shards of that source)."""
    rng = ctx.rng("shards")
    weights = [s.weight for s in sources]
    pools = [rank_shards(s.shards, ctx) for s in sources]
    while True:
        pool = pools[0] if len(sources) == 1 else rng.choices(pools, weights=weights)[0]
        yield pool[rng.randrange(len(pool))]


def list_shards(_: None, ctx: StreamContext, *, sources: Sequence[Source]) -> Iterator[str]:
    """Eval: every shard of every source, in order."""
    for src in sources:
        yield from src.shards


def split_shards(urls: Iterable[str], ctx: StreamContext) -> Iterator[str]:
    """Eval, at least ``units`` shards: this unit's shards (``shards[unit::units]``)."""
    for i, url in enumerate(urls):
        if i % ctx.units == ctx.unit:
            yield url


def expand_tar(urls: Iterable[str], ctx: StreamContext, *, allow_pipes: bool, allow_remote: bool,
               max_member_size: int | None) -> Iterator[Item]:
    """Shard URLs -> grouped members; an unreadable shard becomes one ``bad_shard`` item."""
    for url in urls:
        try:
            with open_shard(url, allow_pipes=allow_pipes, allow_remote=allow_remote) as stream:
                yield from iter_tar_groups(stream, url, max_member_size=max_member_size)
        except (tarfile.TarError, OSError, EOFError) as e:
            yield Item(key=url, url=url, error=BadSample(url, BAD_SHARD, f"{type(e).__name__}: {e}; rest of shard skipped"))


def split_samples(items: Iterable[Item], ctx: StreamContext) -> Iterator[Item]:
    """Eval, fewer shards than units: keep the samples whose index modulo ``units`` is this unit."""
    for i, item in enumerate(items):
        if i % ctx.units == ctx.unit:
            yield item


def to_records(items: Iterable[Item], ctx: StreamContext) -> Iterator[Item]:
    """Members -> :class:`Record` (``record_from_members``); schema errors become the item's error."""
    for item in items:
        if item.error is None:
            try:
                item.record = record_from_members(item.key, item.members)
            except SchemaError as e:
                item.error = classify(e, item.key)
        item.members = None
        yield item


def shuffle(items: Iterable[Item], ctx: StreamContext, *, bufsize: int) -> Iterator[Item]:
    """Train: a shuffle buffer of ``bufsize`` items (items, not decoded images, are buffered)."""
    if bufsize <= 1:
        yield from items
        return
    rng = ctx.rng("shuffle")
    buf: list[Item] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = rng.randrange(bufsize)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def number(items: Iterable[Item], ctx: StreamContext, *, resume: dict | None) -> Iterator[Item]:
    """Give each item its position; skip (before any decoding) the positions a resumed run consumed."""
    start = int(resume["position"]) if resume else 0
    done = set(resume.get("done", ())) if resume else set()
    for pos, item in enumerate(items):
        if pos < start or pos in done:
            continue
        item.position = pos
        yield item


def _sample_rng(ctx: StreamContext, item: Item) -> random.Random:
    if ctx.split == "eval":  # independent of how the pass is split over ranks and workers
        return random.Random(f"sample:{ctx.seed}:{item.key}")
    return ctx.rng("sample", item.position)


def select_target(items: Iterable[Item], ctx: StreamContext, *, mode: str, vqa_suffix: str,
                  caption_conversation: Callable[[str], list[dict]], caption_first: int = 0,
                  mixed_weights: dict[str, float] | None = None) -> Iterator[Item]:
    """Record -> the conversation to train (before decoding: a record without target costs nothing).
    Training positions below this worker's share of ``caption_first`` train captions where present."""
    first = -(-caption_first // ctx.units) if ctx.split == "train" else 0  # ceil: this worker's share
    for item in items:
        if item.error is None:
            m = mode
            if item.position < first and "caption" in present_kinds(item.record):
                m = "caption"
            try:
                item.conversation = record_to_conversation(item.record, m, _sample_rng(ctx, item),
                                                           caption_conversation=caption_conversation,
                                                           vqa_suffix=vqa_suffix, mixed_weights=mixed_weights)
            except BadSample as e:
                item.error = e
        yield item


def decode(items: Iterable[Item], ctx: StreamContext, *, max_pixels: int | None) -> Iterator[Item]:
    """Image bytes -> RGB PIL images (``mmlm.data.decode.decode_image``)."""
    for item in items:
        if item.error is None:
            try:
                item.images = [decode_image(b, key=item.key, max_pixels=max_pixels) for b in item.record.images]
            except BadSample as e:
                item.error = e
        if item.record is not None:
            item.record.images = []  # drop the encoded bytes
        yield item


def encode(items: Iterable[Item], ctx: StreamContext, *, processor, max_sample_length: int | None,
           pixel_dtype: str = "float") -> Iterator[Item]:
    """Conversation + images -> ``processor.encode`` output (``pixel_dtype``: ``float`` or ``uint8``).
    ``too_long``: an overflow into an image span, a truncation that left no answer token, or
    (packing) more tokens than a row holds."""
    for item in items:
        if item.error is None:
            try:
                enc = processor.encode(item.conversation, item.images, key=item.key, pixel_dtype=pixel_dtype)
            except (BadSample, ValueError) as e:
                enc, item.error = None, classify(e, item.key)
            if item.error is None:
                max_len = processor.config.max_length
                if enc is None:
                    item.error = BadSample(item.key, TOO_LONG, f"overflows max_length={max_len} inside an image span")
                elif enc["input_ids"].numel() >= max_len and not bool((enc["labels"] != -100).any()):
                    # truncation cut every answer token; (an unlabelled sample that was not cut is
                    # passed on: a template that masks every label is the trainer's preflight error)
                    item.error = BadSample(item.key, TOO_LONG, f"no answer token left within max_length={max_len}")
                elif max_sample_length is not None and enc["input_ids"].numel() > max_sample_length:
                    item.error = BadSample(item.key, TOO_LONG, f"{enc['input_ids'].numel()} tokens > packed row "
                                                               f"length {max_sample_length}")
                else:
                    item.sample = {**enc, "key": item.key, "position": item.position}
        item.images = item.conversation = item.record = None
        yield item


def handle_errors(items: Iterable[Item], ctx: StreamContext, *, budget: ErrorBudget) -> Iterator[Item]:
    """Count (and log) every bad item, count good ones; stop past the budget. Items pass on."""
    for item in items:
        if item.error is not None:
            budget.skip(item.error, item.url)
        else:
            budget.ok()
        yield item


def batch(items: Iterable[Item], ctx: StreamContext, *, collate, batch_size: int, resume: dict | None) -> Iterator[dict]:
    """Good samples -> collated batches carrying ``loader_state`` and ``skipped`` (module doc).

    The last batch is held back until the next one exists (or the stream ends), so that skips
    after the last sample of a finite pass are still reported with it."""
    frontier = int(resume["position"]) if resume else 0
    done: set[int] = set(resume.get("done", ())) if resume else set()
    emitted = int(resume.get("emitted", 0)) if resume else 0
    batches = int(resume.get("batches", 0)) if resume else 0
    last_seen = frontier - 1
    pending: list[Item] = []
    pending_tokens = 0
    skipped: Counter = Counter()
    held: dict | None = None

    def advance() -> None:
        nonlocal frontier, done
        frontier = max(frontier, min(i.position for i in pending) if pending else last_seen + 1)
        while frontier in done:
            frontier += 1
        done = {p for p in done if p >= frontier}

    def form() -> dict:
        nonlocal emitted, batches, skipped, pending_tokens
        rows = collate.plan([i.sample["input_ids"].numel() for i in pending], batch_size)
        chosen = {j for row in rows for j in row}
        out = collate.collate_rows([[pending[j].sample for j in row] for row in rows])
        out["keys"] = [pending[j].key for row in rows for j in row]
        done.update(pending[j].position for j in chosen)
        pending_tokens -= sum(pending[j].sample["input_ids"].numel() for j in chosen)
        pending[:] = [it for j, it in enumerate(pending) if j not in chosen]
        advance()
        emitted += len(chosen)
        batches += 1
        out["loader_state"] = state()
        out["skipped"], skipped = dict(skipped), Counter()
        return out

    def state() -> dict:
        return {"split": ctx.split, "rank": ctx.rank, "world_size": ctx.world_size, "worker": ctx.worker,
                "num_workers": ctx.num_workers, "seed": ctx.seed, "epoch": ctx.epoch, "position": frontier,
                "done": sorted(done), "emitted": emitted, "batches": batches}

    for item in items:
        last_seen = item.position
        if item.error is not None:
            skipped[item.error.reason] += 1
            done.add(item.position)
        else:
            pending.append(item)
            pending_tokens += item.sample["input_ids"].numel()
        while pending and collate.ready(len(pending), pending_tokens, batch_size):
            new = form()
            if held is not None:
                yield held
            held = new
    while pending:
        new = form()
        if held is not None:
            yield held
        held = new
    if held is not None:
        if skipped:  # trailing skips of a finite pass
            for k, v in skipped.items():
                held["skipped"][k] = held["skipped"].get(k, 0) + v
            advance()
            held["loader_state"] = {**held["loader_state"], "position": frontier, "done": sorted(done)}
        yield held


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
        resume: ``{logical worker: {"position", "done", "emitted", "batches"}}`` to continue from.
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
        out: list[tuple[str, Callable]] = []
        if train:
            out.append(("resample_shards", P(resample_shards, ctx=ctx, sources=self.sources)))
        else:
            out.append(("list_shards", P(list_shards, ctx=ctx, sources=self.sources)))
            if shard_level:
                out.append(("split_shards", P(split_shards, ctx=ctx)))
        out.append(("expand_tar", P(expand_tar, ctx=ctx, allow_pipes=cfg.allow_pipes, allow_remote=cfg.allow_remote,
                                    max_member_size=cfg.max_member_size)))
        if not train and not shard_level:
            out.append(("split_samples", P(split_samples, ctx=ctx)))
        out.append(("to_records", P(to_records, ctx=ctx)))
        if train:
            out.append(("shuffle", P(shuffle, ctx=ctx, bufsize=cfg.shuffle_buffer)))
        out.append(("number", P(number, ctx=ctx, resume=resume)))
        out.append(("select_target", P(select_target, ctx=ctx, mode=cfg.sample_mode, vqa_suffix=cfg.vqa_suffix,
                                       caption_conversation=self.processor.caption_conversation,
                                       caption_first=cfg.caption_first_samples, mixed_weights=cfg.mixed_weights)))
        out.append(("decode", P(decode, ctx=ctx, max_pixels=cfg.max_pixels)))
        out.append(("encode", P(encode, ctx=ctx, processor=self.processor,
                                max_sample_length=self.collate.max_sample_length,
                                pixel_dtype="uint8" if cfg.uint8_pixels else "float")))
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
