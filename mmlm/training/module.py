"""``VLMModule``: the LightningModule that trains a :class:`mmlm.VLM`.

Life cycle
----------
The model needs a tokenizer, and a from-scratch tokenizer needs the training shards, so the
model is built in :meth:`VLMModule.configure_model` (after the data module's ``setup``), not in
``__init__``:

- a fresh run builds ``(vlm, processor)`` with :func:`mmlm.training.build.build_model_and_processor`
  from ``preset`` (+ ``model_overrides``) or ``init_from``; in multi-process runs rank 0 trains a
  from-scratch tokenizer once and broadcasts it, and every rank builds the same model (same seed,
  or the same pretrained weights);
- a resumed run (``resume_from``, set by ``mmlm fit`` from ``--ckpt_path``) rebuilds the model from
  the config and processor stored in the Lightning checkpoint: the tokenizer is never trained twice,
  and the weights, optimizer, scheduler, loop counters, data position and RNG state come from
  the checkpoint. (Calling ``Trainer.fit(ckpt_path=...)`` from Python without ``resume_from`` also
  works: ``on_load_checkpoint`` swaps in the checkpoint's processor and model before the weights load.)

Then the training stage freezes parts (:mod:`mmlm.training.freeze`), and the processor is handed
to the data module (``datamodule.attach_processor``). ``self.vlm`` and ``self.processor`` are
public (evaluation callbacks use them) from ``configure_model`` on.

Checkpoints hold, under ``checkpoint["mmlm"]`` (:mod:`mmlm.training.state`): the model config, the
processor files, the non-finite-loss counters and the RNG states (restored before the first batch
after a resume; validation leaves the training RNG stream as it found it, so a resume reproduces it
exactly).

Steps
-----
``training_step`` tells the data module the batch was consumed (``record_consumed``) and computes
the loss; ``optimizer_step`` then, with the backward pass already queued (the one host sync mmlm
adds to a step), skips the update when a loss of the accumulation window was non-finite on any rank (see
:class:`mmlm.training.callbacks.NonFiniteGuard`). Logged: ``train/loss`` (the mean over the micro-batches of
the accumulation window, the loss the update follows; NaN when one was non-finite),
``val/loss`` (averaged over supervised tokens), ``train/nonfinite_skipped``.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mmlm.modeling.vlm import float32_buffers, restore_float32_buffers
from mmlm.processing import IMAGE_PLACEMENTS
from mmlm.training.callbacks import NonFiniteGuard
from mmlm.training.checks import check_attention_trains_on, check_normalization, check_packing, hparam_changes
from mmlm.training.freeze import STAGES, configure_trainable, enable_activation_checkpointing, frozen_modules
from mmlm.training.state import CHECKPOINT_KEY, get_rng_state, make_payload, read_checkpoint_payload, set_rng_state

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "num_images")


class VLMModule(pl.LightningModule):
    """Trains a LLaVA-style VLM: stage-wise freezing, per-component learning rates, warmup + cosine."""

    def __init__(
        self,
        preset: str = "tiny",
        init_from: str | None = None,
        model_overrides: dict | None = None,
        stage: Literal["align", "instruct", "full"] = "full",
        lr: float = 1e-4,
        vision_lr: float | None = None,
        projector_lr: float | None = None,
        lm_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup: float = 0.03,
        min_lr_ratio: float = 0.0,
        lora: dict | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        cache_image_features: int = 0,
        max_nonfinite: int = 10,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        tokenizer_vocab_size: int = 512,
        tokenizer_max_records: int = 20000,
        max_length: int | None = None,
        caption_prompt: str | None = None,
        system_prompt: str | None = None,
        image_placement: Literal["as_written", "after_text"] | None = None,
    ):
        """
        Args:
            preset: named model config (tiny, small, base, llava-1.5-7b); see ``mmlm.presets``.
            init_from: an mmlm checkpoint directory (e.g. RUN_DIR/model of an align run) to start from
                instead of a preset; its processor (tokenizer, prompt format) comes along.
            model_overrides: merged into the preset's config, e.g. ``{vision: {pretrained: true},
                text: {pretrained: true}}`` or ``{text: {hf_config: {num_hidden_layers: 2}}}``. On the
                command line each flag merges into the config file's (key by key; also
                ``--model.model_overrides.text.attn_implementation sdpa``); a ``null`` flag clears them.
            stage: what trains: align (projector), instruct (projector + LM), full (everything).
            lr: peak learning rate (AdamW).
            vision_lr: learning rate of the vision encoder (default: lr).
            projector_lr: learning rate of the projector (default: lr).
            lm_lr: learning rate of the language model (default: lr).
            weight_decay: AdamW weight decay (never on biases, norms, embeddings, positional tokens).
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup: linear warmup: a fraction of trainer.max_steps when < 1, else a number of steps.
            min_lr_ratio: the cosine decays to min_lr_ratio * lr at trainer.max_steps.
            lora: LoRA on the LM (peft.LoraConfig arguments, e.g. ``{r: 16, lora_alpha: 32}``); needs peft.
                Command-line flags merge into the config file's (``--model.lora.r 8``); ``null`` turns it off.
            activation_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
            compile: torch.compile each LM decoder layer, each vision block and the loss
                (``mmlm.training.compile``): faster GPU steps (small preset, 16 x 1024 tokens on an H100:
                96 ms instead of 148) after a compile of seconds to a minute at the first steps; slower on CPU.
            cache_image_features: on a CPU with a frozen vision encoder (stage align or instruct), keep its
                output for up to this many distinct images (by pixel content) and reuse it when an image comes
                again instead of running the encoder (``mmlm.training.feature_cache``): the same values up to
                float rounding; it pays when the encoder is a large part of a step and the stream revisits its
                images (``python benchmarks/feature_cache.py``: the tiny preset's encoder is ~15% of a
                question step, 41% hits over 600 steps of 20000 images: 0.99-1.15x, within this machine's
                noise). Memory: this many x the encoder's output (tiny: 41 KB per image). 0: off.
            max_nonfinite: abort after this many optimizer steps in a row with a non-finite loss (each one is
                skipped; 0: never abort).
            tokenizer: tokenizer name/path for a pretrained LM (default: the LM's own).
            chat_template: named chat template for a pretrained LM (chatml, llama3, vicuna_v1, mmlm;
                default: the LM's own when it marks the assistant's text, else the one it matches).
            tokenizer_vocab_size: vocabulary of the BPE tokenizer trained for from-scratch presets.
            tokenizer_max_records: training records read to train that tokenizer.
            max_length: longest sample in tokens, image tokens included (default: 512 from scratch, 2048
                with a pretrained LM, or the init_from checkpoint's).
            caption_prompt: the user prompt captions answer (default: "Describe the image briefly.",
                or the init_from checkpoint's).
            system_prompt: a system message before every conversation (default: none, or the checkpoint's).
            image_placement: where images go in a user turn: ``as_written`` (where the data's ``<image>`` is,
                before the question: LLaVA's layout) or ``after_text`` (after the question, so the image tokens
                attend to it); default: as_written, or the init_from checkpoint's.
        """
        super().__init__()
        from mmlm.presets import PRESETS

        if init_from is None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        if stage not in STAGES:
            raise ValueError(f"unknown training stage {stage!r}; known: {list(STAGES)}")
        if image_placement is not None and image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(f"unknown image_placement {image_placement!r}; known: {list(IMAGE_PLACEMENTS)}")
        for name, value in (("lr", lr), ("vision_lr", vision_lr), ("projector_lr", projector_lr), ("lm_lr", lm_lr)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if max_length is not None and max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        if cache_image_features < 0:
            raise ValueError(f"cache_image_features must be >= 0, got {cache_image_features}")
        if cache_image_features and stage == "full":
            raise ValueError("cache_image_features reuses a frozen vision encoder's outputs, but stage 'full' trains "
                             "the encoder: use stage 'align' or 'instruct', or cache_image_features 0")
        if lora is not None and stage == "align":
            raise ValueError("LoRA adapts the LM, which stage 'align' keeps frozen: use stage 'instruct' or 'full'")
        self.save_hyperparameters()
        self.vlm = None
        self.processor = None
        self.resume_from: str | None = None
        self.guard = NonFiniteGuard(max_nonfinite)
        self._processor_files: dict[str, bytes] | None = None
        self._frozen: list = []
        self._pending_rng: dict | None = None
        self._rng_before_validation: dict | None = None
        self._val_sums = None  # (sum of loss x supervised tokens, supervised tokens) of this rank's validation
        self._warned_empty_val = False
        self._window_finite: torch.Tensor | None = None  # all losses finite since the last optimizer step
        self._window_loss: torch.Tensor | None = None  # sum of the losses since the last optimizer step
        self._window_batches = 0  # micro-batches since the last optimizer step
        self._float32_buffers: dict[str, torch.Tensor] = {}  # the rotary frequencies as built (float32)
        self.feature_cache = None  # an ImageFeatureCache when cache_image_features > 0 (from configure_model)
        self._schedule_steps: int | None = None  # the learning-rate schedule's length (configure_optimizers)
        self._resumed_schedule: tuple[int, int] | None = None  # (its length, step) in a checkpoint resumed from
        self._resumed_shape: tuple[float, float] | None = None  # (warmup, min_lr_ratio) of that checkpoint's run
        self._resumed_groups: list[str] | None = None  # the optimizer groups of a checkpoint resumed from

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.vlm is None and self._trainer is not None:  # else built already, or outside a Trainer
            payload = read_checkpoint_payload(self.resume_from) if self.resume_from else None
            if payload is not None:
                self._build_from_payload(payload)
            else:
                self._build_fresh()
        if self.vlm is not None:  # DDP broadcasts no buffer in forward: see sync_norm_statistics
            self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]

    def build(self, train_shards: list[str] | None = None, extra_texts: list[str] | None = None) -> None:
        """Build ``vlm`` and ``processor`` now (outside a Trainer); from-scratch presets need ``train_shards``."""
        if self.vlm is None:
            self._build_fresh(train_shards, extra_texts)

    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _build_fresh(self, train_shards=None, extra_texts=None) -> None:
        from mmlm.processing import DEFAULT_CAPTION_PROMPT
        from mmlm.training.build import (
            build_model_and_processor,
            processor_files,
            tokenizer_files,
            tokenizer_from_files,
            tokenizer_from_shards,
            train_sources,
            trains_tokenizer,
        )

        hp = self.hparams
        dm = self._datamodule()
        if train_shards is None:
            train_shards = train_sources(_datamodule_train(dm), allow_pipes=bool(getattr(dm, "allow_pipes", False)),
                                         allow_remote=bool(getattr(dm, "allow_remote", False)))
        if extra_texts is None:
            extra_texts = [t for t in (_get_attr_or_hparam(dm, "vqa_suffix"),) if isinstance(t, str) and t]
        tokenizer = None
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and trains_tokenizer(
                preset=hp.preset, init_from=hp.init_from, model_overrides=hp.model_overrides, tokenizer=hp.tokenizer):
            # rank 0 trains the tokenizer once; every rank then builds the same model (same seed)
            files = None
            if trainer.is_global_zero:
                prompts = [hp.caption_prompt or DEFAULT_CAPTION_PROMPT, hp.system_prompt, *extra_texts]
                tok = tokenizer_from_shards(train_shards, hp.tokenizer_vocab_size, max_records=hp.tokenizer_max_records,
                                            prompts=prompts, log=rank_zero_info)
                files = tokenizer_files(tok)
            tokenizer = tokenizer_from_files(trainer.strategy.broadcast(files, src=0))
        try:
            vlm, processor = build_model_and_processor(
                preset=hp.preset, init_from=hp.init_from, model_overrides=hp.model_overrides or {},
                train_shards=train_shards, tokenizer=hp.tokenizer, tokenizer_vocab_size=hp.tokenizer_vocab_size,
                tokenizer_max_records=hp.tokenizer_max_records, extra_texts=extra_texts, max_length=hp.max_length,
                caption_prompt=hp.caption_prompt, system_prompt=hp.system_prompt,
                image_placement=hp.image_placement, prebuilt_tokenizer=tokenizer,
                chat_template=hp.chat_template, log=rank_zero_info,
            )
        except OSError as e:  # a hub name that cannot be reached or a missing file (transformers' message spans lines)
            reason = " ".join(str(e).split()) or f"{type(e).__name__}: {getattr(e, 'filename', None) or 'no message'}"
            raise ValueError(f"cannot build the model: {reason}") from e
        except RuntimeError as e:  # weights that do not fit the configured shapes (torch's message spans lines)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            if not any("size mismatch" in ln or "Error(s) in loading state_dict" in ln for ln in lines):
                raise
            detail = next((ln for ln in lines if "size mismatch" in ln), lines[0])
            raise ValueError(f"cannot build the model: its weights do not fit the configured shapes ({detail}); "
                             "check the checkpoint's model options (e.g. vision.timm_kwargs)") from e
        if _get_attr_or_hparam(dm, "sample_mode") in QUESTION_MODES:  # eval asks questions as this run trains them
            processor.config.vqa_suffix = _get_attr_or_hparam(dm, "vqa_suffix") or ""
        self._install(vlm, processor, processor_files(processor))

    def _build_from_payload(self, payload: dict) -> None:
        from mmlm.training.build import build_from_config, processor_from_files

        processor = processor_from_files(payload["processor"])
        vlm = build_from_config(payload["model_config"], processor)
        self._install(vlm, processor, dict(payload["processor"]))

    def _install(self, vlm, processor, files: dict[str, bytes]) -> None:
        hp = self.hparams
        dm = self._datamodule()
        if getattr(dm, "uint8_pixels", False):
            check_normalization(vlm, processor)
        check_packing(vlm, bool(getattr(dm, "packing", False)))
        # transformers' from_pretrained returns its model in eval mode (dropout off) and Lightning no
        # longer calls train(): every part trains in train mode, the frozen ones are put back in eval
        vlm.train()
        configure_trainable(vlm, hp.stage, hp.lora)
        trainer = self._trainer
        if trainer is not None:
            check_attention_trains_on(vlm, trainer.strategy.root_device)
        if hp.activation_checkpointing:
            enable_activation_checkpointing(vlm)
        if hp.get("compile"):
            from mmlm.training.compile import compile_blocks

            compile_blocks(vlm)
        self.vlm = vlm
        self._float32_buffers = float32_buffers(vlm)  # put back after a "*-true" precision's cast (on_fit_start)
        self.processor = processor
        self._processor_files = files
        self._frozen = frozen_modules(vlm)  # put in eval mode from on_train_start on
        if hp.get("cache_image_features"):
            from mmlm.training.feature_cache import ImageFeatureCache

            if vlm.vision not in self._frozen:
                raise ValueError("cache_image_features needs a frozen vision encoder (stage 'align' or 'instruct')")
            if trainer is not None and trainer.strategy.root_device.type != "cpu":
                raise ValueError("cache_image_features keys images by their bytes on the host: it serves CPU "
                                 "training (where a frozen encoder's forward is a large part of a step); set it "
                                 "to 0 on a GPU")
            self.feature_cache = ImageFeatureCache(hp.cache_image_features)
        if dm is not None and hasattr(dm, "attach_processor"):
            dm.attach_processor(processor)

    # ------------------------------------------------------------------ modes
    def _keep_frozen_in_eval(self) -> None:
        for module in self._frozen:
            if module.training:
                module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self._keep_frozen_in_eval()
        return self

    # ------------------------------------------------------------------ steps
    @staticmethod
    def model_inputs(batch: dict) -> dict:
        return {k: batch.get(k) for k in MODEL_INPUTS}

    def _step_inputs(self, batch: dict) -> dict:
        """``model_inputs``, plus the cached encoder outputs (``vision_features``) when caching."""
        inputs = self.model_inputs(batch)
        pixels = inputs["pixel_values"]
        if self.feature_cache is not None and pixels is not None:
            from mmlm.training.feature_cache import image_digests

            inputs["vision_features"] = self.feature_cache.encode(self.vlm.vision_features, pixels,
                                                                  image_digests(pixels))
        return inputs

    def forward(self, **inputs):
        return self.vlm(**inputs)

    def on_fit_start(self) -> None:
        # Lightning's "bf16-true"/"16-true" cast every floating tensor of the model, the rotary frequencies
        # too; transformers keeps those float32 (as `mmlm.load` does for describe/eval): trained with
        # bf16-rounded angles, a model would meet other positions at inference
        if self.vlm is not None and self._float32_buffers:
            restore_float32_buffers(self.vlm, self._float32_buffers)

    def on_train_start(self) -> None:
        self._keep_frozen_in_eval()
        if self._resumed_schedule is not None and self._resumed_schedule[0] != self._schedule_steps:
            self._resync_learning_rates()

    def _resync_learning_rates(self) -> None:
        """After a resume that redrew the schedule (a changed max_steps), set each group's learning rate to the
        new schedule's value at the resumed step: the restored optimizer holds the old schedule's, which the
        first step would otherwise train at."""
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            lambdas = getattr(sched, "lr_lambdas", None)
            if lambdas is None:
                continue
            lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, lambdas)]
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._keep_frozen_in_eval()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._rng_before_validation = get_rng_state()

    def on_validation_end(self) -> None:
        # validation (its DataLoader draws seeds from the global RNG) must not shift the training RNG
        # stream, or a resumed run would diverge from an uninterrupted one after the first validation
        trainer = self._trainer
        if self._rng_before_validation is not None and trainer is not None and not trainer.sanity_checking \
                and trainer.state.fn == "fit":
            set_rng_state(self._rng_before_validation)
        self._rng_before_validation = None

    def training_step(self, batch: dict, batch_idx: int):
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "record_consumed"):
            dm.record_consumed(batch)
        out = self.vlm(**self._step_inputs(batch), return_logits=False)
        loss = out.loss
        # no host sync here: whether the loss is finite is read in optimizer_step, once the backward
        # pass is queued (reading it now would stall the host until the GPU finished the forward pass)
        finite = torch.isfinite(loss.detach()).all()  # 0-d bool, on the loss's device
        self._window_finite = finite if self._window_finite is None else self._window_finite & finite
        # with accumulate_grad_batches > 1 each micro-batch logs the mean so far of its window, so the value
        # written for the step (the window's last) is the mean loss of the whole global batch, not of the
        # last micro-batch alone
        self._window_loss = loss.detach() if self._window_loss is None else self._window_loss + loss.detach()
        self._window_batches += 1
        batch_size = _num_samples(batch)
        self.log("train/loss", self._window_loss / self._window_batches, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch_size)
        if self.feature_cache is not None:
            self.log("train/image_cache_hits", self.feature_cache.hit_rate(), on_step=True, batch_size=batch_size)
        if self.guard.skipped:
            self.log("train/nonfinite_skipped", float(self.guard.skipped), on_step=True, batch_size=batch_size)
        return loss

    def _take_window_finite(self) -> bool:
        """Were all losses of this accumulation window finite (on every rank)? Resets the window."""
        finite, self._window_finite = self._window_finite, None
        self._window_loss, self._window_batches = None, 0
        finite = True if finite is None else bool(finite)
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()  # training_step (+ zero_grad) + backward, queued
        # A non-finite loss anywhere in the window (any rank: the gradients are all-reduced) drops the
        # update; the guard counts it and aborts after max_nonfinite windows in a row.
        if not self.guard.update(self._take_window_finite(), self.global_step):
            optimizer.zero_grad(set_to_none=True)
            return None
        optimizer.step(closure=lambda: loss)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, device=self.device)  # (sum of loss x supervised tokens, supervised tokens)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            sync_norm_statistics(self)  # every rank, with validation batches or without

    def on_validation_epoch_end(self) -> None:
        # val/loss over every rank's supervised tokens, reduced here by one collective that every rank makes,
        # batches or not: Lightning's sync of a logged value reduces only on the ranks that logged it, so a rank
        # without a validation batch (a small or skipped share) left the others waiting in that sync forever
        trainer = self._trainer
        if trainer is None:
            return
        sums = self._val_sums if self._val_sums is not None else torch.zeros(2, device=self.device)
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[1]) > 0:
            self.log("val/loss", sums[0] / sums[1], on_step=False, on_epoch=True, prog_bar=True,
                     sync_dist=False, batch_size=1)
        # a validation that scored nothing (no data.val shard with a usable sample) logs no val/loss, so no
        # best checkpoint is ever kept: say so once instead of training on silently
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._warned_empty_val:
            return
        if float(sums[1]) == 0:
            self._warned_empty_val = True
            rank_zero_warn("validation scored no sample: data.val gave no batch with an answer token (empty or "
                           "unreadable shards, every sample skipped, or the template masks every label), so val/loss "
                           "is not logged and no best checkpoint is kept; check data.val "
                           "(python -m data_pipelines.inspect DIR)")

    def validation_step(self, batch: dict, batch_idx: int):
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "record_consumed") and isinstance(batch.get("loader_state"), dict) \
                and batch["loader_state"].get("split", "train") != "train":
            dm.record_consumed(batch)  # validation skip counts
        out = self.vlm(**self._step_inputs(batch), return_logits=False)
        labels = batch["labels"]
        n = int((labels[:, 1:] != self.vlm.config.ignore_index).sum())
        if n == 0:
            return None
        if self._val_sums is None:  # validation_step called outside a validation loop
            self._val_sums = torch.zeros(2, device=out.loss.device)
        self._val_sums += torch.stack([out.loss.detach().float() * n, out.loss.new_tensor(n, dtype=torch.float32)])
        return out.loss

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        from mmlm.training.optim import build_optimizer, build_scheduler, resolve_warmup

        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("set --trainer.max_steps: the training stream is endless, and the learning-rate "
                             "schedule (warmup + cosine) needs the run's length")
        # A fused AdamW unscales 16-mixed's GradScaler'd gradients inside its step, too late to clip
        # them: with a loss scale and clipping, use the non-fused kernel (bf16-mixed: see below).
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        fused = False if scaled and (self.trainer.gradient_clip_val or 0) > 0 else None
        for option, part in (("vision_lr", "vision"), ("projector_lr", "projector"), ("lm_lr", "lm")):
            if hp.get(option) is not None and not any(p.requires_grad for p in getattr(self.vlm, part).parameters()):
                rank_zero_warn(f"model.{option} is set but stage {hp.stage!r} keeps the {part} frozen: it trains "
                               "nothing (see the pre-flight table of what trains)")
        optimizer = build_optimizer(self.vlm, lr=hp.lr, vision_lr=hp.vision_lr, projector_lr=hp.projector_lr,
                                    lm_lr=hp.lm_lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas), eps=hp.eps,
                                    fused=fused)
        sharded = any(k in type(self.trainer.strategy).__name__ for k in ("FSDP", "DeepSpeed", "ModelParallel"))
        # (a sharded strategy's optimizer holds flat or sharded tensors: its groups' sizes differ from the
        # checkpoint's by design, and the strategy converts the state itself)
        if self._resumed_groups is not None and not sharded \
                and self._resumed_groups != _group_sizes(optimizer.param_groups):
            # torch would say only "loaded state dict has a different number of parameter groups" (or sizes)
            raise ValueError(
                f"the checkpoint's optimizer trains other parameters ({', '.join(self._resumed_groups)}) than this run "
                f"({', '.join(_group_sizes(optimizer.param_groups))}): --ckpt_path is a checkpoint of another model, "
                "stage or LoRA setting; resume it with its own run's --model options, or start a new run from its "
                "exported model with --model.init_from RUN/model")
        # a resumed run's schedule is its checkpoint's (warmup, min_lr_ratio; redrawn over a changed max_steps),
        # as its optimizer's learning rates are: a warmup given again would restart mid-run
        warmup, min_lr_ratio = self._resumed_shape or (hp.warmup, hp.min_lr_ratio)
        scheduler = build_scheduler(optimizer, int(total), warmup, min_lr_ratio)
        self._schedule_steps = int(total)
        if self._resumed_schedule is not None:
            warning = schedule_change(*self._resumed_schedule, int(total), warmup, min_lr_ratio)
            if warning:
                rank_zero_warn(warning)
        elif resolve_warmup(warmup, int(total)) >= int(total):
            rank_zero_warn(f"the warmup ({warmup:g}) spans the whole run of {int(total)} steps: the learning rate "
                           "rises to its peak at the end and never decays; set --model.warmup lower (a fraction "
                           "below 1 is a share of the run, e.g. 0.03)")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses to clip under AMP whenever the optimizer is fused (its fused step would
        # unscale a GradScaler's gradients after the clip). bf16-mixed has no loss scale: the
        # gradients are already the true ones, so clip them as full precision does.
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType

        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and optimizer.defaults.get("fused"):
            clip = self.trainer.gradient_clip_val if gradient_clip_val is None else gradient_clip_val
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, clip or 0.0, algorithm)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.vlm is None:
            return
        # A checkpoint written during a validation of the fit (ModelCheckpoint saves at validation end when
        # the step's save waits for val/loss) must hold the training RNG stream as on_validation_end
        # restores it, not the state validation left behind, or its resume would diverge.
        trainer = self._trainer
        rng = None
        if trainer is not None and trainer.validating and not trainer.sanity_checking \
                and trainer.state.fn == "fit":
            rng = self._rng_before_validation
        checkpoint[CHECKPOINT_KEY] = make_payload(self.vlm.config.to_dict(), self._processor_files,
                                                  self.guard.state_dict(), rng)
        if self._schedule_steps is not None:
            checkpoint[CHECKPOINT_KEY]["schedule_steps"] = self._schedule_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        payload = checkpoint.get(CHECKPOINT_KEY)
        if payload is None:
            return
        if self.vlm is None or payload.get("processor") != self._processor_files:
            trainer = self._trainer
            if trainer is not None and getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
                raise RuntimeError("this strategy restores checkpoints after setup: resume through `mmlm fit "
                                   "--ckpt_path` (which sets VLMModule.resume_from)")
            self.vlm = None
            self._build_from_payload(payload)
        self.guard.load_state_dict(payload.get("nonfinite", {}))
        self._pending_rng = payload.get("rng")
        states = checkpoint.get("optimizer_states") or []
        if states and isinstance(states[0], dict) and states[0].get("param_groups"):
            self._resumed_groups = _group_sizes(states[0]["param_groups"])
        if payload.get("schedule_steps"):
            self._resumed_schedule = (int(payload["schedule_steps"]), int(checkpoint.get("global_step", 0)))
        saved = checkpoint.get("hyper_parameters") or {}
        if "lora" in saved and saved.get("lora") != self.hparams.get("lora"):  # before Lightning's strict weight load
            raise ValueError(f"the checkpoint's run trained with --model.lora {saved.get('lora')!r} but this one has "
                             f"{self.hparams.get('lora')!r}: a resume needs the same LoRA settings (the adapters are "
                             "part of its weights); to train other adapters, start a run with --model.init_from "
                             "RUN/model (LoRA merged)")
        self._resumed_shape = (saved.get("warmup", self.hparams.warmup),
                               saved.get("min_lr_ratio", self.hparams.min_lr_ratio))
        changed = hparam_changes(saved, dict(self.hparams))
        if changed:
            rank_zero_warn("resuming with model settings other than the checkpoint's run: " + "; ".join(changed)
                           + ". The weights, the optimizer (its learning rates, betas, weight decay) and the "
                           "learning-rate schedule (warmup, min_lr_ratio) continue from the checkpoint; to train "
                           "with new settings, start a run with --model.init_from RUN/model")


# ---------------------------------------------------------------------------------- helpers
QUESTION_MODES = ("auto", "vqa", "mixed")
"""The data's ``sample_mode`` values that train VQA records (question + ``data.vqa_suffix``): a run with one
records its suffix in the processor config (``vqa_suffix``), which ``mmlm eval vqa`` then appends."""


def sync_norm_statistics(module: torch.nn.Module) -> None:
    """Broadcast ``module``'s BatchNorm running statistics (a conv stem's) from rank 0, in place; a no-op without
    torch.distributed. ``VLMModule`` keeps DDP from broadcasting buffers in each forward (``configure_model``): DDP's
    broadcast in the first forward after a step, validation's included, is a collective a rank without a
    validation batch never joined, and the others waited forever. Every rank calls this at each validation's
    start instead, so validation sees rank 0's statistics, as it did; the other buffers are constants."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for buffer in m.buffers(recurse=False):
                dist.broadcast(buffer.data, src=0)


def schedule_change(old_total: int, step: int, new_total: int, warmup: float, min_lr_ratio: float) -> str | None:
    """What resuming at optimizer ``step`` with a schedule of ``new_total`` steps (a changed
    ``trainer.max_steps``) does to a run scheduled over ``old_total``; None when nothing changes."""
    from mmlm.training.optim import resolve_warmup, warmup_cosine

    if old_total == new_total:
        return None
    before = warmup_cosine(old_total, resolve_warmup(warmup, old_total), min_lr_ratio)(step)
    after = warmup_cosine(new_total, resolve_warmup(warmup, new_total), min_lr_ratio)(step)
    return (f"the learning-rate schedule now spans {new_total} steps where the checkpoint's run had {old_total} "
            f"(trainer.max_steps changed): warmup + cosine are redrawn over {new_total} steps and continue from "
            f"step {step}, so the learning rate goes from {before:.3g}x to {after:.3g}x of its peak")


def _group_sizes(groups) -> list[str]:
    """``["lm.decay: 7 tensors", ...]``: an optimizer's (or its state dict's) parameter groups."""
    return [f"{g.get('name', f'group{i}')}: {len(g['params'])} tensors" for i, g in enumerate(groups)]


def _get_attr_or_hparam(obj, name: str):
    if obj is None:
        return None
    if hasattr(obj, name):
        return getattr(obj, name)
    hp = getattr(obj, "hparams", None)
    try:
        return hp.get(name) if hp is not None else None
    except AttributeError:
        return None


def _datamodule_train(dm):
    for name in ("train_spec", "train_shards", "train"):
        value = _get_attr_or_hparam(dm, name)
        if value is not None and not callable(value):
            return value
    return None


def _num_samples(batch: dict) -> int:
    n = batch.get("num_samples") if isinstance(batch, dict) else None
    if n is None:
        n = batch["input_ids"].shape[0]
    return max(1, int(n))
