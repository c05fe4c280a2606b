"""The vision-language model: encoder -> projector -> image tokens inside an LM's sequence.

``VLM.forward(input_ids, pixel_values, attention_mask, labels)`` embeds the text, replaces
the ``<image>`` placeholder positions by projected image features (0, 1 or several images
per sample; ``pixel_values`` holds the images of the whole batch in order, ``num_images``
how many belong to each sample) and runs the LM. With labels it returns the shifted
cross-entropy over labels != -100. Packed rows pass ``position_ids`` that restart at 0 for
each sample and no attention mask: transformers then keeps attention within each sample.

``pixel_values`` are either float, normalised already (what ``Processor.encode`` returns by
default), or uint8 RGB (the fitted images as they are: what the training data pipeline sends,
4x fewer bytes), which ``encode_images`` normalises on the model's device with the model's own
``image_transform()`` mean/std (``mmlm.pixels.normalize_pixels``, bit-identical to the
processor's float path). Under autocast the normalisation runs in float32 and the encoder then
sees the same float input as on the float path.

``forward(..., return_logits=False)`` (what training and validation use: they need the loss
only) returns ``logits=None``. With labels, no KV cache and an LM that
``labelled_loss_parts`` accepts (the stock transformers causal LM of an allowlisted
``model_type``, whose logits are exactly ``lm_head(last hidden state)``), the output layer
then runs only at the labelled positions: the same loss, without building the (B, L, V)
logits. Any other LM (other model types, peft-wrapped LMs) computes the full logits and drops
them.

This module holds nn.Modules only: no tokenizer, no data code, no file I/O but weights.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlm.config import ImageTransformConfig, VLMConfig
from mmlm.modeling.fusion import (
    check_image_tokens,
    labelled_cross_entropy,
    projected_cross_entropy,
    merge_image_features,
    shared_image_positions,
    shifted_cross_entropy,
)
from mmlm.modeling.projector import build_projector
from mmlm.modeling.text import build_language_model, cache_kwargs, output_cache, resolve_text_config
from mmlm.modeling.vision import build_vision_encoder
from mmlm.pixels import normalize_pixels


IMAGE_POSITIONS = ("sequential", "shared")  # VLMConfig.image_positions

# Causal-LM ``model_type``s whose ``*ForCausalLM.forward`` computes exactly
# ``logits = lm_head(model(...).last_hidden_state)`` and nothing after it (checked in transformers
# 5.x, models/<type>/modeling_<type>.py). Left out on purpose: gemma2/gemma3 (final logit
# softcapping), cohere/cohere2 (logit_scale), granite/granitemoe (logits_scaling), MoE models
# (router outputs), gpt2 and others whose decoder is not ``.model``. Add a type only after reading
# its forward.
LABELLED_LOSS_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "olmo2", "smollm3", "starcoder2"}
)


def labelled_loss_parts(lm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, output_layer)`` when ``lm(inputs_embeds=...).logits`` is exactly
    ``output_layer(decoder(inputs_embeds=...).last_hidden_state)``, so the loss may be computed
    from the hidden states at the labelled positions only; ``None`` otherwise (use full logits).

    Only the stock transformers ``*ForCausalLM`` class of a ``config.model_type`` in
    ``LABELLED_LOSS_MODEL_TYPES`` qualifies, and a peft ``PeftModel`` holding one with LoRA adapters (as
    LoRA training installs on ``vlm.lm``): LoRA replaces the adapted layers in place, so the base model's
    decoder and head compute the adapted forward (the head too when it is adapted or in
    ``modules_to_save``). Other wrappers (prompt-learning adapters, a compiled module) and subclasses
    defined elsewhere, whose forward may differ, get ``None``. Reads ``lm`` only.
    """
    from transformers import PreTrainedModel

    if type(lm).__module__.startswith("peft.") and hasattr(lm, "get_base_model"):
        config = getattr(lm, "active_peft_config", None)
        peft_type = getattr(getattr(config, "peft_type", None), "value", None)
        if peft_type != "LORA" or getattr(config, "is_prompt_learning", True):
            return None
        lm = lm.get_base_model()
    if not isinstance(lm, PreTrainedModel):
        return None
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in LABELLED_LOSS_MODEL_TYPES:
        return None
    cls = type(lm)
    stock_module = f"transformers.models.{model_type}.modeling_{model_type}"
    if cls.__module__ != stock_module or not cls.__name__.endswith("ForCausalLM"):
        return None
    decoder = getattr(lm, "model", None)
    head = lm.get_output_embeddings()
    if not isinstance(decoder, nn.Module) or head is None:
        return None
    return decoder, head


# float buffers that stay float32 whatever the model's dtype: rotary inverse frequencies (transformers
# keeps them float32 when it loads a model in bf16/fp16; rounded to bf16, a position's angles drift by
# up to ~0.4% of the position: at a few hundred tokens in, attention no longer sees the positions trained)
FLOAT32_BUFFERS = ("inv_freq", "original_inv_freq")


