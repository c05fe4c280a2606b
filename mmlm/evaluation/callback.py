"""Lightning callback: score the model on a shards benchmark every N training steps.

Contract
--------
``EvalCallback(shards, every_n_steps, limit, kind="vqa"|"caption")`` reads the first ``limit``
items of our webdataset shards (``question``/``answers`` for ``kind="vqa"``, ``captions`` for
``"caption"``) once, and every ``every_n_steps`` optimizer steps (``trainer.global_step``,
never at step 0, once per step even with gradient accumulation) it

1. builds a greedy ``predict_fn`` on ``pl_module.vlm`` / ``pl_module.processor`` (attributes
   the LightningModule provides) via :func:`mmlm.evaluation.runner.model_predict_fn`,
2. predicts in eval mode without gradients (training mode is restored afterwards),
3. scores with the benchmark's official rule (VQA accuracy / caption metrics; no bootstrap),
4. logs every scalar metric with ``pl_module.log(f"{prefix}/{kind}/{name}", value,
   rank_zero_only=True)`` (e.g. ``eval/vqa/overall``, ``eval/caption/CIDEr``) and keeps the last
   result in :attr:`EvalCallback.last_metrics`.

VQA questions get ``prompt_suffix`` on a new line; by default the one the run trains with
(``pl_module.processor.config.vqa_suffix``, which ``mmlm fit`` sets from ``data.vqa_suffix``), else
LLaVA's short-answer instruction.

Only global rank 0 generates (other ranks carry on and wait at their next collective), so keep
``limit`` small. Captions default to skipping METEOR/SPICE (Java start-ups) and to the ``auto``
tokenizer; pass ``skip_metrics=()`` to get METEOR too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from .benchmarks import DEFAULT_VQA_SUFFIX, Benchmark, load_benchmark
from . import runner

__all__ = ["EvalCallback"]


class EvalCallback(pl.Callback):
    """Evaluate on a shards benchmark every ``every_n_steps`` steps and log the metrics."""

    def __init__(
        self,
        shards: str | os.PathLike | list,
        every_n_steps: int = 1000,
        limit: int | None = 200,
        kind: str = "vqa",
        *,
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        prompt_suffix: str | None = None,
        caption_prompt: str | None = None,
        tokenizer: str = "auto",
        skip_metrics: Sequence[str] = ("METEOR", "SPICE"),
        prefix: str = "eval",
    ) -> None:
        super().__init__()
        if kind not in ("vqa", "caption"):
            raise ValueError(f"kind must be 'vqa' or 'caption', got {kind!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.shards = shards
        self.every_n_steps = int(every_n_steps)
        self.limit = limit
        self.kind = kind
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else (16 if kind == "vqa" else 48)
        self.prompt_suffix = prompt_suffix
        self.caption_prompt = caption_prompt
        self.tokenizer = tokenizer
        self.skip_metrics = tuple(skip_metrics)
        self.prefix = prefix
        self.last_metrics: dict[str, float] = {}
        self._bench: Benchmark | None = None
        self._last_step = -1

    # ------------------------------------------------------------------ helpers
    def benchmark(self, processor: Any = None) -> Benchmark:
        """The (cached) benchmark items (VQA prompts with ``prompt_suffix``, else ``processor``'s
        recorded ``vqa_suffix``, else LLaVA's)."""
        if self._bench is None:
            suffix = self.prompt_suffix
            if suffix is None:
                recorded = getattr(getattr(processor, "config", None), "vqa_suffix", None)
                suffix = DEFAULT_VQA_SUFFIX if recorded is None else recorded
            self._bench = load_benchmark(
                self.kind, "shards", shards=self.shards, limit=self.limit,
                caption_prompt=self.caption_prompt, prompt_suffix=suffix,
            )
        return self._bench

    def run(self, pl_module: Any) -> dict[str, float]:
        """Predict and score now on ``pl_module.vlm``; returns the scalar metrics."""
        bench = self.benchmark(getattr(pl_module, "processor", None))
        vlm = pl_module.vlm
        was_training = bool(getattr(vlm, "training", False))
        try:
            predict_fn = runner.model_predict_fn(
                (vlm, pl_module.processor), max_new_tokens=self.max_new_tokens,
            )
            preds, _ = runner.predict(bench.items, predict_fn, batch_size=self.batch_size, progress=False,
                                      max_bad_fraction=1.0)
        finally:
            if was_training:
                vlm.train()
        result = runner.score(bench, preds, tokenizer=self.tokenizer, skip_metrics=self.skip_metrics)
        scalars = {k: float(v) for k, v in result.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.last_metrics = scalars
        return scalars

    # ------------------------------------------------------------------ lightning hooks
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if not getattr(trainer, "is_global_zero", True):
            return
        for name, value in self.run(pl_module).items():
            pl_module.log(f"{self.prefix}/{self.kind}/{name}", value, rank_zero_only=True)
