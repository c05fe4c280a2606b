"""timm ViT -> transformers CLIP/SigLIP vision tower, exactly (used by the LLaVA export).

``timm_to_hf_vision(encoder)`` converts the kept layers of a ``TimmViTEncoder`` into the config
and tensors of a transformers ``CLIPVisionModel`` (CLIP's layout: one class token and a pre-norm)
or ``SiglipVisionModel`` (no class token, no pre-norm). transformers' ``TimmWrapperModel`` cannot
stand in: LLaVA reads a tower's ``hidden_states`` as (B, tokens, D) and the wrapper gives timm's
feature maps (B, D, H, W) without the class token. What the two layouts cannot express (register
tokens, a conv stem, layer scale, qk-norm, gated MLPs, mixed activations or eps, ...) raises
``ExportError`` naming it.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlm.interop._common import ExportError

__all__ = ["timm_to_hf_vision"]


def timm_to_hf_vision(encoder) -> tuple[dict, dict[str, torch.Tensor], int]:
    """A timm ViT (``TimmViTEncoder``) as a transformers CLIP/SigLIP vision tower, exactly.

    Returns (vision config dict with ``num_hidden_layers`` = the layers kept, tensors under the
    tower core's names, number of prefix tokens). CLIP's layout: one class token and a pre-norm;
    SigLIP's: no class token and no pre-norm. Raises ``ExportError`` naming what does not fit.
    """
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    vit = encoder.vit
    why: list[str] = []
    if not isinstance(vit, VisionTransformer):
        raise ExportError(f"timm model {type(vit).__name__} is not a plain VisionTransformer")
    if not isinstance(vit.patch_embed, PatchEmbed) or not isinstance(vit.patch_embed.proj, nn.Conv2d):
        why.append("a conv stem (CLIP/SigLIP embed patches with one strided convolution)")
    elif isinstance(getattr(vit.patch_embed, "norm", None), nn.LayerNorm):
        why.append("a norm after the patch embedding")
    if getattr(vit, "num_reg_tokens", 0):
        why.append(f"{vit.num_reg_tokens} register tokens")
    has_cls = vit.cls_token is not None
    if has_cls and getattr(vit, "no_embed_class", False):
        why.append("a class token without a position embedding")
    if getattr(vit, "dynamic_img_size", False):
        why.append("dynamic image size")
    norm_pre = vit.norm_pre
    if has_cls and not isinstance(norm_pre, nn.LayerNorm):
        why.append("a class token but no pre-norm (CLIP's layout has both; SigLIP's neither)")
    if not has_cls and not isinstance(norm_pre, nn.Identity):
        why.append("a pre-norm but no class token (CLIP's layout has both; SigLIP's neither)")
    blocks = list(vit.blocks)
    acts, eps = set(), set()
    for i, blk in enumerate(blocks):
        if type(blk) is not Block:
            why.append(f"block {i} is a {type(blk).__name__}")
            break
        attn = blk.attn
        if not isinstance(blk.ls1, nn.Identity) or not isinstance(blk.ls2, nn.Identity):
            why.append("layer scale")
            break
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity) or \
                not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            why.append("qk-norm / attention norm")
            break
        if type(attn).__name__ != "Attention" or getattr(attn, "gate", None) is not None or \
                getattr(attn, "attn_dim", vit.embed_dim) != vit.embed_dim:
            why.append(f"a {type(attn).__name__} attention that CLIP/SigLIP attention cannot express")
            break
        if attn.qkv.bias is None or attn.proj.bias is None:
            why.append("attention without bias")
            break
        if getattr(blk.mlp, "fc1", None) is not None and (blk.mlp.fc1.bias is None or blk.mlp.fc2.bias is None):
            why.append("an MLP without bias")
            break
        if not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity) or not hasattr(blk.mlp, "fc1"):
            why.append("a gated or normed MLP")
            break
        for ln in (blk.norm1, blk.norm2):
            if not isinstance(ln, nn.LayerNorm):
                why.append("non-LayerNorm norms")
                break
            eps.add(ln.eps)
        act = blk.mlp.act
        acts.add(f"GELU:{act.approximate}" if isinstance(act, nn.GELU) else type(act).__name__)
    if isinstance(norm_pre, nn.LayerNorm):
        eps.add(norm_pre.eps)
    act_names = {"QuickGELU": "quick_gelu", "GELU:none": "gelu", "GELU:tanh": "gelu_pytorch_tanh",
                 "GELUTanh": "gelu_pytorch_tanh"}
    if len(acts) > 1 or (acts and next(iter(acts)) not in act_names):
        why.append(f"MLP activation {sorted(acts)}")
    if len(eps) > 1:
        why.append(f"several LayerNorm eps {sorted(eps)}")
    if why:
        raise ExportError(
            "the timm vision tower cannot be exported: transformers' LLaVA reads a tower's hidden_states as "
            "(B, tokens, D), which TimmWrapperModel does not give (timm feature maps (B, D, H, W) without the "
            "class token), so mmlm converts timm ViTs into transformers CLIP/SigLIP towers; this one has "
            + ", ".join(why) + ". A from-scratch ViT exports with SigLIP's layout (vision.stem 'patch', "
            "vision.class_token false, vision.reg_tokens 0); otherwise a timm ViT of CLIP's or SigLIP's layout or a "
            "transformers CLIP/SigLIP tower (vision.backend='hf') would be needed."
        )
    embed = vit.patch_embed
    dim = int(vit.embed_dim)
    heads = int(blocks[0].attn.num_heads)
    kept = encoder.block_index + 1
    img = int(embed.img_size[0])
    patch = int(embed.patch_size[0])
    hf = {
        "model_type": "clip_vision_model" if has_cls else "siglip_vision_model",
        "hidden_size": dim, "intermediate_size": int(blocks[0].mlp.fc1.out_features),
        "num_hidden_layers": kept, "num_attention_heads": heads, "num_channels": 3,
        "image_size": img, "patch_size": patch, "hidden_act": act_names[next(iter(acts))] if acts else "gelu",
        "layer_norm_eps": float(next(iter(eps))) if eps else 1e-6, "attention_dropout": 0.0,
    }
    if not has_cls:
        hf["vision_use_head"] = False
    t: dict[str, torch.Tensor] = {}
    t["embeddings.patch_embedding.weight"] = embed.proj.weight
    if embed.proj.bias is not None:
        if has_cls:
            raise ExportError("the timm vision tower cannot be exported: CLIP's patch embedding has no bias")
        t["embeddings.patch_embedding.bias"] = embed.proj.bias
    elif not has_cls:
        t["embeddings.patch_embedding.bias"] = torch.zeros(dim, dtype=embed.proj.weight.dtype)
    t["embeddings.position_embedding.weight"] = vit.pos_embed.reshape(-1, dim)
    if has_cls:
        t["embeddings.class_embedding"] = vit.cls_token.reshape(dim)
        t["pre_layrnorm.weight"] = norm_pre.weight
        t["pre_layrnorm.bias"] = norm_pre.bias
    for i, blk in enumerate(blocks[:kept]):
        p = f"encoder.layers.{i}."
        q, k, v = blk.attn.qkv.weight.chunk(3, dim=0)
        qb, kb, vb = blk.attn.qkv.bias.chunk(3, dim=0)
        t.update({
            p + "layer_norm1.weight": blk.norm1.weight, p + "layer_norm1.bias": blk.norm1.bias,
            p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": blk.attn.proj.weight, p + "self_attn.out_proj.bias": blk.attn.proj.bias,
            p + "layer_norm2.weight": blk.norm2.weight, p + "layer_norm2.bias": blk.norm2.bias,
            p + "mlp.fc1.weight": blk.mlp.fc1.weight, p + "mlp.fc1.bias": blk.mlp.fc1.bias,
            p + "mlp.fc2.weight": blk.mlp.fc2.weight, p + "mlp.fc2.bias": blk.mlp.fc2.bias,
        })
    t = {k: v.detach().contiguous() for k, v in t.items()}
    return hf, t, 1 if has_cls else 0
