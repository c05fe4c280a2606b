"""The stages of the streaming pipeline; :meth:`mmlm.data.stream.VLMStream.stages` lists them in order.

The stage contract::

    stage(items, ctx: StreamContext, **options) -> Iterator

* ``items``: the previous stage's output, any iterable (``None`` for the first stage, which
  makes shard URLs). Stages are lazy generators: nothing is read until the batches are pulled.
* ``ctx``: a :class:`StreamContext` -- split, rank/world, logical worker, seed, epoch. Every
  random choice comes from ``ctx.rng(purpose, ...)``, so a stage is a pure function of its
  input, ``ctx`` and its options.
* ``options``: keyword-only, bound with ``functools.partial`` in ``VLMStream.stages``.
* Errors are values: a bad sample is neither dropped nor raised; the stage sets :attr:`Item.error`
  and passes the item on, and later stages do no work on it, so that ``handle_errors`` counts it
  exactly once and ``batch`` reports it at its position. Past the error budget, ``handle_errors``
  raises.

The stages, in pipeline order (``train:``/``eval:``: only in that split)::

    resample_shards  train: shard URLs drawn forever with replacement (source by weight, then a shard)
    list_shards      eval: every shard URL of every source, in order
    split_shards     eval, at least ``units`` shards: this unit's shards (``shards[unit::units]``)
    expand_tar       shard URLs -> one Item of image/txt/json members per key; bad shard -> one error;
                     train: raises when every shard is an empty tar (no sample to train, nothing to count)
    split_samples    eval, fewer shards than units: the samples whose index % units is this unit
    to_records       members -> ``Record`` (``mmlm.data.schema``); schema errors become item errors
    shuffle          train: a shuffle buffer of records (not of decoded images); resume snapshots
    number           each item's position in the worker's stream; skips positions a resume consumed
    select_target    record -> the conversation to train (``mmlm.data.targets``; caption curriculum)
    decode           image bytes -> RGB PIL images (``mmlm.data.decode``; ``max_pixels``)
    encode           conversation + images -> ``processor.encode`` sample: input_ids (L,), labels
                     (L,), pixel_values (n, 3, H, W) uint8|float or None; ``too_long`` checks
    handle_errors    counts good and bad items against the ``ErrorBudget`` (raises past it; train: also
                     when nothing but filtered items or unreadable shards come, see ``MAX_FILTERED_IN_A_ROW``
                     and ``MAX_BAD_SHARDS_IN_A_ROW``)
    batch            good samples -> collated batches with ``loader_state`` and ``skipped``

Helpers: :func:`iter_tar_groups` (a tar stream -> Items) and :func:`read_shard` (a shard URL ->
Items), used by ``expand_tar``; :func:`rank_shards` (this rank's share of a source's shards);
:func:`shard_draws` (the endless draw of shard URLs) and :func:`fetch_items` (items read back by
``[draw, index]``, to restore a snapshot's shuffle buffer). ``loader_state``, positions, snapshots
and exact resume are described in ``mmlm.data.stream``.
"""

from __future__ import annotations

import itertools
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mmlm.data.decode import decode_image
from mmlm.data.errors import (
    BAD_SHARD, FILTERED, SCHEMA_ERROR, TOO_LONG, BadSample, DataErrorBudgetExceeded, ErrorBudget, classify,
)
from mmlm.data.schema import Record, SchemaError, complete_tar_groups, is_image_ext, record_from_members
from mmlm.data.sources import Source, open_shard
from mmlm.data.targets import present_kinds, record_to_conversation

__all__ = [
    "StreamContext", "Item", "iter_tar_groups", "rank_shards", "resample_shards", "list_shards", "split_shards",
    "expand_tar", "split_samples", "to_records", "shuffle", "number", "select_target", "decode", "encode",
    "handle_errors", "batch", "shard_draws", "read_shard", "fetch_items",
]

_WANTED_TEXT = ("txt", "json")


# ------------------------------------------------------------------------------------ context
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
    draw: int = -1
    """Train: which shard draw of the worker's stream the item came from (0, 1, 2, ...)."""
    index: int = -1
    """Train: the item's index among the items of its shard (a bad shard's error item included)."""
    snapshot: dict | None = None
    """Train, every ``snapshot_every`` items: where the stream stands after this item (see ``shuffle``)."""


