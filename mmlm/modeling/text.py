"""The decoder: any transformers causal LM, built from a config dict or a name/path.

``resolve_text_config`` fills ``TextConfig.hf_config`` from ``name`` when it is empty, so
that a saved model carries its whole architecture and rebuilds offline. ``build_language_model``
makes the ``AutoModelForCausalLM``: pretrained weights from ``name`` when asked, random init
from ``hf_config`` otherwise; in float32 either way, whatever dtype the config records (cast the
VLM, or ``mmlm.load(dtype=...)``). Remote code is never run.

The KV cache goes in and out under the name the installed transformers uses (``cache_kwargs``,
``output_cache``): ``cache`` since 5.24, ``past_key_values`` before (now a deprecated alias that warns).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch
from torch import nn

from mmlm.config import TextConfig


def hf_config_object(cfg: TextConfig):
    """The transformers ``PretrainedConfig`` for ``cfg`` (from ``hf_config``, else from ``name``)."""
    from transformers import AutoConfig

    if cfg.hf_config:
        data = dict(cfg.hf_config)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ValueError("text.hf_config needs a 'model_type' (e.g. 'llama', 'qwen2', 'gpt2')")
        # dtype: a hub LM's config records the dtype of its weights file (bfloat16, float16); built from it,
        # the LM would be that dtype, and a float32 checkpoint would load into it rounded
        for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            data.pop(key, None)
        return AutoConfig.for_model(model_type, **data)
    if cfg.name:
        return AutoConfig.from_pretrained(cfg.name, trust_remote_code=False)
    raise ValueError("the text config needs either 'hf_config' (with model_type) or 'name'")


def resolve_text_config(cfg: TextConfig) -> TextConfig:
    """``cfg`` with ``hf_config`` filled in (a no-op when it already is)."""
    if cfg.hf_config:
        return cfg
    hf = hf_config_object(cfg).to_dict()
    return TextConfig(hf_config=hf, name=cfg.name, pretrained=cfg.pretrained, attn_implementation=cfg.attn_implementation)


def build_language_model(cfg: TextConfig) -> nn.Module:
    """An ``AutoModelForCausalLM``; pretrained from ``cfg.name`` or randomly initialised."""
    from transformers import AutoModelForCausalLM

    if cfg.pretrained and not cfg.name:
        raise ValueError("text.pretrained=True needs text.name (a hub name or local path)")
    try:
        if cfg.pretrained:
            return AutoModelForCausalLM.from_pretrained(
                cfg.name, config=hf_config_object(cfg) if cfg.hf_config else None,
                attn_implementation=cfg.attn_implementation, trust_remote_code=False, dtype=torch.float32,
            )
        return AutoModelForCausalLM.from_config(hf_config_object(cfg), attn_implementation=cfg.attn_implementation,
                                                trust_remote_code=False, dtype=torch.float32)
    except ValueError as e:  # e.g. Gemma-2 has no SDPA attention in transformers: name mmlm's option
        if "attention implementation" not in str(e) and "attn_implementation" not in str(e):
            raise
        raise ValueError(f"text.attn_implementation={cfg.attn_implementation!r}: {str(e).splitlines()[0]} (set "
                         "text.attn_implementation, e.g. --model.model_overrides.text.attn_implementation eager)"
                         ) from e


@functools.cache
def _forward_takes_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def cache_kwargs(lm: nn.Module, cache: Any) -> dict:
    """``{name: cache}`` for ``lm``'s forward: ``cache`` (transformers >= 5.24) or ``past_key_values``
    (earlier). A peft-wrapped LM is asked about its base model."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return {"cache" if _forward_takes_cache(type(base)) else "past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The KV cache of a transformers model output: its ``cache`` field (transformers >= 5.24; reading
    the old ``past_key_values`` name there warns), else ``past_key_values``, else None."""
    if dataclasses.is_dataclass(out) and any(f.name == "cache" for f in dataclasses.fields(out)):
        return out.cache
    return getattr(out, "past_key_values", None)
