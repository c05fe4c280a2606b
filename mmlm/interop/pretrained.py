"""Pretrained parts in: a VLM from a pretrained vision tower and a pretrained causal LM.

- ``build_from_pretrained(vision, text, projector, chat_template)``: a VLM from a pretrained
  vision tower (a timm name, or a transformers CLIP/SigLIP name or directory) and any
  transformers causal LM (name or directory), with the LM's tokenizer. ``<image>`` (and the
  chat template's own special tokens) are added to the tokenizer when missing and the LM's
  embeddings grow to match (to a multiple of 64); ``config.text.hf_config["vocab_size"]`` and
  ``image_token_id`` follow, so the checkpoint saves and reloads. The chat template is chosen
  by ``mmlm.templates.choose_chat_template`` (the LM's own when it marks ``{% generation %}``; then the
  token that ends its generation span, when not eos, is a stop token). When the LM's tokenizer adds a
  BOS that the template never writes, a named template writes it first (with a warning; the LM's own
  template only gets the warning). The processor's ``max_length`` stays within the LM's positions (as ``import_hf``).
- ``vision_config_for(name)``: the ``VisionConfig`` of a pretrained tower (``backend`` None guesses:
  a timm model name or ``local-dir:DIR``/``DIR`` with timm's ``config.json`` -> timm, else transformers).
  A transformers tower records the image transform of its checkpoint's own image processor when mmlm can
  mirror it (else its family's), whether it comes by name or as a ``VisionConfig``
  (``mmlm.modeling.hf_vision.resolve_hf_vision_config``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mmlm.config import ProjectorConfig, TextConfig, VisionConfig, VLMConfig
from mmlm.interop._common import _max_length_for
from mmlm.interop.export import adds_special_tokens
from mmlm.processing import IMAGE_TOKEN, Processor
from mmlm.templates import ChatTemplate, choose_chat_template, missing_special_tokens, renders_bos, with_bos

__all__ = ["build_from_pretrained", "vision_config_for"]


def _looks_like_hf_vision(name: str) -> bool:
    from mmlm.modeling.hf_vision import FAMILIES, FULL_MODELS
    from mmlm.modeling.vision import timm_config_file

    if name.startswith(("timm/", "hf-hub:", "hf_hub:", "local-dir:")) or timm_config_file(name) is not None:
        return False  # timm names, and timm's local directories (config.json with "architecture")
    path = Path(name)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            return False
        model_type = json.loads(cfg.read_text()).get("model_type")
        return model_type in FAMILIES or model_type in FULL_MODELS
    try:
        import timm

        if timm.is_model(name.split(".")[0]):
            return False
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return True


def timm_geometry(name: str) -> tuple[int, int]:
    """(image size, patch size) of a timm model name or ``local-dir:DIR`` (timm's ``config.json`` there:
    ``model_args``, else ``pretrained_cfg``, else its architecture's); the ``VisionConfig`` defaults when unknown."""
    import re

    from timm.models import get_pretrained_cfg

    from mmlm.modeling.vision import timm_config_file

    size = patch = None
    arch = name
    local = timm_config_file(name) if name.startswith("local-dir:") else None
    if local is not None:
        data = json.loads(local.read_text())
        arch = str(data["architecture"])
        args = data.get("model_args") or {}
        size = args.get("img_size") or (data.get("pretrained_cfg") or {}).get("input_size")
        size = size[-1] if isinstance(size, (list, tuple)) else size
        patch = args.get("patch_size")
        patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    if size is None:
        pcfg = get_pretrained_cfg(arch)
        size = pcfg.input_size[-1] if pcfg is not None and pcfg.input_size else VisionConfig.image_size
    if patch is None:
        found = re.search(r"patch(\d+)", arch)
        patch = found.group(1) if found else VisionConfig.patch_size
    return int(size), int(patch)


def vision_config_for(name: str, *, backend: str | None = None, pretrained: bool = True,
                      feature_layer: int = -2, drop_prefix_tokens: bool = True,
                      resize_mode: str | None = None) -> VisionConfig:
    """A ``VisionConfig`` for a pretrained tower: a timm model name (``timm/...`` and ``hf-hub:...`` on the hub,
    ``local-dir:DIR`` or ``DIR`` holding timm's ``config.json`` and weights), or a transformers CLIP/SigLIP
    hub name or directory (``backend`` None guesses: a timm model name or directory -> timm, else hf)."""
    if backend is None:
        backend = "hf" if _looks_like_hf_vision(name) else "timm"
    if backend == "timm":
        from mmlm.modeling.vision import timm_config_file, timm_source

        if name.startswith("timm/"):  # a timm repo on the hub
            name = "hf-hub:" + name
        name = timm_source(name)  # a timm directory -> local-dir:DIR
        if name.startswith("local-dir:"):
            if timm_config_file(name) is None:
                raise ValueError(f"{name}: no timm config.json (with 'architecture') in that directory")
        else:
            import timm

            if not timm.is_model(name.split(".")[0]) and not name.startswith(("hf-hub:", "hf_hub:")):
                where = "; a local timm model is a directory with timm's config.json" if Path(name).is_dir() else ""
                raise ValueError(f"unknown timm model {name!r}{where}")
        size, patch = timm_geometry(name)
        return VisionConfig(backend="timm", name=name, pretrained=pretrained, image_size=size, patch_size=patch,
                            feature_layer=feature_layer, drop_prefix_tokens=drop_prefix_tokens,
                            resize_mode=resize_mode)
    if backend != "hf":
        raise ValueError(f"unknown vision backend {backend!r}; known: ['hf', 'timm']")
    from mmlm.modeling.hf_vision import resolve_hf_vision_config

    # resolving records the tower's config and its own image processor's transform
    return resolve_hf_vision_config(VisionConfig(backend="hf", name=name, pretrained=pretrained,
                                                 feature_layer=feature_layer, drop_prefix_tokens=drop_prefix_tokens,
                                                 resize_mode=resize_mode))


def _adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` starts every text with its BOS token (Llama, Gemma, Mistral...)."""
    bos = tokenizer.bos_token_id
    return bos is not None and adds_special_tokens(tokenizer) and tokenizer("a")["input_ids"][:1] == [bos]


def _keep_bos(tokenizer, template: ChatTemplate, source: str | None) -> ChatTemplate:
    """``template``, writing the BOS token first when ``tokenizer`` adds one that the template never writes.

    The rendered template is the whole input (no special tokens added around it), so a template without
    ``bos_token`` (``chatml``) would train and prompt such an LM without the BOS it was pretrained with,
    which Gemma, Llama and Mistral bases take badly. A named template gets BOS written first (training and
    prompts both render it; a warning says so); the LM's own template is the LM's author's: a warning names the fix.
    """
    if not _adds_bos(tokenizer) or renders_bos(tokenizer, template.template):
        return template
    import warnings

    lm = f"the tokenizer of {source}" if source else "the tokenizer"
    bos = tokenizer.bos_token
    if template.name == "tokenizer":
        warnings.warn(f"{lm} adds {bos} to every text but its chat template never writes bos_token, so training and "
                      f"prompts go without {bos}; write {{{{ bos_token }}}} at the start of the template (before "
                      "the first message) if the LM expects it", stacklevel=3)
        return template
    warnings.warn(f"{lm} adds {bos} to every text but chat template {template.name!r} never writes bos_token: "
                  f"mmlm writes {bos} before every conversation (training and prompts alike); to go without it, "
                  "pass a tokenizer with add_bos_token=False", stacklevel=3)
    return with_bos(template)


def _add_tokens(tokenizer, tokens: list[str]) -> list[str]:
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return new


def _fit_vocab(vlm, tokenizer, image_token_id: int) -> None:
    """Grow the LM's embeddings to hold every token id (to a multiple of 64, as LLaVA does), and
    record vocab size and image id in the config."""
    emb = vlm.lm.get_input_embeddings().num_embeddings
    need = len(tokenizer)
    if need > emb:
        vlm.lm.resize_token_embeddings(need, pad_to_multiple_of=64, mean_resizing=True)
        emb = vlm.lm.get_input_embeddings().num_embeddings
    hf = dict(vlm.config.text.hf_config)
    hf["vocab_size"] = emb
    vlm.config = vlm.config.updated(image_token_id=image_token_id, text={"hf_config": hf})
    if hasattr(vlm.lm.config, "vocab_size"):
        vlm.lm.config.vocab_size = emb


def build_from_pretrained(
    vision: str | VisionConfig,
    text: str | TextConfig,
    projector: str | ProjectorConfig = "mlp2x_gelu",
    chat_template: str | None = None,
    *,
    tokenizer=None,
    vision_backend: str | None = None,
    vision_pretrained: bool = True,
    text_pretrained: bool = True,
    feature_layer: int = -2,
    drop_prefix_tokens: bool = True,
    resize_mode: str | None = None,
    max_length: int | None = None,
    **processor_config: Any,
):
    """``(VLM, Processor)`` from pretrained parts (see the module docstring).

    ``vision``: timm name or local directory (``local-dir:DIR`` or ``DIR``), transformers CLIP/SigLIP name or
    directory, or a ``VisionConfig``.
    ``text``: transformers causal-LM name or directory, or a ``TextConfig`` (with ``name``).
    ``chat_template``: a name from ``mmlm.templates`` (None: the LM's own template when it has
    generation marks, else a named one recognised from it). ``tokenizer``: instead of the LM's.
    ``processor_config``: further ``ProcessorConfig`` fields (``caption_prompt``, ``system_prompt``...).
    ``max_length``: the processor's token limit (default: 2048, or the LM's position limit when it has
    fewer); more than the LM's positions raises ``ValueError`` (GPT-2's learned positions would fail with
    an index error in the first long batch).
    """
    from transformers import AutoTokenizer

    from mmlm.modeling.text import resolve_text_config
    from mmlm.modeling.vlm import VLM

    if isinstance(vision, str):
        vcfg = vision_config_for(vision, backend=vision_backend, pretrained=vision_pretrained,
                                 feature_layer=feature_layer, drop_prefix_tokens=drop_prefix_tokens,
                                 resize_mode=resize_mode)
    else:
        vcfg = copy.deepcopy(vision)
        if vcfg.backend == "hf":
            from mmlm.modeling.hf_vision import resolve_hf_vision_config

            vcfg = resolve_hf_vision_config(vcfg)
    tcfg = TextConfig(name=text, pretrained=text_pretrained) if isinstance(text, str) else copy.deepcopy(text)
    if tokenizer is None:
        if not tcfg.name:
            raise ValueError("text needs a name (hub name or directory) to take the tokenizer from, or pass tokenizer=")
        tokenizer = AutoTokenizer.from_pretrained(tcfg.name, trust_remote_code=False)
    template = _keep_bos(tokenizer, choose_chat_template(tokenizer, chat_template, source=tcfg.name), tcfg.name)
    _add_tokens(tokenizer, [IMAGE_TOKEN, *missing_special_tokens(tokenizer, template)])
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tcfg = resolve_text_config(tcfg)
    max_length = _max_length_for(tcfg.hf_config, max_length)
    vocab = int(tcfg.hf_config.get("vocab_size", 0) or 0)
    pcfg = ProjectorConfig(name=projector) if isinstance(projector, str) else projector
    # the VLM checks image_token_id against the LM's vocabulary: a new token gets its row below
    config = VLMConfig(vision=vcfg, projector=pcfg, text=tcfg, image_token_id=image_id if image_id < vocab else 0)
    vlm = VLM(config)
    _fit_vocab(vlm, tokenizer, image_id)
    stops = [t for t in template.stop_tokens if t != tokenizer.eos_token]
    processor_config.setdefault("stop_tokens", stops)
    processor = Processor.for_model(vlm, tokenizer, chat_template=template.template, max_length=max_length,
                                    **processor_config)
    return vlm, processor
