"""``VLMDataModule``: webdataset shards -> training/validation DataLoaders, with exact resume.

Contract:

* Constructed from plain, typed arguments (they are the ``data`` section of ``mmlm fit``); shard
  specs are checked at construction (pipes/URLs refused unless allowed), expanded when a
  DataLoader is built.
* ``attach_processor(processor)`` must be called before any DataLoader is built (the trainer does
  it; the processor is built with the model). The streams use a shallow copy of it whose
  ``max_length`` is this module's (when set) and whose ``on_overflow`` is ``"drop"``, so a sample
  that overflows into an image span is skipped and counted instead of stopping the run.
* ``train_dataloader()``: the resampled endless stream (``mmlm.data.stream``), one batch per
  DataLoader step (batching and collation happen in the workers). The loader keeps its iterator
  alive across ``iter()`` calls (Lightning's "epochs" over an endless stream are chunks of the
  same stream, not restarts); the trainer bounds training with ``max_steps`` (or
  ``limit_train_batches``).
* Batches carry ``pixel_values`` as uint8 RGB by default (``uint8_pixels``); ``VLM.encode_images``
  normalises them on the model's device, to exactly the processor's float values.
* ``val_dataloader()``: a finite pass in which every sample is seen exactly once over all ranks
  and workers; ``[]`` when no ``val`` is given. Under several processes a rank without a single
  validation batch validates nothing, and with a module whose logged values Lightning syncs it hangs the
  run (``VLMModule`` reduces val/loss itself; see ``mmlm.data.val_units``), so when
  ``val`` has fewer shards than ``world_size * max(1, num_workers)`` units (samples are then split
  over the units one by one) the val loader counts the samples (tar headers only; it stops at one
  sample per unit) and uses fewer workers where needed so that every unit of every rank gets one
  (:func:`val_worker_count`; logged at INFO); fewer samples than processes is a ``ValueError``.
  Limits: with at least that many shards (whole shards per unit) nothing is counted, so an empty
  shard can still starve a unit; and a count includes the samples that will be skipped (corrupt,
  too long, filtered: each unit's share is known only once its pass has run), so a rank whose
  samples are all skipped still gets no batch.
* **The trainer calls** ``record_consumed(batch)`` after each training step (and may call it with
  validation batches too, for their skip counts). It records the batch's ``loader_state`` (the
  position of the worker that made it) and adds its ``skipped`` counts; past the error budget over
  all consumed batches it raises ``DataErrorBudgetExceeded``. Calling it twice for the same batch
  is harmless for positions but counts its skips twice: call it once per batch.
* ``state_dict()`` / ``load_state_dict()`` (Lightning stores them in checkpoints) hold the seed,
  epoch, and per rank: batches and samples consumed, each worker's position (with its newest resume
  snapshot, ``snapshot_every``: a resume re-reads a bounded number of samples) and skip counts.
  Under ``torch.distributed`` ``state_dict()`` gathers every rank's part (it is a collective:
  all ranks call it, as Lightning does when saving). A DataLoader built after
  ``load_state_dict`` continues exactly where the saved run stopped (same samples, same order),
  provided seed, ``num_workers`` and world size are unchanged (else a clear error, or with
  ``strict_resume=False`` a warning and a fresh stream at the next epoch).
* DataLoader workers ignore SIGTERM, SIGUSR1 and SIGINT while the training process runs
  (:func:`shield_stop_signals`): when a cluster signals every process of a job, the training
  process saves its checkpoint and stops them.
* ``skipped_counts(split="train")``: skipped samples by reason over the consumed batches
  (``"val"``: over the validation batches passed to ``record_consumed``; ``"all"``: both).
  ``no_target`` (records ``sample_mode`` cannot use) is counted there but is not an error: it does
  not count against the budget (see ``mmlm.data.errors``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from collections import Counter
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from mmlm.data.collate import PackCollate, PadCollate
from mmlm.data.decode import DEFAULT_MAX_PIXELS
from mmlm.data.errors import LOGGER_NAME, DataErrorBudgetExceeded, bad_count, budget_message, budget_violation
from mmlm.data.sources import parse_sources, resolve_sources
from mmlm.data.stream import StreamConfig, VLMStream, detect_rank_world
from mmlm.data.targets import check_mixed_weights, check_sample_mode, compile_question_pattern
from mmlm.data.val_units import val_worker_count

__all__ = ["VLMDataModule", "StreamLoader"]

STATE_VERSION = 1
log = logging.getLogger(LOGGER_NAME)


def _identity(x):
    return x


class StreamLoader(DataLoader):
    """A ``DataLoader`` over an endless :class:`VLMStream` whose iterator lives across ``iter()``
    calls. When its iterator was shut down (Lightning's teardown), the next ``iter()`` asks
    ``refresh()`` for ``(resume, worker_offset)`` and continues from the consumed position."""

    def __init__(self, dataset: VLMStream, *, refresh=None, **kwargs: Any):
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)
        self._refresh = refresh

    def __iter__(self):
        it = self._iterator
        if it is None or getattr(it, "_shutdown", False):
            if self._refresh is not None:
                self.dataset.set_resume(*self._refresh())
            it = self._get_iterator()
            self._iterator = it
        return it


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
_SHIELD = None  # set while this (training) process runs; cleared when it exits


def _stop_signal_shield():
    """The event that tells the DataLoader workers to ignore :data:`STOP_SIGNALS` (created once, set;
    cleared when this process exits, before ``multiprocessing`` terminates the workers left running)."""
    global _SHIELD
    if _SHIELD is None:
        import atexit
        import multiprocessing

        _SHIELD = multiprocessing.get_context().Event()
        _SHIELD.set()
        atexit.register(_SHIELD.clear)  # runs before multiprocessing's exit handler (registered earlier)
    return _SHIELD


def shield_stop_signals(shield, worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoader workers (``functools.partial(shield_stop_signals, shield)``):
    while ``shield`` is set they ignore SIGTERM, SIGUSR1 and SIGINT (Ctrl-C in a terminal signals the whole
    process group). A cluster stops a job by signalling every
    process of it (SLURM: the whole job step), workers included; a worker killed by it made the training
    process fail ("DataLoader worker ... is killed by signal") before it could save its checkpoint. The
    training process handles the signal (``mmlm.training.callbacks.SignalCheckpoint``) and shuts its
    workers down; a worker still running when it exits is terminated as usual (the shield is cleared
    first), and a worker whose training process died exits by itself."""
    import os
    import signal

    def handler(signum, frame):
        if shield.is_set():
            return  # the training process saves its checkpoint, then stops this worker
        os._exit(0)  # terminated by an exiting training process: what torch's own worker handler does

    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)


