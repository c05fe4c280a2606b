"""Lightning callbacks (and the non-finite-loss guard) of a training run.

- :class:`TrainingMonitor`: throughput and learning rates in the progress bar and the logs:
  ``perf/samples_per_s``, ``perf/tokens_per_s`` (padded tokens the model processed),
  ``perf/real_tokens_per_s`` and ``perf/real_token_frac`` (non-padding share), ``lr/<component>``,
  ``data/skipped`` (training samples the data module skipped, this rank's, since the run began) and
  ``data/skipped/<reason>`` per reason (``corrupt_image``, ``too_long``, ``bad_shard``, ...: the
  reasons seen so far), and after each validation pass ``data/val_skipped`` (the samples that pass
  skipped, summed over ranks). Rates are averaged over the last ``window`` batches and scaled by the
  world size (every rank reads equal batches).
- :class:`NonFiniteGuard`: used by :class:`mmlm.training.module.VLMModule`: a non-finite loss skips
  the optimizer step (counted in ``train/nonfinite_skipped``); ``max_in_a_row`` consecutive ones
  abort the run with :class:`NonFiniteLossError`.
- :class:`SignalCheckpoint`: SIGTERM / SIGUSR1 (e.g. a cluster's pre-emption notice) or SIGINT (Ctrl-C; a
  second one stops at once, without a checkpoint) during training
  save ``<checkpoint dir>/last.ckpt`` after the current step (its metrics are logged), then the
  run stops before the next step with :class:`TrainingInterrupted` (``mmlm fit`` exits with
  128 + the signal number); resume with ``--ckpt_path last``. A validation due right after that
  step (or one the signal came in) runs first and ``last.ckpt`` is written again at its end, so the
  resumed run misses no validation. In multi-process runs one rank receiving the signal is enough.
- :class:`StepCheckpoint`: Lightning's ``ModelCheckpoint`` (``mmlm fit``'s ``checkpoint`` section),
  except that a step's save waits for the validation that runs right after that step (the best
  checkpoint is ranked by that step's own ``val/loss``, not the previous validation's), and that
  ``last.ckpt`` is written every ``every_n_train_steps`` even before the first validation or without
  validation data.
- :class:`ExportModel`: at the end of a successful fit, rank 0 writes ``RUN_DIR/model`` with
  :func:`mmlm.checkpoint.save_pretrained` (LoRA adapters merged), loadable by ``mmlm.load``.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


# ---------------------------------------------------------------------------------- non-finite loss
class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


class NonFiniteGuard:
    """Counts non-finite losses: each one skips its step; ``max_in_a_row`` consecutive ones raise
    :class:`NonFiniteLossError` (0: never)."""

    def __init__(self, max_in_a_row: int = 10):
        if max_in_a_row < 0:
            raise ValueError(f"max_nonfinite must be >= 0, got {max_in_a_row}")
        self.max_in_a_row = int(max_in_a_row)
        self.skipped = 0
        self.in_a_row = 0

    def update(self, finite: bool, step: int | None = None) -> bool:
        """Record one loss; True when the step may proceed."""
        if finite:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            where = f" (last at step {step})" if step is not None else ""
            raise NonFiniteLossError(
                f"the loss was non-finite (NaN/inf) {self.in_a_row} times in a row{where}; {self.skipped} steps "
                "skipped in all. Lower the learning rate, add gradient clipping (--trainer.gradient_clip_val 1.0), "
                "prefer bf16-mixed to 16-mixed, or check the data (a batch whose labels are all masked has no loss)"
            )
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))


# ---------------------------------------------------------------------------------- throughput
class TrainingMonitor(pl.Callback):
    """Throughput, learning rates and skipped samples in the progress bar and the logs.

    Samples/s, tokens/s, the real-token fraction, the learning rates and the skipped samples.

    Every batch is counted, but the values are handed to Lightning (``log_dict``) only on the steps
    its loggers write (``log_every_n_steps``) and, for the progress bar, every ``bar_every`` steps:
    each logged value costs Lightning ~0.5 ms of bookkeeping, and the ~11 values per step were 4% of
    a small model's CPU step (``benchmarks/train_throughput.py``, Lightning overhead)."""

    def __init__(self, window: int = 20, prog_bar: bool = True, bar_every: int = 10):
        """
        Args:
            window: batches the throughput is averaged over.
            prog_bar: show samples/s, tokens/s and the learning rate in the progress bar.
            bar_every: refresh those progress-bar values every this many steps.
        """
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if bar_every < 1:
            raise ValueError(f"bar_every must be >= 1, got {bar_every}")
        self.window = window
        self.prog_bar = prog_bar
        self.bar_every = bar_every
        self._hist: collections.deque = collections.deque(maxlen=window + 1)
        self._t_start: float | None = None
        self._lrs: dict[str, float] = {}
        self._val_skipped_before = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._hist.clear()
        self._t_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t_start is None:
            self._t_start = time.perf_counter()
        # the rates this batch's optimizer step uses: Lightning steps the scheduler before
        # on_train_batch_end, where the groups already hold the next step's rates
        self._lrs = self.learning_rates(trainer)

    @staticmethod
    def _counts(batch: Any) -> tuple[int, int, int]:
        if not isinstance(batch, dict):
            return 0, 0, 0
        ids = batch.get("input_ids")
        total = int(batch.get("total_tokens", ids.numel() if ids is not None else 0))
        real = batch.get("real_tokens")
        if real is None:
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else total
        samples = batch.get("num_samples")
        if samples is None:
            samples = ids.shape[0] if ids is not None else 0
        return int(samples), int(real), int(total)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        samples, real, total = self._counts(batch)
        if not self._hist and self._t_start is not None:
            self._hist.append((self._t_start, 0, 0, 0))
        self._hist.append((now, samples, real, total))
        to_logger = self._logger_due(trainer)
        to_bar = (self.prog_bar and getattr(trainer, "progress_bar_callback", True) is not None
                  and ((int(trainer.global_step) - 1) % self.bar_every == 0 or to_logger))
        if not (to_logger or to_bar):
            return
        world = max(1, int(trainer.world_size))
        metrics: dict[str, float] = {}
        if len(self._hist) >= 2:
            dt = self._hist[-1][0] - self._hist[0][0]
            s = sum(h[1] for h in list(self._hist)[1:])
            r = sum(h[2] for h in list(self._hist)[1:])
            t = sum(h[3] for h in list(self._hist)[1:])
            if dt > 0:
                metrics["perf/samples_per_s"] = world * s / dt
                metrics["perf/tokens_per_s"] = world * t / dt
                metrics["perf/real_tokens_per_s"] = world * r / dt
        if total:
            metrics["perf/real_token_frac"] = real / total
        lrs = self._lrs
        for comp, lr in lrs.items():
            metrics[f"lr/{comp}"] = lr
        dm = getattr(trainer, "datamodule", None)
        if to_logger:
            metrics.update(self.skip_metrics(dm))
        if metrics and to_logger:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(1, samples))
        if to_bar:
            bar = {}
            if "perf/samples_per_s" in metrics:
                bar["samples/s"] = metrics["perf/samples_per_s"]
                bar["tok/s"] = metrics["perf/tokens_per_s"]
            if lrs:
                bar["lr"] = lrs.get("lm", next(iter(lrs.values())))
            if bar:
                pl_module.log_dict(bar, on_step=True, on_epoch=False, prog_bar=True, logger=False,
                                   batch_size=max(1, samples))

    @staticmethod
    def skip_metrics(dm) -> dict[str, float]:
        """``data/skipped`` and ``data/skipped/<reason>`` from ``dm.skipped_counts()`` ({} without one)."""
        if not hasattr(dm, "skipped_counts"):
            return {}
        try:
            counts = dm.skipped_counts() or {}
        except Exception:  # noqa: BLE001 - a monitoring failure must not stop training
            return {}
        out = {"data/skipped": float(sum(int(v) for v in counts.values()))}
        out.update({f"data/skipped/{reason}": float(n) for reason, n in sorted(counts.items())})
        return out

    @staticmethod
    def _val_skipped(trainer) -> int | None:
        dm = getattr(trainer, "datamodule", None)
        try:
            return int(sum(dm.skipped_counts("val").values())) if hasattr(dm, "skipped_counts") else None
        except Exception:  # noqa: BLE001
            return None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_skipped_before = self._val_skipped(trainer) or 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        now = self._val_skipped(trainer)
        if now is None or trainer.sanity_checking or getattr(trainer.state, "fn", "fit") != "fit":
            return
        # every rank logs the key (a collective under sync_dist): the pass's skips, summed over ranks
        pl_module.log("data/val_skipped", float(now - self._val_skipped_before), on_step=False, on_epoch=True,
                      sync_dist=True, reduce_fx="sum", batch_size=1)

    @staticmethod
    def _logger_due(trainer) -> bool:
        """Whether Lightning writes this step's logged values (its own ``log_every_n_steps`` test,
        made right after this hook); True when it cannot tell."""
        if getattr(trainer, "fast_dev_run", False):
            return True
        try:
            return bool(trainer._logger_connector.should_update_logs)
        except Exception:  # noqa: BLE001 - another Lightning version: log every step, as before
            return True

    @staticmethod
    def learning_rates(trainer) -> dict[str, float]:
        """``{component: lr}`` of the first optimizer's groups."""
        out: dict[str, float] = {}
        for opt in trainer.optimizers[:1]:
            for i, group in enumerate(opt.param_groups):
                name = group.get("component", f"group{i}")
                out.setdefault(name, float(group["lr"]))
        return out


