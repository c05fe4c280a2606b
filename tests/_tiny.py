"""Builders of tiny random-weight models and processors for the tests (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmlm import VLM, Processor, VLMConfig, train_bpe_tokenizer
from mmlm.config import ProjectorConfig, TextConfig, VisionConfig

CORPUS = [
    "a small red star on the left and a large blue square at the bottom",
    "what color is the star? red", "how many shapes are there? two", "is there a green circle? no",
    "Describe the image briefly.", "You are a helpful assistant.", "where is the blue square? bottom",
] * 20


def tiny_tokenizer(vocab_size: int = 320):
    return train_bpe_tokenizer(CORPUS, vocab_size=vocab_size, min_frequency=1)


def tiny_config(tokenizer, *, projector: str = "mlp2x_gelu", lm: str = "llama", image_size: int = 32,
                patch_size: int = 8, factor: int = 2) -> VLMConfig:
    vocab = len(tokenizer)
    if lm == "llama":
        hf = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": vocab,
              "max_position_embeddings": 256, "tie_word_embeddings": True}
    elif lm == "gpt2":
        hf = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": vocab, "n_positions": 256}
    elif lm == "qwen2":
        hf = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": vocab,
              "max_position_embeddings": 256}
    else:
        raise ValueError(lm)
    return VLMConfig(
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=32, depth=2, num_heads=2),
        projector=ProjectorConfig(name=projector, pixel_shuffle_factor=factor),
        text=TextConfig(hf_config=hf),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def tiny_pair(seed: int = 0, **kwargs) -> tuple[VLM, Processor]:
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    vlm = VLM(tiny_config(tok, **kwargs)).eval()
    return vlm, Processor.for_model(vlm, tok, max_length=128)


def image(color: str = "red", size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def save_tiny_checkpoint(path) -> None:
    """A random tiny model whose greedy text is not empty and differs between images (untied
    output layer, weights scaled up), saved with its processor."""
    from mmlm.checkpoint import save_pretrained

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = tiny_config(tok)
    cfg.text.hf_config["tie_word_embeddings"] = False
    vlm = VLM(cfg).eval()
    with torch.no_grad():
        for p in vlm.parameters():
            p.mul_(3)
    save_pretrained(path, vlm, Processor.for_model(vlm, tok, max_length=128))


def tiny_checkpoint(tmp_path_factory):
    """The checkpoint of ``save_tiny_checkpoint``, built once per test session."""
    path = tmp_path_factory.getbasetemp() / "tiny-inference-model"
    if not path.exists():
        save_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()
