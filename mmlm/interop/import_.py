"""Transformers LLaVA -> mmlm.

``import_hf(source, out)`` reads a LLaVA checkpoint (directory or hub name) as ``(VLM, Processor)``
and, with ``out``, also writes it as an mmlm checkpoint (atomically). It takes a CLIP or SigLIP
vision tower with one feature layer, projector activation ``gelu`` (mmlm's ``mlp2x_gelu``) or
``linear`` (linear_2 after linear_1 folded into mmlm's one ``linear`` projector),
``vision_feature_select_strategy="default"`` only on a tower with a class token, ``<image>`` as the
image token and a saved image processor; anything else is refused with why. The chat template is
chosen by ``mmlm.templates.choose_chat_template`` from the checkpoint's own (its processor's, else
its tokenizer's), or named by ``chat_template``. The model holds the loaded LLaVA model's tensors
(float32; ``dtype`` casts them). ``_transform_from_image_processor`` serves :mod:`mmlm.interop.pretrained`
too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmlm.config import ImageTransformConfig, ProjectorConfig, TextConfig, VisionConfig, VLMConfig
from mmlm.interop._common import _RESAMPLE_NAMES, _adopt, _max_length_for, _no_meta, _resolve_dtype, _write_dir
from mmlm.processing import IMAGE_TOKEN, Processor, ProcessorConfig
from mmlm.templates import ChatTemplate, choose_chat_template, missing_special_tokens

__all__ = ["import_hf"]


def _transform_from_image_processor(ip, image_size: int) -> ImageTransformConfig:
    """The mmlm transform doing what a (CLIP/LLaVA/SigLIP-like) transformers image processor does."""

    def get(name, default=None):
        return getattr(ip, name, default)

    def as_dict(value, square: bool) -> dict:
        if value is None:
            return {}
        if isinstance(value, int):
            return {"height": value, "width": value} if square else {"shortest_edge": value}
        if not isinstance(value, dict):  # transformers' SizeDict
            value = {k: getattr(value, k, None) for k in ("height", "width", "shortest_edge", "longest_edge")}
        return {k: v for k, v in value.items() if v is not None}

    size = as_dict(get("size"), square=False)
    crop = as_dict(get("crop_size"), square=True)
    resample = get("resample", 3)
    resample = int(getattr(resample, "value", resample)) if resample is not None else 3
    if resample not in _RESAMPLE_NAMES:
        raise ValueError(f"the image processor's resample={resample} has no mmlm equivalent "
                         f"(known: {sorted(_RESAMPLE_NAMES.values())})")
    if get("do_rescale", True) is False or abs(float(get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ValueError("the image processor does not rescale pixels by 1/255, which mmlm always does")
    mean = tuple(get("image_mean") or (0.5, 0.5, 0.5)) if get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = tuple(get("image_std") or (0.5, 0.5, 0.5)) if get("do_normalize", True) else (1.0, 1.0, 1.0)
    crop_pct = 1.0
    if get("do_pad", False):
        mode = "pad"
    elif get("do_center_crop", False) and "shortest_edge" in size:
        mode = "crop"
        crop_pct = min(1.0, float(crop.get("height", image_size)) / float(size["shortest_edge"]))
    elif "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise ValueError(f"the image processor resizes to a non-square {size}; mmlm inputs are square")
        mode = "squash"
    elif "shortest_edge" in size:  # shortest edge only: square inputs need a crop
        mode, crop_pct = "crop", min(1.0, image_size / float(size["shortest_edge"]))
    else:
        raise ValueError(f"the image processor's size {size} has no mmlm equivalent")
    return ImageTransformConfig(size=image_size, resize_mode=mode, mean=mean, std=std,
                                interpolation=_RESAMPLE_NAMES[resample], crop_pct=crop_pct)


def _import_plan(config) -> dict:
    """Check a LlavaConfig for what mmlm can represent."""
    from mmlm.modeling.hf_vision import FAMILIES

    if getattr(config, "model_type", None) != "llava":
        raise ValueError(f"not a LLaVA checkpoint (model_type={getattr(config, 'model_type', None)!r}); "
                         "`mmlm import hf` reads LlavaForConditionalGeneration checkpoints")
    problems = []
    vision_type = config.vision_config.model_type
    if vision_type not in FAMILIES:
        problems.append(f"vision tower {vision_type!r} (mmlm supports {sorted(FAMILIES)})")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(f"several vision feature layers {list(layer)} (mmlm uses one)")
    act = config.projector_hidden_act
    if act not in ("gelu", "linear"):
        problems.append(f"projector activation {act!r} (mmlm's mlp2x_gelu uses exact GELU; 'linear' folds into "
                        "mmlm's linear projector)")
    prefix = 1 if vision_type == "clip_vision_model" else 0
    strategy = config.vision_feature_select_strategy
    if strategy == "default" and prefix == 0:
        problems.append("vision_feature_select_strategy='default' on a tower without a class token (it drops "
                        "the first patch, which mmlm cannot express)")
    if problems:
        raise ValueError("cannot import this LLaVA checkpoint: " + "; ".join(problems))
    return {"prefix": prefix, "drop": strategy == "default", "layer": int(layer), "act": act}


def import_hf(source: str | Path, out: str | Path | None = None, *, chat_template: str | None = None,
              dtype: str | torch.dtype | None = None, overwrite: bool = False, max_length: int | None = None):
    """A transformers LLaVA checkpoint (directory or hub name) -> ``(VLM, Processor)``; with
    ``out``, also written there as an mmlm checkpoint (atomically). ``max_length``: the processor's
    token limit (default: 2048, or the LM's position limit when it has fewer); more than the LM's
    positions raises ``ValueError``."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from mmlm.modeling.hf_vision import record_hf_vision
    from mmlm.modeling.vlm import VLM

    source = str(source)
    if not Path(source).is_dir() and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"LLaVA checkpoint directory not found: {source}")
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json: not a transformers LLaVA checkpoint directory")
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    plan = _import_plan(config)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    own_template = _processor_chat_template(source) or getattr(tokenizer, "chat_template", None)
    if own_template:
        tokenizer.chat_template = own_template
    template: ChatTemplate = choose_chat_template(tokenizer, chat_template, source=source)
    if missing_special_tokens(tokenizer, template):
        raise ValueError(f"chat template {template.name!r} needs tokens {missing_special_tokens(tokenizer, template)} "
                         f"that the tokenizer of {source} lacks; pick another with "
                         "`mmlm import hf --chat-template NAME` (Python: chat_template=NAME)")
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id or \
            IMAGE_TOKEN not in tokenizer.get_vocab():
        token = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
        raise ValueError(f"the LLaVA image token id {config.image_token_id} is {token!r} in the tokenizer, "
                         f"not {IMAGE_TOKEN!r}: mmlm expects {IMAGE_TOKEN!r}")
    try:
        image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
    except OSError as e:
        raise ValueError(f"{source} has no image processor (preprocessor_config.json / processor_config.json): "
                         "save the LlavaProcessor together with the model") from e
    vision_hf = {k: v for k, v in config.vision_config.to_dict().items()
                 if k not in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    transform = _transform_from_image_processor(image_processor, int(vision_hf["image_size"]))
    vcfg = VisionConfig(backend="hf", name=None, pretrained=False, image_size=int(vision_hf["image_size"]),
                        patch_size=int(vision_hf["patch_size"]), feature_layer=plan["layer"],
                        drop_prefix_tokens=plan["drop"], resize_mode=transform.resize_mode)
    record_hf_vision(vcfg, vision_hf, {
        "mean": list(transform.mean), "std": list(transform.std), "interpolation": transform.interpolation,
        "resize_mode": transform.resize_mode, "crop_pct": transform.crop_pct,
    })
    text_hf = config.text_config.to_dict()
    text_hf.pop("_name_or_path", None)
    mcfg = VLMConfig(
        vision=vcfg,
        projector=ProjectorConfig(name="mlp2x_gelu" if plan["act"] == "gelu" else "linear"),
        text=TextConfig(hf_config=text_hf, name=None, pretrained=False),
        image_token_id=int(config.image_token_id),
    )
    llava = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32, trust_remote_code=False)
    with torch.device("meta"):
        vlm = VLM(mcfg)
    vt = llava.model.vision_tower
    _adopt(vlm.vision.tower, getattr(vt, "vision_model", vt), "vision tower")
    proj = llava.model.multi_modal_projector
    if plan["act"] == "gelu":
        tensors = {n: p for n, p in proj.named_parameters()}
        if proj.linear_1.bias is None:
            tensors["linear_1.bias"] = torch.zeros(proj.linear_1.out_features)
            tensors["linear_2.bias"] = torch.zeros(proj.linear_2.out_features)
    else:  # linear -> identity -> linear folds into one linear map
        w1, w2 = proj.linear_1.weight.detach(), proj.linear_2.weight.detach()
        b1 = proj.linear_1.bias.detach() if proj.linear_1.bias is not None else torch.zeros(w1.shape[0])
        b2 = proj.linear_2.bias.detach() if proj.linear_2.bias is not None else torch.zeros(w2.shape[0])
        eye = torch.eye(w2.shape[0], dtype=w2.dtype)
        if torch.equal(w2, eye):
            tensors = {"proj.weight": w1.clone(), "proj.bias": b1 + b2}
        else:
            tensors = {"proj.weight": w2 @ w1, "proj.bias": w2 @ b1 + b2}
    _adopt(vlm.projector, tensors, "projector")
    _adopt(vlm.lm.base_model, llava.model.language_model, "language model")
    _adopt(vlm.lm.get_output_embeddings(), llava.lm_head, "lm head")
    _no_meta(vlm, "mmlm model")
    vlm.eval()
    dt = _resolve_dtype(dtype)
    if dt is not None:
        from mmlm.api import cast_model

        cast_model(vlm, dt)  # the rotary frequencies stay float32, as mmlm.load keeps them
    max_length = _max_length_for(text_hf, max_length)
    stops = [t for t in template.stop_tokens if t != tokenizer.eos_token]
    pconfig = ProcessorConfig(image_transform=vlm.image_transform(), num_image_tokens=vlm.num_image_tokens,
                              max_length=max_length, stop_tokens=stops)
    processor = Processor(tokenizer, pconfig, template.template)
    if out is not None:
        from mmlm.checkpoint import save_pretrained

        _write_dir(out, overwrite, lambda tmp: save_pretrained(tmp, vlm, processor))
    return vlm, processor


def _processor_chat_template(source: str) -> str | None:
    """The chat template saved with a transformers processor (chat_template.jinja/.json), if any."""
    path = Path(source)
    if path.is_dir():
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        js = path / "chat_template.json"
        if js.is_file():
            return json.loads(js.read_text()).get("chat_template")
        pc = path / "processor_config.json"
        if pc.is_file():
            return json.loads(pc.read_text()).get("chat_template")
        return None
    try:
        from transformers import AutoProcessor

        return getattr(AutoProcessor.from_pretrained(source, trust_remote_code=False), "chat_template", None)
    except Exception:  # noqa: BLE001 - no processor: the tokenizer's template is used
        return None
