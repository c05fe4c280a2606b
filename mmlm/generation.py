"""Batched, KV-cached generation on top of a ``VLM``.

``generate(vlm, input_ids, pixel_values, attention_mask, ...)`` takes left-padded prompts
(the processor's generation inputs; a row that ends in padding is a ``ValueError``) and returns
the new tokens only, (B, T) padded with ``pad_token_id`` after each row's end (default: the first eos id,
which a tokenizer's ``decode(skip_special_tokens=True)`` drops; never a text token such as GPT-2's id 0, "!"). Decoding: greedy,
sampling (temperature, top-k, top-p; seeded per sample, see :func:`sample_seed`), or beam search (``num_beams`` > 1, delegated to
transformers' beam search over the same input embeddings). A row ends at an eos token, when ``stop(generated)``
says so (stop strings are checked by the caller, who has the tokenizer), at
``max_new_tokens``, or at the LM's last position (``max_position_embeddings``: no token is generated
past the positions the model has; a prompt that already fills them is a ``ValueError``).
``on_tokens(next_ids)`` is called after every step (streaming). The model runs in eval mode (no dropout)
whatever mode it is in; its modules' modes are restored afterwards. Beam search calls neither ``stop``
nor ``on_tokens``: its rows end at eos or ``max_new_tokens`` and come back whole (callers cut the
text at stop strings afterwards, as ``mmlm.api.generate_texts`` does).
``compile=True`` runs the one-token decode step compiled (static cache; CUDA graphs on a GPU).

Our own loop (not ``transformers.generate``) for greedy/sampling: it is lean per step,
which dominates decode time for small models; a test proves it equal to transformers'.
The model is never asked about the tokenizer: ids in, ids out.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from mmlm.modeling.text import cache_kwargs


@dataclass
class GenerationConfig:
    """Decoding options shared by ``describe``, ``chat`` and ``eval``."""

    max_new_tokens: int = 64
    """Most tokens generated per sample (fewer where the prompt leaves less of the LM's positions)."""
    do_sample: bool = False
    """Sample instead of greedy/beam decoding."""
    temperature: float = 1.0
    """Softmax temperature when sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling (0: all)."""
    num_beams: int = 1
    """Beam search width (1: no beam search)."""
    seed: int | None = None
    """Seed for sampling (reproducible outputs): each sample draws from its own stream, seeded by
    :func:`sample_seed` from this seed and the sample's identity (its row, or what the caller names
    it by: ``describe`` uses the image's path, else its index), so a sample's text does not depend on the
    batch it is generated in, its place in that batch, or a resumed run."""
    use_cache: bool = True
    """Reuse keys/values of past tokens (False recomputes the whole sequence each step)."""
    cache: Literal["dynamic", "static"] = "dynamic"
    """KV cache kind: ``dynamic`` (grows each step) or ``static`` (transformers' ``StaticCache``, sized
    prompt + max_new_tokens up front: fixed shapes, no reallocation; the kind ``torch.compile`` of the
    decode step needs). Greedy outputs are the same either way (tested); eager decoding is slower with
    it, since attention spans every preallocated slot."""
    compile: bool = False
    """Compile the one-token decode step: ``torch.compile`` through transformers' ``get_compiled_call``
    (CUDA graphs on a GPU, inductor on a CPU); the prompt's prefill stays eager. Decodes with a static
    cache (sets ``cache`` to ``static``) whose length is rounded up to a multiple of 64, so batches of
    similar prompt lengths reuse one compiled step. The first call compiles (seconds to a minute; on a
    CPU each new batch size and cache length compiles once); greedy outputs equal eager decoding
    (tested). Greedy and sampling only, not beam search."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: all tokens), got {self.top_k}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("choose beam search or sampling, not both")
        unused = [f"{name}={value}" for name, value, default in (
            ("temperature", self.temperature, 1.0), ("top_p", self.top_p, 1.0), ("top_k", self.top_k, 0),
            ("seed", self.seed, None)) if value != default]
        if unused and not self.do_sample:
            warnings.warn(f"{', '.join(unused)} apply to sampling only: set do_sample (decoding is greedy or beam "
                          "search now)", stacklevel=3)
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"unknown cache {self.cache!r}; known: ['dynamic', 'static']")
        if self.compile:
            if self.num_beams > 1:
                raise ValueError("compile applies to greedy decoding and sampling, not beam search (num_beams > 1)")
            if not self.use_cache:
                raise ValueError("compile needs the KV cache (use_cache=True)")
            self.cache = "static"


def sample_seed(seed: int, key: int | str) -> int:
    """The sampling seed of one sample: a 63-bit hash of the run's ``seed`` and the sample's ``key``
    (its index, or a path or id), the same in every batch, order and process."""
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_next(logits: torch.Tensor, cfg: GenerationConfig,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids, greedy or sampled with temperature/top-k/top-p (``generator``:
    one for the batch, or one per row: each row then draws from its own stream)."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the first token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs.split(1), generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


CACHE_BUCKET = 64
"""A compiled decode step's static cache length is a multiple of this (fewer distinct shapes)."""


def static_cache_length(prompt_len: int, max_new_tokens: int, compiled: bool) -> int:
    """Slots of the static KV cache: prompt + new tokens, rounded up to ``CACHE_BUCKET`` when compiled."""
    need = prompt_len + max_new_tokens
    return -(-need // CACHE_BUCKET) * CACHE_BUCKET if compiled else need


def decode_compile_config(device: torch.device):
    """transformers' ``CompileConfig`` for the decode step. On a GPU: mode ``reduce-overhead`` (CUDA
    graphs, one per shape) with torch's automatic dynamic shapes (one symbolic-shape compile serves
    every later batch size and cache length). Elsewhere: mode ``default`` with static shapes
    (``dynamic=False``, one compile per batch size and cache length; the bucketed static cache keeps
    them few): torch 2.11's CPU inductor miscompiles the symbolic-shape step (a C++ error)."""
    from transformers import CompileConfig

    if device.type == "cuda":
        return CompileConfig(mode="reduce-overhead")
    return CompileConfig(mode="default", dynamic=False)


def compiled_decode_step(lm):
    """``lm``'s forward compiled for one-token decode steps (``decode_compile_config``), cached on ``lm``
    by transformers' ``get_compiled_call`` (which ``transformers.generate`` uses too)."""
    config = decode_compile_config(lm.device)
    if hasattr(lm, "get_compiled_call"):
        return lm.get_compiled_call(config)
    return torch.compile(lm, **config.to_dict())


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)


def _fit_positions(vlm, cfg: GenerationConfig, positions: torch.Tensor) -> GenerationConfig:
    """``cfg`` with ``max_new_tokens`` cut to the LM positions left after the prompt (B, L) ``positions``
    (each new token takes the next one): a model with learned position embeddings (GPT-2) would fail with
    an index error past them, a rotary one would silently decode at positions it never saw."""
    limit = getattr(vlm.lm.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 1:
        return cfg
    room = limit - (int(positions[:, -1].max()) + 1)
    if room < 1:
        raise ValueError(f"the prompt takes {limit - room} positions but the model has {limit} "
                         "(max_position_embeddings): nothing left to generate; shorten the prompt")
    return replace(cfg, max_new_tokens=room) if cfg.max_new_tokens > room else cfg


def in_eval_mode(fn):
    """Run ``fn(vlm, ...)`` with every module of ``vlm`` in eval mode (no dropout: a model fresh from
    ``from_preset`` or a training loop is in train mode), each module's own mode restored afterwards."""

    @functools.wraps(fn)
    def wrapper(vlm, *args, **kwargs):
        training = [m for m in vlm.modules() if m.training]
        for m in training:
            m.training = False
        try:
            return fn(vlm, *args, **kwargs)
        finally:
            for m in training:
                m.training = True

    return wrapper


@torch.no_grad()
@in_eval_mode
def generate(
    vlm,
    input_ids: torch.Tensor,  # (B, L) left-padded
    pixel_values: torch.Tensor | None = None,  # (N, 3, H, W)
    attention_mask: torch.Tensor | None = None,  # (B, L)
    *,
    num_images: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    seed_keys: Sequence[int | str] | None = None,
    **options,
) -> torch.Tensor:
    """New tokens (B, T); see the module docstring. ``options`` are ``GenerationConfig`` fields.
    ``seed_keys``: what each row is known by for its sampling seed (``sample_seed(seed, key)``;
    default: the row index)."""
    cfg = config or GenerationConfig(**options)
    if config is not None and options:
        raise ValueError("pass either config= or generation options, not both")
    if seed_keys is not None and len(seed_keys) != input_ids.shape[0]:
        raise ValueError(f"{len(seed_keys)} seed_keys for {input_ids.shape[0]} rows")
    device = vlm.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if not bool(attention_mask[:, -1].all()):  # the first new token would be predicted from a pad
        raise ValueError("generate takes left-padded prompts, but a row ends in padding (attention_mask 0 in the "
                         "last column): pad with padding_side='left' (processor(text=...), processor.pad(..., 'left'))")
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])),
                       dtype=torch.long, device=device)
    if pad_token_id is None:  # without eos no row ends early, so nothing is padded
        pad_token_id = int(eos[0]) if eos.numel() else 0
    embeds = vlm.embed(input_ids, pixel_values, num_images)  # (B, L, D)
    # the prompt's LM positions (B, L), each new token the last one + 1; shared image positions repeat one
    shared = vlm.config.image_positions == "shared"
    positions = vlm.position_ids(input_ids, attention_mask, _positions(attention_mask))
    cfg = _fit_positions(vlm, cfg, positions)
    if cfg.num_beams > 1:
        return _beam_search(vlm, embeds, attention_mask, cfg, eos, pad_token_id, positions if shared else None)

    generator = None
    batch = input_ids.shape[0]
    if cfg.do_sample and cfg.seed is not None:  # a stream per row: its draws do not depend on the other rows
        keys = range(batch) if seed_keys is None else seed_keys
        generator = [torch.Generator(device=device).manual_seed(sample_seed(cfg.seed, k)) for k in keys]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, cfg.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    embed_tokens = vlm.lm.get_input_embeddings()
    prompt_len = attention_mask.shape[1]
    cache = None
    static = cfg.use_cache and cfg.cache == "static"
    total = static_cache_length(prompt_len, cfg.max_new_tokens, cfg.compile)  # prompt + new tokens (+ bucket)
    if static:
        from transformers import StaticCache

        cache = StaticCache(config=vlm.lm.config, max_cache_len=total)
    elif cfg.use_cache:
        from transformers import DynamicCache

        cache = DynamicCache(config=vlm.lm.config)
    step_embeds, step_pos = embeds, positions
    # prompts without padding need no mask at all (plain causal attention, nothing built per step);
    # padded ones grow a view of one preallocated (B, L + T) mask instead of a torch.cat per token
    full_mask = None
    # shared image positions repeat a position, which transformers reads as a new packed sample when no
    # mask is given: those models always get one
    if not bool(attention_mask.all()) or shared:
        full_mask = torch.ones((batch, total), dtype=attention_mask.dtype, device=device)
        full_mask[:, :prompt_len] = attention_mask
    step = compiled_decode_step(vlm.lm) if cfg.compile else vlm.lm
    cache_arg = cache_kwargs(vlm.lm, cache)  # the same cache object every step, under transformers' name for it
    graphs = cfg.compile and device.type == "cuda"
    for t in range(cfg.max_new_tokens):
        # a static cache attends over all its slots (the unwritten ones are causally masked): whole mask
        attention_mask = None if full_mask is None else full_mask if static else full_mask[:, : prompt_len + t]
        if graphs and t > 0:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: reuse the graph
        logits = (step if t > 0 else vlm.lm)(
            inputs_embeds=step_embeds, attention_mask=attention_mask, position_ids=step_pos,
            use_cache=cfg.use_cache, logits_to_keep=1, **cache_arg,
        ).logits[:, -1].float()  # (B, V)
        nxt = sample_next(logits, cfg, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        out[:, t] = nxt
        if on_tokens is not None:
            on_tokens(nxt)
        finished |= torch.isin(nxt, eos)
        if stop is not None:
            finished |= stop(out[:, : t + 1])
        if bool(finished.all()):
            return out[:, : t + 1]
        new_embed = embed_tokens(nxt[:, None])  # (B, 1, D)
        if cfg.use_cache:
            step_embeds, step_pos = new_embed, step_pos[:, -1:] + 1
        else:
            step_embeds = torch.cat([step_embeds, new_embed], dim=1)
            step_pos = torch.cat([step_pos, step_pos[:, -1:] + 1], dim=1)
    return out


def _beam_search(vlm, embeds, attention_mask, cfg: GenerationConfig, eos: torch.Tensor, pad_token_id: int,
                 positions: torch.Tensor | None = None):
    """Beam search through transformers' implementation, on our input embeddings. ``positions`` (B, L):
    the prompt's LM positions when they are not the attention mask's count (shared image positions);
    transformers 5 extends them by one per new token and copies them per beam.

    transformers fills every option not passed from the LM's ``generation_config`` (a pretrained LM's
    ``generation_config.json``: ``repetition_penalty``, ``no_repeat_ngram_size``, its ``eos_token_id``, ...),
    which greedy decoding and sampling here never read; the search runs with a default one instead, so
    that only ``GenerationConfig``'s options and ``eos`` (none: run to ``max_new_tokens``) apply."""
    from transformers import GenerationConfig as HFGenerationConfig

    extra = {}
    if positions is not None:
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            raise ValueError("beam search for a model with shared image positions needs transformers >= 5 "
                             f"(installed: {transformers.__version__}); use greedy decoding or sampling")
        extra["position_ids"] = positions
    lm = vlm.lm
    saved = lm.generation_config
    lm.generation_config = HFGenerationConfig()
    try:
        seqs = lm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, num_beams=cfg.num_beams, do_sample=False,
            max_new_tokens=cfg.max_new_tokens, eos_token_id=eos.tolist() or None, pad_token_id=pad_token_id,
            early_stopping=True, **extra,
        )
    finally:
        lm.generation_config = saved
    return seqs  # with inputs_embeds, decoder-only generate returns only the new tokens
