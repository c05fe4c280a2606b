"""nn.Modules of mmlm: vision encoders, projectors, fusion helpers and the VLM."""

from mmlm.modeling.projector import PROJECTORS, build_projector
from mmlm.modeling.vision import VISION_ENCODERS, build_vision_encoder
from mmlm.modeling.vlm import VLM, VLMOutput

__all__ = ["PROJECTORS", "VISION_ENCODERS", "VLM", "VLMOutput",
           "build_projector", "build_vision_encoder"]