def float32_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``model``'s float32 ``FLOAT32_BUFFERS``, by name: what ``restore_float32_buffers`` puts back
    after a cast of the whole model (``model.to(torch.bfloat16)``, Lightning's ``*-true`` precisions)."""
    return {name: b.detach().clone() for name, b in model.named_buffers()
            if name.rsplit(".", 1)[-1] in FLOAT32_BUFFERS and b.dtype == torch.float32}


def restore_float32_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> int:
    """Put the ``saved`` float32 buffers back into ``model`` (on each one's current device, persistence
    kept) where a cast changed their dtype; returns how many were restored."""
    restored = 0
    for name, value in saved.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        current = getattr(module, attr, None)
        if not isinstance(current, torch.Tensor) or current.dtype == torch.float32:
            continue
        persistent = attr not in module._non_persistent_buffers_set
        module.register_buffer(attr, value.to(current.device), persistent=persistent)
        restored += 1
    return restored


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, L, V)
    past_key_values: Any = None


class VLM(nn.Module):
    """A LLaVA-style model: ``vision`` (encoder), ``projector`` and ``lm`` (a causal LM)."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        config = config.updated(text=resolve_text_config(config.text))
        self.config = config
        self.vision = build_vision_encoder(config.vision)
        self.lm = build_language_model(config.text)
        text_dim = self.lm.get_input_embeddings().embedding_dim
        self.projector = build_projector(config.projector, self.vision.embed_dim, text_dim, self.vision.num_patches)
        self.num_image_tokens = self.projector.num_tokens(self.vision.num_patches)
        if self.num_image_tokens < 1:
            raise ValueError("the projector leaves no image tokens: lower pixel_shuffle_factor")
        # the loss of the labelled rows (see ``forward``); ``mmlm.training.compile`` swaps in a compiled copy
        self.projected_loss = projected_cross_entropy
        if config.image_positions not in IMAGE_POSITIONS:
            raise ValueError(f"unknown image_positions {config.image_positions!r}; known: {list(IMAGE_POSITIONS)}")
        if config.image_positions == "shared" and not config.projector.position_embedding:
            raise ValueError("image_positions='shared' needs projector.position_embedding=True: the image tokens "
                             "would share one position and nothing would say where each lies")
        vocab = self.lm.get_input_embeddings().num_embeddings
        if config.image_token_id != -1 and not 0 <= config.image_token_id < vocab:  # -1: not set yet
            raise ValueError(
                f"image_token_id={config.image_token_id} is outside the LM vocabulary (size {vocab}); "
                "build the model with the processor's image token id"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VLM":
        """A model from a named preset (see ``mmlm.presets.PRESETS``), with config overrides."""
        from mmlm.presets import get_preset

        return cls(get_preset(name).updated(**overrides))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device | None = None) -> "VLM":
        """Load a checkpoint directory written by ``save_pretrained`` (safetensors only)."""
        from mmlm.checkpoint import load_vlm

        return load_vlm(path, device=device)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` atomically into directory ``path``."""
        from mmlm.checkpoint import save_vlm

        save_vlm(self, path)

    def image_transform(self) -> ImageTransformConfig:
        return self.vision.image_transform()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _apply(self, fn, recurse=True):
        # a cast of the whole model (vlm.to(torch.bfloat16), .half(), Lightning's *-true precisions) keeps the
        # rotary frequencies float32, as transformers' from_pretrained(dtype=...) does (see FLOAT32_BUFFERS)
        keep = float32_buffers(self)
        out = super()._apply(fn, recurse)
        restore_float32_buffers(self, keep)
        return out

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor, vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, H, W) -> (N, T, D_text) image tokens. ``pixel_values``: float, normalised as
        ``image_transform()`` says, or uint8 RGB, normalised here (on their device, in float32).
        ``vision_features`` (N, P, D_vision): the encoder's output for these images when it is known
        already (``mmlm.training.feature_cache``); the projector then runs on it and the encoder does not."""
        if vision_features is None:
            vision_features = self.vision_features(pixel_values)
        elif vision_features.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"vision_features holds {vision_features.shape[0]} images but pixel_values "
                             f"{pixel_values.shape[0]}")
        return self.projector(vision_features)

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The LM's positions (B, L) for ``input_ids``: ``position_ids`` as given (None: the LM's default)
        with ``image_positions="sequential"``; with ``"shared"``, ``fusion.shared_image_positions``."""
        if self.config.image_positions == "sequential":
            return position_ids
        return shared_image_positions(input_ids, self.config.image_token_id, self.num_image_tokens,
                                      attention_mask, position_ids)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, D_vision): the vision encoder's output (before the projector)."""
        size = self.image_transform().size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be (N, 3, {size}, {size}) (the processor's output for this model), "
                             f"got {tuple(pixel_values.shape)}")
        dtype = next(self.vision.parameters()).dtype
        if pixel_values.dtype == torch.uint8:
            mean, std = self._pixel_stats(pixel_values.device)
            pixel_values = normalize_pixels(pixel_values, mean, std)
        elif not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be uint8 RGB (normalised by the model) or floating point "
                             f"(normalised already), got {pixel_values.dtype}")
        return self.vision(pixel_values.to(dtype))

    def _pixel_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The image transform's mean and std as float32 tensors on ``device``, made once per device
        (a host-to-device copy in every forward would synchronise the CPU with the GPU)."""
        t = self.image_transform()
        key = (str(device), t.mean, t.std)
        cached = self.__dict__.get("_pixel_stats_cache")
        if cached is None or cached[0] != key:
            mean = torch.tensor(t.mean, dtype=torch.float32).to(device)
            std = torch.tensor(t.std, dtype=torch.float32).to(device)
            cached = (key, mean, std)
            self.__dict__["_pixel_stats_cache"] = cached  # a plain attribute: no buffer, not in the state dict
        return cached[1], cached[2]

    def embed(
        self,
        input_ids: torch.Tensor,  # (B, L)
        pixel_values: torch.Tensor | None = None,  # (N, 3, H, W)
        num_images: torch.Tensor | None = None,  # (B,)
        vision_features: torch.Tensor | None = None,  # (N, P, D_vision)
    ) -> torch.Tensor:
        """Token embeddings with image features at the placeholder positions: (B, L, D)."""
        image_id = self.config.image_token_id
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_images and image_id < 0:
            raise ValueError("this model has no image_token_id (built without one), so it cannot place images: build it "
                             "with image_token_id=tokenizer.convert_tokens_to_ids('<image>'), e.g. "
                             "VLM.from_preset(name, image_token_id=...)")
        check_image_tokens(input_ids, image_id, self.num_image_tokens, n_images, num_images)
        embeds = self.lm.get_input_embeddings()(input_ids)
        if n_images:
            feats = self.encode_images(pixel_values, vision_features)
            embeds = merge_image_features(input_ids, embeds, feats, image_id)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        pixel_values: torch.Tensor | None = None,  # (N, 3, H, W)
        attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
        labels: torch.Tensor | None = None,  # (B, L), -100 = no loss
        position_ids: torch.Tensor | None = None,  # (B, L)
        num_images: torch.Tensor | None = None,  # (B,)
        past_key_values: Any = None,
        use_cache: bool = False,
        return_logits: bool = True,
        vision_features: torch.Tensor | None = None,  # (N, P, D_vision)
    ) -> VLMOutput:
        """Loss (with ``labels``) and logits (B, L, V). ``return_logits=False`` returns ``logits=None``
        and, where ``labelled_loss_parts`` allows (with labels and no cache), never builds the full
        logits: the output layer runs on the labelled positions only; the loss is the same.
        ``vision_features``: the vision encoder's output for ``pixel_values``, when known (see ``encode_images``)."""
        embeds = self.embed(input_ids, pixel_values, num_images, vision_features)  # (B, L, D)
        if self.config.image_positions == "shared" and past_key_values is None:
            if position_ids is not None:
                raise ValueError("packed rows (position_ids) cannot use shared image positions: transformers reads "
                                 "the packed samples' boundaries from the positions; train with data.packing false")
            if attention_mask is None:  # without a mask transformers would read repeated positions as new samples
                attention_mask = torch.ones_like(input_ids)
            position_ids = self.position_ids(input_ids, attention_mask)
        elif self.config.image_positions == "shared" and position_ids is None:
            raise ValueError("a model with shared image positions needs position_ids with past_key_values")
        fast = labels is not None and not return_logits and not use_cache and past_key_values is None
        parts = labelled_loss_parts(self.lm) if fast else None
        if parts is not None:
            decoder, head = parts
            hidden = decoder(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (B, L, D)
            loss = labelled_cross_entropy(hidden, labels, head, self.config.ignore_index, project=self.projected_loss)
            return VLMOutput(loss=loss, logits=None, past_key_values=None)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(self.lm, past_key_values),
        )
        loss = None
        if labels is not None:
            loss = shifted_cross_entropy(out.logits, labels, self.config.ignore_index)
        logits = out.logits if return_logits else None
        return VLMOutput(loss=loss, logits=logits, past_key_values=output_cache(out))

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, num_images=None, **kwargs):
        """Batched, KV-cached generation; see ``mmlm.generation.generate`` for the options. The model knows no
        tokenizer: pass ``eos_token_id=processor.stop_token_ids`` (without it every row runs to
        ``max_new_tokens``, with a warning)."""
        from mmlm.generation import generate

        if "labels" in kwargs:
            raise ValueError("generate takes prompts (processor(text=...)), not training inputs with labels "
                             "(processor(conversations=...))")
        if kwargs.get("eos_token_id") is None:
            warnings.warn("generate without eos_token_id: every row runs to max_new_tokens; pass "
                          "eos_token_id=processor.stop_token_ids", stacklevel=2)
        return generate(self, input_ids, pixel_values, attention_mask, num_images=num_images, **kwargs)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