# ------------------------------------------------------------------------------------ tar reading
def _wanted(ext: str) -> bool:
    return ext in _WANTED_TEXT or is_image_ext(ext)


def iter_tar_groups(stream, url: str, *, max_member_size: int | None = None,
                    wanted: Callable[[str], bool] = _wanted) -> Iterator[Item]:
    """Items (``members`` or ``error``) for each run of consecutive members sharing a key, read from
    a binary ``stream`` of a tar (:func:`mmlm.data.schema.group_tar_members`). Only the members whose
    extension is ``wanted`` (image/txt/json) are read; others are skipped unread. A tar error, a truncated tar included (its last
    sample is held back until the end-of-archive check), propagates: the caller reports the shard."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for key, members, problem in complete_tar_groups(tar, url, wanted=wanted, max_member_size=max_member_size):
            if problem is None:
                yield Item(key=key, url=url, members=members)
            else:
                yield Item(key=key, url=url, error=BadSample(key, SCHEMA_ERROR, problem))


# ------------------------------------------------------------------------------------ stages
# Each stage: (items or None, ctx, **params) -> iterator. Bound with functools.partial in stages().

def rank_shards(shards: Sequence[str], ctx: StreamContext) -> Sequence[str]:
    """This rank's share of a source's shards (``shards[rank::world]``), so ranks train on disjoint
    samples; a source with fewer shards than ranks is shared whole (ranks may then overlap)."""
    if ctx.world_size > 1 and len(shards) >= ctx.world_size:
        return shards[ctx.rank::ctx.world_size]
    return shards


def shard_draws(ctx: StreamContext, sources: Sequence[Source]) -> Iterator[str]:
    """Train: this worker's shard URLs, drawn forever with replacement (source by weight, then
    uniformly among this rank's shards of that source). Draw ``d`` is the same in every run."""
    rng = ctx.rng("shards")
    weights = [s.weight for s in sources]
    pools = [rank_shards(s.shards, ctx) for s in sources]
    while True:
        pool = pools[0] if len(sources) == 1 else rng.choices(pools, weights=weights)[0]
        yield pool[rng.randrange(len(pool))]


def resample_shards(_: None, ctx: StreamContext, *, sources: Sequence[Source], start: int = 0) -> Iterator[str]:
    """Train: the shard draws (:func:`shard_draws`) from draw ``start`` on (a resume; the earlier
    draws are replayed from the RNG, nothing is read)."""
    return itertools.islice(shard_draws(ctx, sources), start, None)


def list_shards(_: None, ctx: StreamContext, *, sources: Sequence[Source]) -> Iterator[str]:
    """Eval: every shard of every source, in order."""
    for src in sources:
        yield from src.shards


def split_shards(urls: Iterable[str], ctx: StreamContext) -> Iterator[str]:
    """Eval, at least ``units`` shards: this unit's shards (``shards[unit::units]``)."""
    for i, url in enumerate(urls):
        if i % ctx.units == ctx.unit:
            yield url


def read_shard(url: str, *, allow_pipes: bool, allow_remote: bool, max_member_size: int | None,
               wanted: Callable[[str], bool] = _wanted) -> Iterator[Item]:
    """One shard's items (:func:`iter_tar_groups`; ``wanted``: the member extensions read); an unreadable or
    truncated shard ends with one ``bad_shard`` item after the items read before the error."""
    try:
        with open_shard(url, allow_pipes=allow_pipes, allow_remote=allow_remote) as stream:
            yield from iter_tar_groups(stream, url, max_member_size=max_member_size, wanted=wanted)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Item(key=url, url=url, error=BadSample(url, BAD_SHARD, f"{type(e).__name__}: {e}; rest of shard skipped"))


