"""mmlm -> transformers LLaVA.

``export_hf(model, out)`` writes an mmlm checkpoint (or a ``(vlm, processor)`` pair) as a stock
``LlavaForConditionalGeneration`` directory (config, safetensors, generation config,
``LlavaProcessor`` with a matching image processor and the chat template) that
``AutoModelForImageTextToText``/``AutoProcessor`` load. Its steps are public too:
``check_exportable(vlm)`` (the plan, or ``ExportError`` naming what cannot be represented and what
would be needed), ``to_llava`` (a LLaVA model sharing ``vlm``'s tensors), ``to_llava_processor``
(with ``image_processor_for``, ``export_chat_template`` and ``prompt_tokenizer``), with
``timm_to_hf_vision`` (a timm ViT as a transformers CLIP/SigLIP tower) in
:mod:`mmlm.interop.timm_towers` and the tensor-sharing helpers (``_adopt``, ``_no_meta``) in
:mod:`mmlm.interop._common`.

Decisions worth knowing:

- mmlm prunes vision layers after the feature layer, so an export holds only the layers kept:
  ``vision_config.num_hidden_layers`` is the kept count and ``vision_feature_layer`` is -1 (the
  same features as the original tower's ``feature_layer``). The tower's final norm, unused by
  LLaVA, is written as an identity LayerNorm (weight 1, bias 0) so that the checkpoint is complete.
- ``vision_feature_select_strategy``: "default" (drop the class token) for a CLIP tower with
  ``drop_prefix_tokens``; "full" otherwise (SigLIP has no class token, and "default" would drop a
  patch). ``num_additional_image_tokens`` is the tower's class-token count.
- Projectors: ``mlp2x_gelu`` is LLaVA's (``projector_hidden_act="gelu"``) when its hidden width is
  the LM's; ``linear`` exports exactly as linear_1 = the map, ``projector_hidden_act="linear"`` and
  linear_2 = identity (and imports back folded into one linear). ``pixel_shuffle`` and other
  widths cannot be represented and are refused with what would be needed.
- Vision towers: transformers CLIP/SigLIP (backend "hf") export as they are. timm ViTs cannot go
  through transformers' ``TimmWrapperModel``: LLaVA reads the tower's ``hidden_states`` as
  (B, tokens, D), and the wrapper returns timm's ``forward_intermediates`` feature maps
  (B, D, H, W) without the class token. A timm ViT with CLIP's layout (class token + pre-norm)
  or SigLIP's (no class token, no pre-norm) is converted, exactly, into a transformers
  CLIP/SigLIP tower; others (register tokens, conv stem, layer scale, qk-norm, ...) are refused.
- Weights are written by transformers' own ``save_pretrained``, so key names are those of the
  installed transformers (which keeps the original-format names for compatibility). LLaVA ties
  ``lm_head`` to ``language_model.embed_tokens``; an LM with tied embeddings under another name
  (GPT-2's ``wte``) is exported untied, with ``lm_head`` an equal copy (same logits).
- Generation: the export's ``generation_config`` and ``text_config`` stop on mmlm's stop tokens (eos +
  end-of-turn) and carry the tokenizer's bos/pad ids, not the LM class's defaults.
- Image processors: ``squash`` -> CLIPImageProcessor resizing to (S, S); ``crop`` -> shorter side
  to floor(S / crop_pct) + centre crop S; ``pad`` -> LlavaImageProcessor with ``do_pad``.
  transformers resizes with torchvision, mmlm with PIL: the same geometry, up to resampling
  rounding; images already S x S give identical pixels. Two small known differences: a centre
  crop with an odd excess is one pixel off (transformers floors the offset, timm/mmlm round it),
  and ``pad`` fills with int(mean * 255) (LLaVA's and transformers' colour) where mmlm rounds.
- The exported chat template is the checkpoint's, prefixed so that it also accepts transformers'
  list contents (``[{"type": "image"}, {"type": "text", ...}]``) and puts the processor's
  ``system_prompt`` first, as mmlm does.
- The exported tokenizer (``prompt_tokenizer``) adds no special tokens of its own: the rendered
  template is the whole input, as mmlm tokenizes it (a template for a BOS-adding LM, e.g.
  ``vicuna_v1``, writes ``bos_token`` itself). transformers 5 skips the tokenizer's BOS only in a
  processor's ``apply_chat_template(tokenize=True)``; ``processor(text=prompt)`` (the model cards'
  way) and a tokenizer's own call would add a second one, with other logits. So both transformers
  ways and vLLM's (the template rendered, then tokenized with or without special tokens) give
  mmlm's ids; a prompt written by hand must be what the template renders, BOS included. The
  setting lives in ``tokenizer.json``'s post-processor (transformers 5 saves no ``add_bos_token``);
  the export reloads the tokenizer it wrote to check it.
- The exported tokenizer pads on the left (``padding_side`` "left", as llava-hf's checkpoints):
  batched ``generate`` continues every prompt from its last token, as mmlm's batched generation does.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from mmlm.config import ImageTransformConfig
from mmlm.interop._common import _RESAMPLE_IDS, ExportError, _adopt, _no_meta, _resolve_dtype, _write_dir
from mmlm.interop.timm_towers import timm_to_hf_vision
from mmlm.processing import IMAGE_TOKEN, Processor
from mmlm.templates import LIST_CONTENT_PRELUDE

__all__ = [
    "ExportError", "adds_special_tokens", "check_exportable", "export_chat_template", "export_hf",
    "image_processor_for", "prompt_tokenizer", "timm_to_hf_vision", "to_llava", "to_llava_processor",
]


def _projector_as_llava(projector: nn.Module, text_dim: int) -> tuple[dict[str, torch.Tensor], str]:
    """The mmlm projector's tensors under LLaVA's names, and its ``projector_hidden_act``."""
    from mmlm.modeling.projector import LinearProjector, MLP2xGeluProjector

    if isinstance(projector, MLP2xGeluProjector):
        return dict(projector.named_parameters()), "gelu"
    if isinstance(projector, LinearProjector):
        w = projector.proj.weight
        eye = torch.eye(text_dim, dtype=w.dtype, device=w.device)
        zero = torch.zeros(text_dim, dtype=w.dtype, device=w.device)
        return {"linear_1.weight": w, "linear_1.bias": projector.proj.bias,
                "linear_2.weight": eye, "linear_2.bias": zero}, "linear"
    raise ExportError(f"projector {type(projector).__name__} cannot be exported")  # check_exportable said why


# ====================================================================== export
def check_exportable(vlm) -> dict:
    """What the LLaVA export of ``vlm`` will be; raises ``ExportError`` naming what cannot be
    represented and what would be needed."""
    from mmlm.modeling.hf_vision import HFVisionEncoder
    from mmlm.modeling.projector import LinearProjector, MLP2xGeluProjector
    from mmlm.modeling.vision import TimmViTEncoder

    problems: list[str] = []
    if type(vlm.lm).__module__.startswith("peft."):
        raise ExportError("the LM carries LoRA adapters: merge them first (mmlm.training.freeze.merge_lora)")
    text_dim = vlm.lm.get_input_embeddings().embedding_dim
    covered = {id(p) for p in vlm.lm.base_model.parameters()}
    covered |= {id(p) for p in vlm.lm.get_output_embeddings().parameters()}
    extra = [n for n, p in vlm.lm.named_parameters() if id(p) not in covered]
    if extra:
        problems.append(f"the LM has weights outside its base model and output embeddings ({extra[:3]}), "
                        "which LLaVA's language_model + lm_head cannot hold")
    proj = vlm.projector
    if vlm.config.image_positions != "sequential":
        problems.append(f"image_positions={vlm.config.image_positions!r}: transformers' LLaVA gives every image "
                        "token its own position")
    if proj.position_embedding is not None:
        problems.append("the projector adds a learned position embedding to each image token "
                        "(projector.position_embedding), which transformers' LLaVA connector has no place for")
    if isinstance(proj, MLP2xGeluProjector):
        if proj.linear_1.out_features != text_dim:
            problems.append(
                f"the mlp2x_gelu projector's hidden width is {proj.linear_1.out_features} but LLaVA's is the LM's "
                f"hidden size ({text_dim}): train with projector.hidden_dim=None (or {text_dim})")
    elif not isinstance(proj, LinearProjector):
        name = vlm.config.projector.name
        need = ("a pixel-shuffle connector (Idefics3/SmolVLM's, Idefics3ForConditionalGeneration), which mmlm "
                "does not export" if name == "pixel_shuffle" else "a transformers architecture with this connector")
        problems.append(
            f"projector {name!r} cannot be represented by transformers' LLaVA, whose connector is "
            f"linear -> activation -> linear over every patch token; it would need {need}. "
            "Use projector 'mlp2x_gelu' or 'linear' for a LLaVA export")
    vision = vlm.vision
    plan: dict = {"text_dim": text_dim}
    if isinstance(vision, HFVisionEncoder):
        plan.update(vision_hf=vision.pruned_hf_config(), vision_tensors=None, prefix=vision.num_prefix_tokens)
    elif isinstance(vision, TimmViTEncoder):
        try:
            hf, tensors, prefix = timm_to_hf_vision(vision)
            plan.update(vision_hf=hf, vision_tensors=tensors, prefix=prefix)
        except ExportError as e:
            problems.append(str(e))
    else:
        problems.append(f"vision encoder {type(vision).__name__} has no transformers equivalent")
    if "prefix" in plan:
        drop = vlm.config.vision.drop_prefix_tokens
        prefix = plan["prefix"]
        if prefix > 1:
            problems.append(f"{prefix} prefix tokens: LLaVA's 'default' strategy drops exactly one")
        plan["strategy"] = "default" if (drop and prefix == 1) else "full"
    if problems:
        raise ExportError("cannot export to transformers LLaVA: " + " | ".join(problems))
    return plan


def image_processor_for(transform: ImageTransformConfig):
    """A transformers image processor doing what ``transform`` does (see the module docstring)."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    s = int(transform.size)
    common = dict(
        do_resize=True, resample=_RESAMPLE_IDS[transform.interpolation], do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(transform.mean), image_std=list(transform.std), do_convert_rgb=True,
        crop_size={"height": s, "width": s},
    )
    if transform.resize_mode == "crop":
        shorter = math.floor(s / transform.crop_pct)
        return CLIPImageProcessor(size={"shortest_edge": shorter}, do_center_crop=True, **common)
    if transform.resize_mode == "pad":
        return LlavaImageProcessor(size={"height": s, "width": s}, do_center_crop=False, do_pad=True, **common)
    return CLIPImageProcessor(size={"height": s, "width": s}, do_center_crop=False, **common)


