"""mmlm: train and evaluate LLaVA-style vision-language models.

Public API::

    from mmlm import VLM, VLMConfig, Processor, load, describe
    vlm = VLM.from_preset("tiny", image_token_id=...)
    vlm, processor = load("mmlm-quickstart/model")
    describe(["cat.jpg"], model=(vlm, processor))

Importing mmlm touches no network, no environment variable and no global PIL state. The
names below load lazily, so ``import mmlm.data.schema`` (e.g. in shard builders) does not
pay for torch, timm and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "VLM": "mmlm.modeling.vlm",
    "VLMConfig": "mmlm.config",
    "VisionConfig": "mmlm.config",
    "ProjectorConfig": "mmlm.config",
    "TextConfig": "mmlm.config",
    "ImageTransformConfig": "mmlm.config",
    "Processor": "mmlm.processing",
    "ProcessorConfig": "mmlm.processing",
    "train_bpe_tokenizer": "mmlm.processing",
    "SampleTooLong": "mmlm.processing",
    "ImageSpanTruncated": "mmlm.processing",
    "AnswerTruncated": "mmlm.processing",
    "GenerationConfig": "mmlm.generation",
    "load": "mmlm.api",
    "describe": "mmlm.api",
    "open_image": "mmlm.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # for type checkers and IDEs
    from mmlm.api import describe, load, open_image
    from mmlm.config import ImageTransformConfig, ProjectorConfig, TextConfig, VisionConfig, VLMConfig
    from mmlm.generation import GenerationConfig
    from mmlm.modeling.vlm import VLM
    from mmlm.processing import (
        AnswerTruncated,
        ImageSpanTruncated,
        Processor,
        ProcessorConfig,
        SampleTooLong,
        train_bpe_tokenizer,
    )