def expand_tar(urls: Iterable[str], ctx: StreamContext, *, allow_pipes: bool, allow_remote: bool,
               max_member_size: int | None, num_shards: int = 0, first_draw: int = 0, skip: int = 0) -> Iterator[Item]:
    """Shard URLs -> grouped members (:func:`read_shard`); an unreadable shard becomes one ``bad_shard`` item.

    Train: each item gets its ``draw`` (the URL's index, counted from ``first_draw``) and its
    ``index`` in the shard; a resume continues inside draw ``first_draw`` after its first ``skip``
    items (they are read again, not passed on).
    ``num_shards`` (train: the number of distinct shards the endless draw picks from; 0: no check):
    when every one of them, drawn in a row, held no sample at all (empty tars, which img2dataset
    writes when all of a shard's downloads failed), the stream would spin forever without a batch
    or a skip to count: it raises ``DataErrorBudgetExceeded`` saying so."""
    empty: set[str] = set()
    for d, url in enumerate(urls, start=first_draw):
        got = False
        for i, item in enumerate(read_shard(url, allow_pipes=allow_pipes, allow_remote=allow_remote,
                                            max_member_size=max_member_size)):
            got = True
            if d == first_draw and i < skip:
                continue
            item.draw, item.index = d, i
            yield item
        if got:
            empty.clear()
        elif num_shards:
            empty.add(url)
            if len(empty) >= num_shards:
                raise DataErrorBudgetExceeded(
                    f"the training shards hold no sample: all {num_shards} shard(s) of rank {ctx.rank} "
                    f"(e.g. {url}) are empty tars; check data.train")


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


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def shuffle(items: Iterable[Item], ctx: StreamContext, *, bufsize: int, snapshot_every: int = 0,
            restore: tuple[Callable[[], list[Item]], list | None] | None = None) -> Iterator[Item]:
    """Train: a shuffle buffer of ``bufsize`` items (items, not decoded images, are buffered).

    Every ``snapshot_every`` items passed on (0: never), the item passed on carries a *snapshot*
    of the stream's state after it: ``{"draw", "index"}`` (the next item to read: draw ``draw``'s
    shard from its item ``index``), ``"buffer"`` (the buffered items as ``[draw, index]`` pairs) and
    ``"rng"`` (the buffer's RNG state); ``number`` adds its ``"position"``. ``restore``
    ``(fetch, rng)`` continues from one: ``fetch()`` returns the buffered items, read again."""
    rng = ctx.rng("shuffle")
    buf: list[Item] = []
    if restore is not None:
        fetch, state = restore
        buf = fetch()
        if state is not None:
            _set_rng_state(rng, state)
    shuffling = bufsize > 1
    passed = 0
    for item in items:
        if shuffling:
            if len(buf) < bufsize:
                buf.append(item)
                continue
            j = rng.randrange(bufsize)
            out, buf[j] = buf[j], item
        else:
            out = item
        passed += 1
        if snapshot_every and passed % snapshot_every == 0:
            out.snapshot = {"draw": item.draw, "index": item.index + 1, "buffer": [[b.draw, b.index] for b in buf],
                            "rng": _rng_state(rng) if shuffling else None}
        yield out
    if shuffling:
        rng.shuffle(buf)
        yield from buf


def fetch_items(refs: Sequence[Sequence[int]], ctx: StreamContext, *, sources: Sequence[Source], allow_pipes: bool,
                allow_remote: bool, max_member_size: int | None) -> list[Item]:
    """Train, resume: the items ``[draw, index]`` of this worker's stream, read again (each shard once, up to
    the last item wanted) and made records; an item its shard no longer holds is a ``bad_shard`` error."""
    wanted: dict[int, set[int]] = {}
    for d, i in refs:
        wanted.setdefault(int(d), set()).add(int(i))
    urls = list(itertools.islice(shard_draws(ctx, sources), max(wanted) + 1)) if wanted else []
    found: dict[tuple[int, int], Item] = {}
    for d in sorted(wanted):
        last = max(wanted[d])
        shard = read_shard(urls[d], allow_pipes=allow_pipes, allow_remote=allow_remote, max_member_size=max_member_size)
        for i, item in enumerate(shard):
            if i in wanted[d]:
                item.draw, item.index = d, i
                found[(d, i)] = item
            if i >= last:
                break
        shard.close()
    out = []
    for d, i in refs:
        item = found.get((int(d), int(i)))
        if item is None:
            url = urls[int(d)]
            item = Item(key=url, url=url, draw=int(d), index=int(i), error=BadSample(
                url, BAD_SHARD, f"its item {i} is gone: the shard changed since the checkpoint was saved"))
        out.append(item)
    return list(to_records(out, ctx))


