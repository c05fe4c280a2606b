"""The pre-flight memory estimate's activation and logit terms against what autograd actually keeps.

The bytes autograd saves for the backward pass in one training forward (every saved tensor's storage,
counted once, parameters excluded) are measured with ``torch.autograd.graph.saved_tensors_hooks``; the
estimate's ``activations + logits`` must stay within a factor of them for each vision backend (timm,
transformers CLIP and SigLIP towers) and for LoRA with and without adapter dropout.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _tiny import tiny_config, tiny_tokenizer

from mmlm import VLM
from mmlm.config import VisionConfig
from mmlm.modeling.vlm import labelled_loss_parts
from mmlm.training.freeze import configure_trainable
from mmlm.training.preflight import _dims_vision, estimate_memory

B, L = 4, 96


def saved_activation_bytes(vlm: VLM, batch: dict) -> int:
    """Bytes of the tensors one forward saves for backward (each storage once; parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in vlm.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vlm(**batch, return_logits=False).loss  # as training calls it
    loss.backward()  # the graph is a real one: it trains
    return sum(saved.values())


def save_tower(path, family: str) -> str:
    """A random transformers CLIP/SigLIP vision tower whose activations outweigh the tiny LM's."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config, model = (CLIPVisionConfig, CLIPVisionModel) if family == "clip" else (SiglipVisionConfig, SiglipVisionModel)
    torch.manual_seed(0)
    model(config(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                 patch_size=8)).save_pretrained(str(path))
    return str(path)


def build(vision: str, tmp_path) -> VLM:
    tok = tiny_tokenizer()
    cfg = tiny_config(tok)
    if vision != "timm":
        path = save_tower(tmp_path / vision, vision)
        cfg = dataclasses.replace(cfg, vision=VisionConfig(backend="hf", name=path, pretrained=False))
    torch.manual_seed(0)
    return VLM(cfg)


def batch_for(vlm: VLM) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (B, L), generator=g)
    n = vlm.num_image_tokens
    ids[:, 1:1 + n] = vlm.config.image_token_id
    labels = ids.clone()
    labels[:, :1 + n + 8] = -100  # the prompt and the image unsupervised
    size = vlm.vision.image_transform().size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(B, 3, size, size, generator=g)}


@pytest.mark.parametrize("vision,stage,lora", [
    ("timm", "full", None),
    ("clip", "full", None),  # a transformers tower that trains: its activations count
    ("siglip", "full", None),
    ("timm", "instruct", {"r": 4, "lora_dropout": 0.1}),  # each adapted layer keeps its dropped-out input
    ("timm", "instruct", {"r": 4, "lora_dropout": 0.0}),
])
def test_estimate_follows_the_tensors_autograd_saves(tmp_path, vision, stage, lora):
    vlm = build(vision, tmp_path)
    configure_trainable(vlm, stage, lora)
    vlm.train()
    batch = batch_for(vlm)
    measured = saved_activation_bytes(vlm, batch)
    labelled = labelled_loss_parts(vlm.lm) is not None
    est = estimate_memory(vlm, batch_size=B, seq_len=L, num_images=B,
                          logit_tokens=int((batch["labels"] != -100).sum()) if labelled else None)
    ratio = (est["activations"] + est["logits"]) / measured
    assert 0.75 <= ratio <= 1.5, f"estimate / saved = {ratio:.2f} ({est['activations']} + {est['logits']} vs {measured})"


@pytest.mark.parametrize("vision", ["timm", "clip", "siglip"])
def test_vision_dims_read_each_backend(tmp_path, vision):
    vlm = build(vision, tmp_path)
    dims = _dims_vision(vlm.vision)
    if vision == "timm":  # tiny_config: width 32, depth 2, MLP ratio 4, 32 px / 8 px patches, a class token
        expect = {"width": 32, "layers": 1, "mlp": 128, "mlp_values": 2, "tokens": 16 + 1}
    else:  # save_tower: 4 layers, 64 px / 8 px patches; CLIP has a class token, SigLIP none
        expect = {"width": 64, "layers": 3, "mlp": 256, "mlp_values": 4 if vision == "clip" else 2,  # quick_gelu
                  "tokens": 64 + (vision == "clip")}
    assert dims == expect  # layers: the blocks up to the feature layer (-2); the last one is pruned