def crop_difference(transform: ImageTransformConfig) -> str | None:
    """What the export's image processor does differently from ``transform``, when it can: a centre crop whose
    excess is odd (the shorter side's when floor(S / crop_pct) - S is odd; the longer side's for about half of
    non-square images) is one pixel off, as transformers floors the offset where timm and mmlm round it."""
    if transform.resize_mode != "crop":
        return None
    s = int(transform.size)
    excess = math.floor(s / transform.crop_pct) - s
    where = "every image" if excess % 2 else "non-square images whose longer side has an odd excess"
    return (f"the export's centre crop can be one pixel off mmlm's for {where} (transformers floors the crop "
            "offset, mmlm rounds it, as timm does): its pixels, and sometimes its greedy texts, differ slightly; a "
            "model trained with resize_mode squash exports exactly")


def _load_pair(model):
    from mmlm.checkpoint import load_vlm

    if isinstance(model, (str, Path)):
        return load_vlm(model, device="cpu"), Processor.from_pretrained(model)
    return model



def to_llava(vlm, processor=None, plan: dict | None = None, dtype: torch.dtype | None = None):
    """A ``LlavaForConditionalGeneration`` sharing ``vlm``'s tensors (nothing copied but what
    has to be converted)."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    plan = plan or check_exportable(vlm)
    text_config = copy.deepcopy(vlm.lm.config)
    text_config.vocab_size = vlm.lm.get_input_embeddings().num_embeddings
    if processor is not None:  # the tokenizer's special ids, not the LM class's defaults (Llama's eos 2 can
        # be any token of a from-scratch vocabulary; mmlm's own tokenizers have <image> there)
        stops = processor.stop_token_ids
        text_config.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else None)
        text_config.bos_token_id = processor.tokenizer.bos_token_id
        if processor.tokenizer.pad_token_id is not None:
            text_config.pad_token_id = processor.tokenizer.pad_token_id
    vhf = {k: v for k, v in plan["vision_hf"].items() if k not in ("architectures", "transformers_version")}
    vision_config = AutoConfig.for_model(vhf.pop("model_type"), **vhf)
    tensors, act = _projector_as_llava(vlm.projector, plan["text_dim"])
    tie = bool(getattr(text_config, "tie_word_embeddings", False))
    if tie and not hasattr(vlm.lm.base_model, "embed_tokens"):
        # LLaVA ties lm_head to language_model.embed_tokens, which this LM (e.g. GPT-2's wte) lacks:
        # write the output embeddings as their own (equal) tensor instead
        tie = False
        text_config.tie_word_embeddings = False
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=int(vlm.config.image_token_id),
        image_seq_length=int(vlm.num_image_tokens), projector_hidden_act=act,
        vision_feature_select_strategy=plan["strategy"], vision_feature_layer=-1, multimodal_projector_bias=True,
        tie_word_embeddings=tie,
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    vt = llava.model.vision_tower
    core = getattr(vt, "vision_model", vt)

    def identity_norm(name: str, like: torch.Tensor):
        if name.startswith("post_layernorm."):
            return torch.ones(like.shape) if name.endswith("weight") else torch.zeros(like.shape)
        return None

    vision_src = plan["vision_tensors"] if plan["vision_tensors"] is not None else vlm.vision.tower
    if isinstance(vision_src, dict):  # a converted timm tower: the non-persistent buffers are computed
        vision_src = dict(vision_src)
        for name, buf in core.named_buffers():
            if name.endswith("position_ids"):
                vision_src[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    cache: dict = {}
    _adopt(core, vision_src, "vision tower", fill=identity_norm, dtype=dtype, cache=cache)
    _adopt(llava.model.multi_modal_projector, tensors, "projector", dtype=dtype, cache=cache)
    _adopt(llava.model.language_model, vlm.lm.base_model, "language model", dtype=dtype, cache=cache)
    head = vlm.lm.get_output_embeddings()
    if not tie and getattr(vlm.lm.config, "tie_word_embeddings", False):  # untied on export: a copy of its own
        head = {n: p.detach().clone() for n, p in head.named_parameters()}
    _adopt(llava.lm_head, head, "lm head", dtype=dtype, cache=cache)
    _no_meta(llava, "LLaVA model")
    llava.eval()
    if processor is not None:
        gen = llava.generation_config
        gen.eos_token_id = text_config.eos_token_id
        gen.pad_token_id = processor.tokenizer.pad_token_id
        if processor.tokenizer.bos_token_id is not None:
            gen.bos_token_id = processor.tokenizer.bos_token_id
    return llava


def export_chat_template(template: str, system_prompt: str | None = None) -> str:
    """``template`` made to accept transformers' list contents too (images first, then text), and
    to put ``system_prompt`` first in conversations without a system message, as mmlm does."""
    if LIST_CONTENT_PRELUDE not in template:
        template = LIST_CONTENT_PRELUDE + template
    if system_prompt:
        head, body = template[: len(LIST_CONTENT_PRELUDE)], template[len(LIST_CONTENT_PRELUDE):]
        if template.startswith(LIST_CONTENT_PRELUDE):
            template = head + _system_prelude(system_prompt) + body
        else:
            template = _system_prelude(system_prompt) + template
    return template


def _system_prelude(system_prompt: str) -> str:
    literal = json.dumps(system_prompt)
    return (
        "{%- if not (messages | selectattr('role', 'equalto', 'system') | list) -%}"
        "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages -%}{%- endif -%}"
    )


MODEL_TEXT_INPUTS = ("input_ids", "attention_mask")
"""What the exported tokenizer returns (``model_input_names``)."""

_PROBE = "a"


def adds_special_tokens(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` puts tokens of its own (BOS, EOS) around the text's."""
    return tokenizer(_PROBE)["input_ids"] != tokenizer(_PROBE, add_special_tokens=False)["input_ids"]


