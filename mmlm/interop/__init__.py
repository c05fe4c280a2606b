"""Interop with the transformers ecosystem: pretrained parts in, LLaVA checkpoints out and in.

- ``build_from_pretrained(vision, text, projector, chat_template)``: ``(VLM, Processor)`` from a
  pretrained vision tower (a timm name, or a transformers CLIP/SigLIP name or directory) and any
  transformers causal LM (name or directory), with the LM's tokenizer; ``vision_config_for(name)``:
  the ``VisionConfig`` of such a tower. See :mod:`mmlm.interop.pretrained`.
- ``export_hf(model, out)``: an mmlm checkpoint -> a stock ``LlavaForConditionalGeneration``
  directory with its ``LlavaProcessor`` that ``AutoModelForImageTextToText``/``AutoProcessor``
  load; what LLaVA cannot represent raises ``ExportError`` saying what would be needed. Its steps:
  ``check_exportable``, ``to_llava``, ``to_llava_processor``, ``image_processor_for``,
  ``export_chat_template``, ``timm_to_hf_vision`` (:mod:`mmlm.interop.timm_towers`). See
  :mod:`mmlm.interop.export`, with the decisions worth knowing (pruned vision layers, feature
  selection, projectors, timm towers, tied weights, generation stops, image processors, chat
  templates).
- ``import_hf(source, out)``: a LLaVA checkpoint (directory or hub name) -> ``(VLM, Processor)``,
  and with ``out`` an mmlm checkpoint. See :mod:`mmlm.interop.import_`.
"""

from mmlm.interop.export import (
    ExportError,
    check_exportable,
    export_chat_template,
    export_hf,
    image_processor_for,
    to_llava,
    to_llava_processor,
)
from mmlm.interop.import_ import import_hf
from mmlm.interop.pretrained import build_from_pretrained, vision_config_for
from mmlm.interop.timm_towers import timm_to_hf_vision

__all__ = [
    "ExportError", "build_from_pretrained", "export_hf", "import_hf", "check_exportable",
    "vision_config_for", "timm_to_hf_vision", "image_processor_for", "to_llava", "to_llava_processor",
    "export_chat_template",
]
