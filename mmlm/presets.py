"""Named model configs. Each preset is a complete ``VLMConfig``: its LM architecture is
spelled out (``hf_config``), so every preset builds offline with random weights, and the
hub names say where pretrained weights come from when a user asks for them
(``VLM.from_preset("small", vision={"pretrained": True}, text={"pretrained": True})``).

- ``tiny``: from scratch, small enough to learn the synthetic dataset on a 2-core CPU in minutes.
- ``small``: ViT-S/16 (timm, ImageNet-21k) + SmolLM2-135M (Llama architecture).
- ``base``: SigLIP-B/16 (timm; images squashed to 224, as SigLIP's own preprocessing) + Qwen2.5-0.5B.
- ``llava-1.5-7b``: CLIP ViT-L/14-336 (timm's QuickGELU variant, as OpenAI's weights) + Vicuna-7B v1.5
  (Llama), ``mlp2x_gelu``, penultimate layer.
"""

from __future__ import annotations

from typing import Callable

from mmlm.config import ProjectorConfig, TextConfig, VisionConfig, VLMConfig


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
           max_pos: int, rope_theta: float, tie: bool, eps: float = 1e-5, **extra) -> dict:
    return {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
        "vocab_size": vocab, "max_position_embeddings": max_pos, "rope_theta": rope_theta,
        "tie_word_embeddings": tie, "rms_norm_eps": eps, "hidden_act": "silu", **extra,
    }


def tiny() -> VLMConfig:
    # ~1.5M parameters: 72 px -> conv stem to a 9x9 grid -> 2 ViT blocks -> pixel shuffle by 3 -> 9
    # image tokens, one per 24 px cell of the synthetic scenes' 3x3 layout -> a 3-layer, 128-wide
    # Llama. Sized for ~0.25 s per batch of 32 on 2 CPU cores.
    return VLMConfig(
        vision=VisionConfig(image_size=72, patch_size=8, width=128, depth=2, num_heads=4,
                            stem="conv", feature_layer=-1, class_token=False),
        projector=ProjectorConfig(name="pixel_shuffle", pixel_shuffle_factor=3),
        text=TextConfig(hf_config=_llama(128, 3, 4, 4, 512, vocab=512, max_pos=512, rope_theta=10000.0, tie=True)),
    )


def small() -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(name="vit_small_patch16_224.augreg_in21k_ft_in1k", image_size=224, patch_size=16),
        projector=ProjectorConfig(name="mlp2x_gelu"),
        text=TextConfig(
            name="HuggingFaceTB/SmolLM2-135M",
            hf_config=_llama(576, 30, 9, 3, 1536, vocab=49152, max_pos=8192, rope_theta=100000.0, tie=True,
                             bos_token_id=0, eos_token_id=0),
        ),
    )


def base() -> VLMConfig:
    return VLMConfig(
        # SigLIP squashes images to 224 x 224 (big_vision, open_clip, transformers' SiglipImageProcessor); timm
        # records its generic crop_pct=0.9 for this tag, which would cut away a fifth of every image
        vision=VisionConfig(name="vit_base_patch16_siglip_224.webli", image_size=224, patch_size=16,
                            resize_mode="squash"),
        projector=ProjectorConfig(name="mlp2x_gelu"),
        text=TextConfig(
            name="Qwen/Qwen2.5-0.5B",
            hf_config={
                "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
            },
        ),
    )


def llava_1_5_7b() -> VLMConfig:
    return VLMConfig(
        # OpenAI's CLIP towers use QuickGELU: timm's plain ``vit_large_patch14_clip_336`` runs the same
        # weights through exact GELU (its pretrained config notes it), not the features LLaVA-1.5 trained on
        vision=VisionConfig(name="vit_large_patch14_clip_quickgelu_336.openai", image_size=336, patch_size=14,
                            feature_layer=-2, drop_prefix_tokens=True, resize_mode="pad"),
        projector=ProjectorConfig(name="mlp2x_gelu"),
        text=TextConfig(
            name="lmsys/vicuna-7b-v1.5",
            hf_config=_llama(4096, 32, 32, 32, 11008, vocab=32000, max_pos=4096, rope_theta=10000.0, tie=False,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0),
        ),
    )


PRESETS: dict[str, Callable[[], VLMConfig]] = {
    "tiny": tiny,
    "small": small,
    "base": base,
    "llava-1.5-7b": llava_1_5_7b,
}


PRESET_ALIASES: dict[str, str] = {"llava-1.5-7b-like": "llava-1.5-7b"}
"""Other names of presets (the design documents call the LLaVA-1.5 preset ``llava-1.5-7b-like``)."""


def get_preset(name: str) -> VLMConfig:
    """The config of preset ``name`` (or one of its ``PRESET_ALIASES``); an unknown name fails with the known ones."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