def prompt_tokenizer(tokenizer):
    """A copy of ``tokenizer`` for the export: it adds no special tokens of its own (the rendered chat
    template is the whole input, BOS included when the template writes one, as mmlm tokenizes it), pads
    on the left (batched generation) and returns ids and mask only."""
    tok = copy.deepcopy(tokenizer)
    if adds_special_tokens(tok):
        # transformers 5's fast tokenizers rewrite their post-processor on these setters (saved in
        # tokenizer.json; add_bos_token itself is not saved); other tokenizers read the attributes
        tok.add_bos_token = False
        tok.add_eos_token = False
        backend = getattr(tok, "backend_tokenizer", None)
        if adds_special_tokens(tok) and backend is not None:
            # transformers 4.x's PreTrainedTokenizerFast ignores the setters: replace the post-processor
            # (saved in tokenizer.json) with one that adds nothing
            from tokenizers import processors

            backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
        if adds_special_tokens(tok):
            raise ExportError(f"the tokenizer ({type(tok).__name__}) adds special tokens around every text and "
                              "cannot be told not to: transformers' processor(text=...) would add a second BOS "
                              "to the chat template's")
    tok.padding_side = "left"
    tok.init_kwargs["padding_side"] = "left"
    # ids and mask only: transformers 4.x tokenizers also return token_type_ids by default, which LLaVA
    # hands to the LM (GPT-2 adds their embeddings: other logits than mmlm's)
    tok.model_input_names = list(MODEL_TEXT_INPUTS)
    tok.init_kwargs["model_input_names"] = list(MODEL_TEXT_INPUTS)
    return tok