def data_seed(seed: Optional[int] = None) -> int:
    """``seed``, or without one the global seed ``seed_everything`` set (``PL_GLOBAL_SEED``), else 0."""
    if seed is not None:
        return int(seed)
    return int(os.environ.get("PL_GLOBAL_SEED") or 0)


class VLMDataModule(pl.LightningDataModule):
    """Streams webdataset shards into VLM training batches (padded or packed), with exact resume."""

    def __init__(
        self,
        train: Union[str, list[Union[str, dict[str, Any]]], dict[str, Any], None] = None,
        val: Union[str, list[Union[str, dict[str, Any]]], dict[str, Any], None] = None,
        batch_size: int = 16,
        val_batch_size: Optional[int] = None,
        num_workers: int = 2,
        packing: bool = False,
        group_by_length: int = 1,
        max_length: Optional[int] = None,
        shuffle_buffer: int = 1000,
        seed: Optional[int] = None,
        sample_mode: str = "auto",
        mixed_weights: Optional[dict[str, float]] = None,
        caption_first_samples: int = 0,
        question_pattern: Optional[str] = None,
        vqa_suffix: str = "",
        prompt_loss_fraction: float = 0.0,
        max_bad_fraction: Optional[float] = 0.05,
        max_bad: Optional[int] = None,
        min_samples: int = 100,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
        allow_pipes: bool = False,
        allow_remote: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        strict_resume: bool = True,
        uint8_pixels: bool = True,
        snapshot_every: int = 1000,
    ):
        """
        Args:
            train: Training shards: a brace pattern (``data/train-{000000..000009}.tar``), a directory
                (its ``*.tar``), a list of them, or a list of ``{shards: ..., weight: ...}`` sources
                mixed by weight. Read as a resampled endless stream. A weight is per shard drawn: a source
                whose shards hold 10x the samples gives 10x the samples per unit of weight (divide its
                weight by its samples per shard to mix by samples). On the command line ``--data.train
                '[A, B]'`` replaces the recipe's shards; ``--data.train+ X`` appends X to them.
            val: Validation shards (same forms; weights ignored), read once per validation pass; None: no validation.
            batch_size: Samples per training batch; with ``packing``, packed rows per batch.
            val_batch_size: Batch size for validation (None: ``batch_size``).
            num_workers: DataLoader worker processes (0: load in the main process).
            packing: Pack several samples per row up to ``max_length`` tokens (no padding waste;
                attention stays within each sample) instead of padding one sample per row.
            group_by_length: Training only, without packing: form each batch from a buffer of this many
                batches' worth of samples: the oldest sample and those nearest to it in length. Far less
                padding (the quickstart's question stages: 0.76 -> 0.94 real tokens, about 1.25x faster
                steps on a CPU); each sample trains at most about this many batches late. 1: batches in
                stream order. Batches of like samples can slow learning: the quickstart's chained
                question stages at 8 reached 87.0% VQA against 95.1% in stream order.
            max_length: Longest sample and, with packing, the packed row length in tokens (None: the processor's).
            shuffle_buffer: Samples in each worker's shuffle buffer (training).
            seed: Seed of the training stream (shard draws, shuffling, mixed-mode choices). None: the
                run's ``seed_everything`` (which Lightning exports as ``PL_GLOBAL_SEED``), else 0, so that
                runs differing only in ``seed_everything`` also read their data in different orders.
            sample_mode: What a record trains: ``auto`` (conversation, else VQA, else caption), ``caption``,
                ``conversation``, ``vqa`` or ``mixed`` (a seeded random pick among what the record has).
            mixed_weights: With ``sample_mode: mixed``, the relative weight of each kind a record has
                (``caption``, ``conversation``, ``vqa``; missing kinds weigh 1), e.g.
                ``{caption: 1, conversation: 3}`` trains conversations three times as often; a kind
                weighing 0 is never trained (a record with nothing else is skipped as ``no_target``).
            caption_first_samples: Curriculum: the first N training samples (all ranks and workers
                together) train their caption whatever ``sample_mode`` says. Captions name every object,
                so a model trained from scratch grounds its image tokens on them before questions ask
                it to find objects by word within one run (the quickstart trains captions and questions
                as separate stages instead: ``configs/tiny-cpu.yaml``, then ``configs/tiny-cpu-vqa.yaml``). 0: none.
            question_pattern: Curriculum: a regular expression; conversations and VQA records train only
                their questions that match it (``re.search``, e.g. ``"^where "``), in training and
                validation; records with none are skipped (``no_target``, not an error); captions are
                not filtered. A stage can drill one kind of question: the quickstart drills the
                colour and position questions its question stage learns last
                (``configs/tiny-cpu-color.yaml``, ``configs/tiny-cpu-where.yaml``).
                None: every question.
            vqa_suffix: Text appended to VQA questions (e.g. a short-answer instruction).
            prompt_loss_fraction: Training only: this fraction of the samples (a seeded draw per sample)
                also trains on its prompt, the questions included, not only on the answers: predicting
                "is there a red [star]" from the image is grounding signal an answer-only loss never
                gives (the quickstart's question stage: 0.3). 0: answers only (validation always is).
            max_bad_fraction: Stop when more than this fraction of samples is bad (after ``min_samples``); None: no limit.
            max_bad: Stop when more than this many samples are bad; None: no limit.
            min_samples: Samples seen before ``max_bad_fraction`` applies.
            max_pixels: Skip images with more pixels than this (decompression-bomb guard; PIL's default limit).
            allow_pipes: Allow ``pipe:CMD`` shard specs (they run shell commands).
            allow_remote: Allow remote shard URLs (``http://``, ``s3://``, ...; read with curl & co).
            pin_memory: Pin batches in page-locked memory (only when CUDA is available).
            persistent_workers: Keep DataLoader workers alive between passes (when ``num_workers > 0``).
            prefetch_factor: Batches prefetched per worker (when ``num_workers > 0``).
            strict_resume: On restoring a checkpoint made with another seed, ``num_workers`` or world size,
                raise (True) or warn and start a fresh stream at the next epoch (False).
            uint8_pixels: Send images as uint8 RGB (the resized image, not normalised) and let the model
                normalise them on its device (``VLM.encode_images``, same values as the processor's): 4x
                fewer bytes from the workers and in pinned memory, no float work in the workers. False:
                normalised float32 pixel values, as ``Processor.encode`` returns by default.
            snapshot_every: Every this many samples, each loader worker records where its stream stands
                (the shard and sample it reads next, its shuffle buffer as references, the buffer's RNG);
                checkpoints keep the newest, so a resume re-reads at most this many samples per worker plus
                the shards its shuffle buffer held, however long the run was. 0: a resume re-reads each
                worker's stream from the start (its cost grows with the run). Does not change the data order.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if group_by_length < 1:
            raise ValueError(f"group_by_length must be >= 1 (1: no grouping), got {group_by_length}")
        if packing and group_by_length > 1:
            raise ValueError("group_by_length applies to padded batches; packing already leaves no padding: "
                             "use one or the other")
        check_sample_mode(sample_mode)
        check_mixed_weights(mixed_weights)
        compile_question_pattern(question_pattern)
        if not 0.0 <= prompt_loss_fraction <= 1.0:
            raise ValueError(f"prompt_loss_fraction must be in [0, 1], got {prompt_loss_fraction}")
        if caption_first_samples < 0:
            raise ValueError(f"caption_first_samples must be >= 0, got {caption_first_samples}")
        if max_bad_fraction is not None and not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0 (0: no snapshots), got {snapshot_every}")
        if prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
        # check the specs' form now (clear errors at construction); expand them when loading
        if train is not None:
            parse_sources(train, allow_pipes=allow_pipes, allow_remote=allow_remote)
        if val is not None:
            parse_sources(val, allow_pipes=allow_pipes, allow_remote=allow_remote)
        self.train_spec, self.val_spec = train, val
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.packing = bool(packing)
        self.group_by_length = int(group_by_length)
        self.max_length = max_length
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = data_seed(seed)
        self.sample_mode = sample_mode
        self.caption_first_samples = int(caption_first_samples)
        self.mixed_weights = dict(mixed_weights) if mixed_weights else None
        self.question_pattern = question_pattern
        self.vqa_suffix = vqa_suffix
        self.prompt_loss_fraction = float(prompt_loss_fraction)
        self.max_bad_fraction = max_bad_fraction
        self.max_bad = max_bad
        self.min_samples = int(min_samples)
        self.max_pixels = max_pixels
        self.allow_pipes = allow_pipes
        self.allow_remote = allow_remote
        self.pin_memory = pin_memory
        self.uint8_pixels = bool(uint8_pixels)
        self.snapshot_every = int(snapshot_every)
        self.persistent_workers = persistent_workers
        self.prefetch_factor = int(prefetch_factor)
        self.strict_resume = strict_resume
        self.processor = None
        self.epoch = 0
        self._workers: dict[int, dict] = {}  # logical worker -> {"position", "done", "emitted", "batches", "snapshot"}
        self._batches = 0
        self._samples = 0
        self._curriculum_done = 0  # samples (all ranks) earlier streams of this run trained: caption_first counts them
        self._skipped: dict[str, Counter] = {"train": Counter(), "val": Counter()}
        self._restored: dict | None = None

    # ------------------------------------------------------------------ wiring
    def attach_processor(self, processor) -> None:
        """Give the module the model's processor (before any DataLoader is built)."""
        self.processor = processor

    def _data_processor(self):
        if self.processor is None:
            raise RuntimeError("VLMDataModule needs a processor: call datamodule.attach_processor(processor) "
                               "before building DataLoaders")
        proc = copy.copy(self.processor)
        max_length = self.max_length or proc.config.max_length
        proc.config = dataclasses.replace(proc.config, max_length=int(max_length), on_overflow="drop")
        return proc

    def _collate(self, proc, split: str = "eval"):
        if self.packing:
            return PackCollate(proc, proc.config.max_length)
        return PadCollate(proc, self.group_by_length if split == "train" else 1)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return detect_rank_world()

    @property
    def _logical_workers(self) -> int:
        return max(1, self.num_workers)

    def _stream_config(self, split: str, batch_size: int) -> StreamConfig:
        return StreamConfig(
            split=split, batch_size=batch_size, seed=self.seed, epoch=self.epoch, shuffle_buffer=self.shuffle_buffer,
            sample_mode=self.sample_mode, vqa_suffix=self.vqa_suffix, max_pixels=self.max_pixels,
            caption_first_samples=max(0, self.caption_first_samples - self._curriculum_done) if split == "train" else 0,
            mixed_weights=self.mixed_weights, question_pattern=self.question_pattern,
            prompt_loss_fraction=self.prompt_loss_fraction if split == "train" else 0.0,
            max_bad_fraction=self.max_bad_fraction, max_bad=self.max_bad, min_samples=self.min_samples,
            allow_pipes=self.allow_pipes, allow_remote=self.allow_remote, uint8_pixels=self.uint8_pixels,
            snapshot_every=self.snapshot_every,
        )

    def _loader_kwargs(self, num_workers: Optional[int] = None) -> dict:
        num_workers = self.num_workers if num_workers is None else int(num_workers)
        kw: dict[str, Any] = {"num_workers": num_workers,
                              "pin_memory": bool(self.pin_memory and torch.cuda.is_available())}
        if num_workers > 0:
            kw["persistent_workers"] = self.persistent_workers
            kw["prefetch_factor"] = self.prefetch_factor
            kw["worker_init_fn"] = functools.partial(shield_stop_signals, _stop_signal_shield())
        return kw

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> StreamLoader:
        """The resampled endless training stream (continues from the consumed position)."""
        if self.train_spec is None:
            raise ValueError("no training shards: pass train=... to VLMDataModule")
        proc = self._data_processor()
        sources = resolve_sources(self.train_spec, allow_pipes=self.allow_pipes, allow_remote=self.allow_remote)
        rank, world = self._rank_world()
        self._apply_restored(rank, world)
        stream = VLMStream(sources, proc, self._collate(proc, "train"), self._stream_config("train", self.batch_size),
                           rank=rank, world_size=world)
        stream.set_resume(*self._resume_args())
        return StreamLoader(stream, refresh=self._resume_args, **self._loader_kwargs())

    def val_dataloader(self):
        """A finite pass over ``val`` (every sample exactly once over ranks and workers); [] without val."""
        if self.val_spec is None:
            return []
        proc = self._data_processor()
        sources = resolve_sources(self.val_spec, allow_pipes=self.allow_pipes, allow_remote=self.allow_remote)
        rank, world = self._rank_world()
        config = self._stream_config("eval", self.val_batch_size)
        workers = self._val_workers(sources, world, config)
        stream = VLMStream(sources, proc, self._collate(proc), config, rank=rank, world_size=world)
        return DataLoader(stream, batch_size=None, collate_fn=_identity, **self._loader_kwargs(workers))

    def _val_workers(self, sources, world: int, config: StreamConfig) -> int:
        """The val loader's worker count: fewer than ``num_workers`` when a small val set would leave a loader
        unit (and possibly a whole rank, which then hangs the others) without a sample (:func:`val_worker_count`)."""
        shards = [url for src in sources for url in src.shards]  # in the stream's order (list_shards)
        workers = val_worker_count(shards, world, self.num_workers, allow_pipes=self.allow_pipes,
                                   allow_remote=self.allow_remote, max_member_size=config.max_member_size)
        if workers != self.num_workers:
            log.info("data.val is small for %d processes x %d loader workers: validating with num_workers=%d so that "
                     "every process and worker gets at least one sample", world, max(1, self.num_workers), workers)
        return workers

    # ------------------------------------------------------------------ consumption and counts
    def record_consumed(self, batch: dict) -> None:
        """Record that ``batch`` was consumed (trained on): its worker's position and its skip counts.
        Raises ``DataErrorBudgetExceeded`` past the budget over all consumed training batches."""
        state = batch.get("loader_state") or {}
        skipped = batch.get("skipped") or {}
        if state.get("split", "train") != "train":
            self._skipped["val"].update(skipped)
            return
        if "worker" in state:
            worker = int(state["worker"])
            snapshot = state.get("snapshot") or self._workers.get(worker, {}).get("snapshot")  # sent when it changes
            self._workers[worker] = {k: state[k] for k in ("position", "done", "emitted", "batches") if k in state}
            if snapshot is not None:
                self._workers[worker]["snapshot"] = snapshot
        self._batches += 1
        self._samples += int(batch.get("num_samples", 0))
        self._skipped["train"].update(skipped)
        counts = self._skipped["train"]
        why = budget_violation(self._samples, bad_count(counts), max_bad_fraction=self.max_bad_fraction,
                               max_bad=self.max_bad, min_samples=self.min_samples)
        if why is not None:
            raise DataErrorBudgetExceeded(budget_message(why, counts, where="the consumed training batches"))

    def skipped_counts(self, split: str = "train") -> dict[str, int]:
        """Skipped samples by reason: ``train`` (consumed batches), ``val`` or ``all``."""
        if split == "all":
            return dict(self._skipped["train"] + self._skipped["val"])
        if split not in self._skipped:
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        return dict(self._skipped[split])

    @property
    def consumed_samples(self) -> int:
        """Training samples consumed by this rank (over resumes)."""
        return self._samples

    @property
    def consumed_batches(self) -> int:
        return self._batches

    # ------------------------------------------------------------------ state
    def _resume_args(self) -> tuple[dict, int]:
        return copy.deepcopy(self._workers), self._batches % self._logical_workers

    def _local_state(self) -> dict:
        return {"batches": self._batches, "samples": self._samples,
                "workers": {str(w): copy.deepcopy(s) for w, s in self._workers.items()},
                "skipped": dict(self._skipped["train"])}

    def state_dict(self) -> dict[str, Any]:
        """The loader position (all ranks' parts; a collective under torch.distributed)."""
        rank, world = self._rank_world()
        if self._restored is not None:  # restored but no loader built since: keep the restored position
            self._apply_restored(rank, world)
        local = self._local_state()
        parts = {rank: local}
        import torch.distributed as dist

        if world > 1 and dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (rank, local))
            parts = {r: s for r, s in gathered}
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch,
                "num_workers": self._logical_workers, "world_size": world, "stream": self._stream_identity(),
                "curriculum_done": self._curriculum_done, "ranks": {str(r): s for r, s in sorted(parts.items())}}

    def _stream_identity(self) -> dict[str, str]:
        """What decides which samples the training stream yields in which order (besides seed and workers): a
        saved position means the same samples only in a stream with the same (checked on resume)."""
        return {name: repr(value) for name, value in (
            ("train", self.train_spec), ("shuffle_buffer", self.shuffle_buffer), ("sample_mode", self.sample_mode),
            ("mixed_weights", self.mixed_weights), ("question_pattern", self.question_pattern),
            ("caption_first_samples", self.caption_first_samples), ("packing", self.packing),
            ("group_by_length", self.group_by_length), ("max_length", self.max_length))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``; applied when the next train DataLoader is built."""
        if not isinstance(state_dict, dict) or state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"not a VLMDataModule state (version {STATE_VERSION} expected): {str(state_dict)[:200]}")
        self._restored = copy.deepcopy(state_dict)

    def _apply_restored(self, rank: int, world: int) -> None:
        state, self._restored = self._restored, None
        if state is None:
            return
        saved = (state["seed"], state["num_workers"], state["world_size"])
        now = (self.seed, self._logical_workers, world)
        part = state["ranks"].get(str(rank))
        then, current = state.get("stream"), self._stream_identity()  # (None: a state saved before it was kept)
        changed = [f"{k}={current.get(k)} (checkpoint: {v})" for k, v in (then or {}).items() if current.get(k) != v]
        if saved != now or part is None:
            def workers(n: int) -> str:  # one data stream per loader worker; num_workers=0: one, in the main process
                return "num_workers=0 or 1" if n == 1 else f"num_workers={n}"

            msg = (f"the checkpoint's data loader state was saved with seed={saved[0]}, {workers(saved[1])}, "
                   f"world_size={saved[2]} but this run has seed={now[0]}, {workers(now[1])}, world_size={now[2]}")
            fix = "exact resume needs the same"
        elif changed:
            msg = ("the training data options changed since the checkpoint's loader state was saved: "
                   + "; ".join(changed) + ", so its position does not mean the same samples")
            fix = "resume with the checkpoint's data options"
        if saved != now or part is None or changed:
            if self.strict_resume:
                raise ValueError(f"{msg}; {fix} (or pass --data.strict_resume false, in Python strict_resume=False, "
                                 "to start a fresh stream at the next epoch)")
            total = sum(int(p.get("samples", 0)) for p in state["ranks"].values())  # all ranks, over the whole run
            self._curriculum_done = total
            left = max(0, self.caption_first_samples - total)
            curriculum = (f"; the caption_first_samples curriculum goes on where it stood ({left} of "
                          f"{self.caption_first_samples} samples left)" if self.caption_first_samples else "")
            log.warning("%s: starting a fresh training stream at epoch %d (not an exact resume)%s", msg,
                        state["epoch"] + 1, curriculum)
            self.epoch = int(state["epoch"]) + 1
            # this rank's share of the samples consumed so far (its own when the ranks are the same)
            self._samples = int(part["samples"]) if part is not None and saved[2] == world else total // world
            self._batches = 0
            self._workers = {}
            self._skipped["train"] = Counter(part["skipped"]) if part else Counter()
            return
        self.epoch = int(state["epoch"])
        self._curriculum_done = int(state.get("curriculum_done", 0))
        self._batches = int(part["batches"])
        self._samples = int(part["samples"])
        self._workers = {int(w): dict(s) for w, s in part["workers"].items()}
        self._skipped["train"] = Counter(part["skipped"])