# ---------------------------------------------------------------------------------- signals
class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, path: str | None):
        self.signum = int(signum)
        self.path = path
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name if self.signum in {s.value for s in signal.Signals} else str(signum)
        where = f"checkpoint saved to {path}" if path else "no checkpoint saved"
        super().__init__(f"interrupted by {name}: {where}; resume with --ckpt_path last")


class SignalCheckpoint(pl.Callback):
    """On SIGTERM/SIGUSR1/SIGINT: save ``last.ckpt`` after the current step and stop with a non-zero exit.

    SIGINT (Ctrl-C) the same way, saying so on stderr; a second SIGINT before the save raises
    ``KeyboardInterrupt`` at once (no checkpoint), as Ctrl-C does without this callback.

    A validation due right after that step still runs (Lightning skips it when resuming from a
    checkpoint of the step before it): ``last.ckpt`` is saved once before it, in case the job is
    killed before it ends, and again at its end, after the checkpoint callbacks' own saves and
    rankings (this callback moves itself behind them), and the run stops then. A signal that comes
    during a validation is handled at its end the same way. A signal inside a gradient-accumulation
    window is handled after the window's optimizer step (at most ``accumulate_grad_batches - 1``
    batches later): a checkpoint never holds half a window, so the resume stays exact."""

    def __init__(self, signals: list[str] | None = None, filename: str = "last.ckpt"):
        """
        Args:
            signals: signal names to handle while training (default SIGTERM, SIGUSR1 and SIGINT).
            filename: checkpoint file written in the checkpoint directory (``last.ckpt`` is what
                ``--ckpt_path last`` finds).
        """
        super().__init__()
        names = ["SIGTERM", "SIGUSR1", "SIGINT"] if signals is None else list(signals)
        self.signals = []
        for name in names:
            sig = getattr(signal, str(name).upper(), None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"unknown signal {name!r}")
            self.signals.append(sig)
        self.filename = filename
        self.received: int | None = None
        self.pending: TrainingInterrupted | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            self.received = int(signum)
            if signum == signal.SIGINT:
                import sys

                print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop now, without one)",
                      file=sys.stderr, flush=True)

    def _install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _restore(self) -> None:
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous = {}

    def checkpoint_path(self, trainer) -> str:
        cb = trainer.checkpoint_callback
        directory = getattr(cb, "dirpath", None) or str(Path(trainer.default_root_dir) / "checkpoints")
        return str(Path(directory) / self.filename)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # last in the hook order, behind the checkpoint callbacks Lightning puts last: the save at a
        # validation's end holds their state after it (a new list: Lightning is iterating the old one)
        if trainer.callbacks and trainer.callbacks[-1] is not self:
            trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    def on_train_start(self, trainer, pl_module) -> None:
        self.received = None
        self.pending = None
        self._install()

    def _signalled(self, trainer) -> bool:
        """Whether any rank received a signal (a collective in multi-process runs: every rank calls it)."""
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return bool(stop)

    def _save(self, trainer) -> TrainingInterrupted:
        path = self.checkpoint_path(trainer)
        cb = trainer.checkpoint_callback
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath \
                and self.filename == cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION:
            # this is the checkpoint callback's last checkpoint now (set before saving: it is part of the
            # callback's state): a resumed run overwrites it instead of writing last-v1.ckpt next to it
            cb.last_model_path = path = os.path.join(cb.dirpath, self.filename)
        trainer.save_checkpoint(path)
        signum = self.received if self.received is not None else int(signal.SIGTERM)
        return TrainingInterrupted(signum, path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # inside a gradient-accumulation window (the same on every rank) the save waits for the window's
        # optimizer step: a checkpoint there would hold the window's data position but not its gradients
        if self.pending is not None or _accumulates(trainer) or not self._signalled(trainer):
            return
        interrupted = self._save(trainer)
        if not _validates_after_this_batch(trainer):
            self.pending = interrupted  # else on_validation_end saves again and stops

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.pending is not None or _accumulates(trainer) \
                or not self._signalled(trainer):
            return
        self.pending = self._save(trainer)

    # stop before anything else runs (the step's metrics are logged first)
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_if_pending()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop_if_pending()

    def _stop_if_pending(self) -> None:
        if self.pending is not None:
            exc, self.pending = self.pending, None
            self._restore()
            raise exc

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
        from mmlm.data.errors import DataErrorBudgetExceeded

        # a validation set past its error budget stops the run at a validation, before the step's checkpoint
        # (which waits for it) is written: keep the steps trained. One process only (the save is collective)
        if isinstance(exception, DataErrorBudgetExceeded) and trainer.validating and not trainer.sanity_checking \
                and trainer.state.fn == "fit" and trainer.global_step > 0 and trainer.world_size == 1:
            path = self._save(trainer).path
            print(f"data.val is past its error budget: saved {path} at step {trainer.global_step}; fix data.val "
                  "(or set --data.val null) and resume with --ckpt_path last", file=sys.stderr)


# ---------------------------------------------------------------------------------- checkpoints
class StepCheckpoint(ModelCheckpoint):
    """Checkpoints ranked by the validation of their own step (``every_n_train_steps`` saves).

    A ``ModelCheckpoint`` whose step-triggered saves rank checkpoints by the right validation and never
    wait for one that does not come.

    - A save at a step right before a validation (``trainer.val_check_interval``) waits for it and
      ranks the checkpoint by that validation's ``monitor`` value. Lightning's own ``ModelCheckpoint``
      saves before that validation and ranks by the previous one's value: with equal intervals
      (``mmlm fit``'s defaults, every recipe) ``best-step=N.ckpt`` was one validation late, and the last
      step's better model was never kept as the best.
    - A save at a step with no ``monitor`` value yet (no validation so far, or none at all: ``data.val``
      null, as in the LLaVA recipes) writes the last checkpoint now; only the ranked (top-k) one waits.
      Lightning's waits with both for a validation, so a run without validation data wrote no
      checkpoint before its end and a crash lost all of it.
    - The end of training writes the last checkpoint unless the final step has one. Lightning's only
      does when no last checkpoint was written during the run: a run of 400 steps saving every 350
      left ``last.ckpt`` at step 350, and ``--ckpt_path last`` (to extend it) went back 50 steps.

    - A run resumed in a directory that was copied or moved keeps writing ``last.ckpt``. Lightning's, finding
      another ``dirpath`` in the checkpoint, forgot its last checkpoint and wrote ``last-v1.ckpt`` next to it,
      and ``--ckpt_path last`` could then resume the older file.

    The state is stored under ``ModelCheckpoint``'s key, so checkpoints of either class resume with the other."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.save_last and self.dirpath and not self.last_model_path:  # saved under another dirpath
            self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (self.monitor is None or not hasattr(self, "_defer_save_until_validation")  # older Lightning: its own
                or not pl_module.automatic_optimization or self._every_n_train_steps < 1
                or trainer.global_step % self._every_n_train_steps != 0
                or self._should_skip_saving_checkpoint(trainer)):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _accumulates(trainer):
            return None  # no optimizer step (a resumed run's first micro-batches at the saved step): no save
        if _validates_after_this_batch(trainer):
            self._defer_save_until_validation = True  # on_validation_end saves top-k and last
            return None
        candidates = self._monitor_candidates(trainer)
        if self.monitor not in candidates:
            self._save_last_checkpoint(trainer, candidates)  # resumable now; nothing to rank by yet
            return None
        return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # the final step, resumable
            return
        super().on_train_end(trainer, pl_module)


def _accumulates(trainer) -> bool:
    """Whether the current training batch only accumulated gradients (no optimizer step)."""
    try:
        return bool(trainer.fit_loop.epoch_loop._should_accumulate())
    except Exception:  # noqa: BLE001 - another Lightning version
        return False


def _validates_after_this_batch(trainer) -> bool:
    """Whether the fit loop runs a validation right after the current training batch (its own test)."""
    try:
        loop = trainer.fit_loop
        return bool(trainer.enable_validation and loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
    except Exception:  # noqa: BLE001 - another Lightning version: save as Lightning does
        return False


# ---------------------------------------------------------------------------------- export
class ExportModel(pl.Callback):
    """At the end of a successful fit, write the model + processor to ``RUN_DIR/<dirname>``.

    LoRA adapters are merged into the LM first, in place (a copy would double the LM's memory): after
    the fit, rank 0's ``module.vlm`` is the plain merged model that was written; the run's checkpoints
    keep the adapters, so resuming (``--ckpt_path``) trains them on.
    """

    def __init__(self, dirname: str = "model", enabled: bool = True):
        """
        Args:
            dirname: directory under the run directory (``trainer.default_root_dir``).
            enabled: export at all.
        """
        super().__init__()
        self.dirname = dirname
        self.enabled = enabled
        self.path: Path | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.enabled or getattr(pl_module, "vlm", None) is None:
            return
        path = Path(trainer.default_root_dir) / self.dirname
        if trainer.is_global_zero:
            export_model(pl_module, path)
            print(f"model written to {path}")
        self.path = path
        trainer.strategy.barrier("mmlm-export")


def export_model(pl_module, path: str | Path) -> Path:
    """Write ``pl_module.vlm`` + ``pl_module.processor`` as an mmlm checkpoint directory
    (LoRA adapters merged into the LM first)."""
    from mmlm.checkpoint import save_pretrained
    from mmlm.training.freeze import is_lora, merge_lora

    vlm = pl_module.vlm
    if is_lora(vlm):
        merge_lora(vlm)
    with torch.no_grad():
        save_pretrained(path, vlm, pl_module.processor)
    return Path(path)