def number(items: Iterable[Item], ctx: StreamContext, *, resume: dict | None) -> Iterator[Item]:
    """Give each item its position; skip (before any decoding) the positions a resumed run consumed.

    A resume from a snapshot counts from the snapshot's position (the stages before restored its
    state); a snapshot on a skipped item travels on with the next item passed on."""
    snapshot = (resume or {}).get("snapshot")
    base = int(snapshot["position"]) if snapshot else 0
    start = int(resume["position"]) if resume else 0
    done = set(resume.get("done", ())) if resume else set()
    carried: list[dict] = []
    for pos, item in enumerate(items, start=base):
        if item.snapshot is not None:
            item.snapshot["position"] = pos + 1
            carried.append(item.snapshot)
            item.snapshot = None
        if pos < start or pos in done:
            continue
        if carried:
            item.snapshot, carried = carried[-1], []
        item.position = pos
        yield item


def _sample_rng(ctx: StreamContext, item: Item, purpose: str = "sample") -> random.Random:
    if ctx.split == "eval":  # independent of how the pass is split over ranks and workers
        return random.Random(f"{purpose}:{ctx.seed}:{item.key}")
    return ctx.rng(purpose, item.position)


def select_target(items: Iterable[Item], ctx: StreamContext, *, mode: str, vqa_suffix: str,
                  caption_conversation: Callable[[str], list[dict]], caption_first: int = 0,
                  mixed_weights: dict[str, float] | None = None,
                  question_pattern: re.Pattern | None = None) -> Iterator[Item]:
    """Record -> the conversation to train (before decoding: a record without target costs nothing).
    Training positions below this worker's share of ``caption_first`` train captions where present;
    ``question_pattern`` keeps the matching questions only (``mmlm.data.targets.filter_turns``)."""
    first = -(-caption_first // ctx.units) if ctx.split == "train" else 0  # ceil: this worker's share
    for item in items:
        if item.error is None:
            m = mode
            if item.position < first and "caption" in present_kinds(item.record):
                m = "caption"
            try:
                item.conversation = record_to_conversation(item.record, m, _sample_rng(ctx, item),
                                                           caption_conversation=caption_conversation,
                                                           vqa_suffix=vqa_suffix, mixed_weights=mixed_weights,
                                                           question_pattern=question_pattern)
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


def label_prompt(enc: dict, image_token_id: int) -> dict:
    """``enc`` with labels on every token but the image tokens: the user turns (the questions) and
    the template's tokens train too, not only the assistant's answers."""
    ids = enc["input_ids"]  # (L,)
    labels = ids.clone()
    labels[ids == image_token_id] = -100
    return {**enc, "labels": labels}


def encode(items: Iterable[Item], ctx: StreamContext, *, processor, max_sample_length: int | None,
           pixel_dtype: str = "float", prompt_loss_fraction: float = 0.0) -> Iterator[Item]:
    """Conversation + images -> ``processor.encode`` output (``pixel_dtype``: ``float`` or ``uint8``).
    A seeded ``prompt_loss_fraction`` of the samples also label their prompts (``label_prompt``).
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
                    item.error = BadSample(item.key, TOO_LONG, f"cannot be cut to max_length={max_len} (an image "
                                                               "span or every answer token is past it)")
                elif enc["input_ids"].numel() >= max_len and not bool((enc["labels"] != -100).any()):
                    # truncation cut every answer token (a template that masks every label makes the
                    # processor raise: an encode_error naming the template; the trainer's preflight
                    # stops such a run before any data is read)
                    item.error = BadSample(item.key, TOO_LONG, f"no answer token left within max_length={max_len}")
                elif max_sample_length is not None and enc["input_ids"].numel() > max_sample_length:
                    item.error = BadSample(item.key, TOO_LONG, f"{enc['input_ids'].numel()} tokens > packed row "
                                                               f"length {max_sample_length}")
                else:
                    if prompt_loss_fraction > 0 and _sample_rng(ctx, item, "prompt_loss").random() < prompt_loss_fraction:
                        enc = label_prompt(enc, processor.image_token_id)
                    item.sample = {**enc, "key": item.key, "position": item.position}
        item.images = item.conversation = item.record = None
        yield item


MAX_FILTERED_IN_A_ROW = 100_000
"""Train: this many filtered items (``no_target``) in a row, without a good one, stop the stream."""

MAX_BAD_SHARDS_IN_A_ROW = 100
"""Train: this many unreadable shards (``bad_shard``) in a row, without a good item, stop the stream whatever the
error budget says (with ``max_bad_fraction`` None the endless stream would retry them forever, silently)."""


def handle_errors(items: Iterable[Item], ctx: StreamContext, *, budget: ErrorBudget,
                  max_filtered_in_a_row: int | None = None) -> Iterator[Item]:
    """Count (and log) every bad item, count good ones; stop past the budget. Items pass on.

    Filtered items (``no_target``) are not bad data, but the training stream is endless: when
    ``max_filtered_in_a_row`` (default :data:`MAX_FILTERED_IN_A_ROW`; 0: never) of them come in a row
    with no good item, nothing in the data has what ``sample_mode`` / ``question_pattern`` select and
    the stream would search forever: it raises ``DataErrorBudgetExceeded`` saying so."""
    limit = MAX_FILTERED_IN_A_ROW if max_filtered_in_a_row is None else int(max_filtered_in_a_row)
    in_a_row = shards_in_a_row = 0
    where = f" in {budget.where}" if budget.where else ""
    for item in items:
        if item.error is not None:
            budget.skip(item.error, item.url)
            train = ctx.split == "train"
            shards_in_a_row += train and item.error.reason == BAD_SHARD
            if shards_in_a_row >= MAX_BAD_SHARDS_IN_A_ROW:
                raise DataErrorBudgetExceeded(
                    f"no training sample{where}: {shards_in_a_row} shards in a row could not be read (last: "
                    f"{item.url}: {item.error.detail}); check the shards and their access (pipe: commands, credentials)")
            if item.error.reason in FILTERED and train and limit:
                in_a_row += 1
                if in_a_row >= limit:
                    raise DataErrorBudgetExceeded(
                        f"no training sample{where} in {in_a_row} records in a row: every one was skipped as "
                        f"{item.error.reason} (last: {item.error.key!r}: {item.error.detail}); the training data has "
                        "nothing that data.sample_mode and data.question_pattern select: check them and the shards")
        else:
            in_a_row = shards_in_a_row = 0
            budget.ok()
        yield item


def batch(items: Iterable[Item], ctx: StreamContext, *, collate, batch_size: int, resume: dict | None) -> Iterator[dict]:
    """Good samples -> collated batches carrying ``loader_state`` and ``skipped`` (``mmlm.data.stream`` module doc).

    The last batch is held back until the next one exists (or the stream ends), so that skips
    after the last sample of a finite pass are still reported with it."""
    frontier = int(resume["position"]) if resume else 0
    done: set[int] = set(resume.get("done", ())) if resume else set()
    emitted = int(resume.get("emitted", 0)) if resume else 0
    batches = int(resume.get("batches", 0)) if resume else 0
    snapshot = resume.get("snapshot") if resume else None  # the newest one at or before the frontier
    sent = snapshot  # the last one a batch carried (or the resume's)
    snapshots: dict[int, dict] = {}  # position -> snapshot, beyond the frontier still
    last_seen = frontier - 1
    pending: list[Item] = []
    pending_tokens = 0
    skipped: Counter = Counter()
    held: dict | None = None

    def advance() -> None:
        nonlocal frontier, done, snapshot
        frontier = max(frontier, min(i.position for i in pending) if pending else last_seen + 1)
        while frontier in done:
            frontier += 1
        done = {p for p in done if p >= frontier}
        reached = [p for p in snapshots if p <= frontier]
        if reached:
            snapshot = snapshots[max(reached)]
            for p in reached:
                del snapshots[p]

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
        nonlocal sent
        out = {"split": ctx.split, "rank": ctx.rank, "world_size": ctx.world_size, "worker": ctx.worker,
               "num_workers": ctx.num_workers, "seed": ctx.seed, "epoch": ctx.epoch, "position": frontier,
               "done": sorted(done), "emitted": emitted, "batches": batches}
        if snapshot is not sent:  # only the batch that reaches a new snapshot carries it (10-20 kB)
            out["snapshot"] = sent = snapshot
        return out

    for item in items:
        last_seen = item.position
        if item.snapshot is not None:
            snapshots[item.snapshot["position"]] = item.snapshot
            item.snapshot = None
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