def _check_saved_tokenizer(path: Path) -> None:
    """The tokenizer written at ``path`` reloads as ``prompt_tokenizer`` made it."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(path))
    if adds_special_tokens(saved) or saved.padding_side != "left":
        raise ExportError(f"the exported tokenizer ({type(saved).__name__}) reloads adding special tokens or "
                          f"padding on the {saved.padding_side}: transformers would not get the ids mmlm trains on")


def to_llava_processor(vlm, processor, plan: dict):
    """A ``LlavaProcessor`` that makes the inputs ``processor`` makes, for transformers."""
    from transformers import LlavaProcessor

    vhf = plan["vision_hf"]
    image_processor = image_processor_for(processor.config.image_transform)
    template = export_chat_template(processor.chat_template, processor.config.system_prompt)
    tokenizer = prompt_tokenizer(processor.tokenizer)
    tokenizer.chat_template = template
    lp = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=int(vhf["patch_size"]),
        vision_feature_select_strategy=plan["strategy"], chat_template=template,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=int(plan["prefix"]),
    )
    s = int(processor.config.image_transform.size)
    expected = (s // int(vhf["patch_size"])) ** 2 + int(plan["prefix"]) - (1 if plan["strategy"] == "default" else 0)
    if expected != vlm.num_image_tokens:
        raise ExportError(f"the LLaVA processor would expand <image> to {expected} tokens, the model uses "
                          f"{vlm.num_image_tokens}")
    return lp


def export_hf(model, out: str | Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (an mmlm checkpoint directory or a ``(vlm, processor)`` pair) as a
    transformers LLaVA directory at ``out`` (atomically). ``dtype``: cast the weights (e.g.
    "bfloat16"); default: as they are."""
    vlm, processor = _load_pair(model)
    if processor.config.image_placement != "as_written":
        raise ExportError(f"image_placement={processor.config.image_placement!r}: transformers' LLaVA processor "
                          "puts the images where the text does (before it); export a model trained as_written")
    plan = check_exportable(vlm)
    llava = to_llava(vlm, processor, plan, _resolve_dtype(dtype))
    lp = to_llava_processor(vlm, processor, plan)
    note = crop_difference(processor.config.image_transform)
    if note:
        warnings.warn(note, stacklevel=2)

    def write(tmp: Path) -> None:
        llava.save_pretrained(str(tmp))
        lp.save_pretrained(str(tmp))
        lp.image_processor.save_pretrained(str(tmp))  # preprocessor_config.json too, for older transformers
        (tmp / "chat_template.jinja").write_text(lp.chat_template)
        _check_saved_tokenizer(tmp)

    return _write_dir(out, overwrite, write)
