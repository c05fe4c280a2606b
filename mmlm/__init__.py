"""mmlm: train and evaluate LLaVA-style vision-language models.

Public API::

    from mmlm import VLM, VLMConfig, Processor, load, describe
    vlm = VLM.from_preset("tiny", image_token_id=...)
    vlm, processor = load("runs/tiny/model")
    describe(["cat.jpg"], model=(vlm, processor))

Importing mmlm touches no network, no environment variable and no global PIL state; the
heavy parts (timm, transformers) load when first used.
"""

from mmlm.api import describe, load
from mmlm.config import ImageTransformConfig, ProjectorConfig, TextConfig, VisionConfig, VLMConfig
from mmlm.generation import GenerationConfig
from mmlm.modeling.vlm import VLM
from mmlm.processing import Processor, ProcessorConfig, train_bpe_tokenizer

__version__ = "0.1.0"

__all__ = [
    "VLM", "VLMConfig", "VisionConfig", "ProjectorConfig", "TextConfig", "ImageTransformConfig",
    "Processor", "ProcessorConfig", "GenerationConfig", "train_bpe_tokenizer", "load", "describe",
]
