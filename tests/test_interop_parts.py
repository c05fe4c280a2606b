"""Pretrained parts -> an mmlm model: transformers CLIP/SigLIP towers, any causal LM, its tokenizer
and chat template; all built with random weights and saved locally (nothing downloaded)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from mmlm.modeling.hf_vision import HFVisionEncoder
from mmlm.modeling.vision import VISION_ENCODERS


def test_hf_backend_is_registered():
    assert VISION_ENCODERS["hf"] is HFVisionEncoder

TEXTS = [
    "a small red star on the left and a large blue square at the bottom",
    "what color is the star? red", "how many shapes are there? two", "is there a green circle? no",
    "Describe the image briefly.", "You are a helpful assistant.", "where is the blue square? bottom",
    "USER: ASSISTANT: system user assistant",
] * 20

QWEN_TEMPLATE = (  # Qwen2-Instruct's template, shortened: no generation marks
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAVA_TEMPLATE = (  # llava-hf/llava-1.5's template: USER/ASSISTANT, list contents, no generation marks
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

FAMILIES = {
    # family: special tokens (first ones: bos/eos/pad), chat template, extra vocab rows, adds BOS
    "llama": dict(special=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad=None, template=None, extra=0,
                  add_bos=True),
    "qwen2": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                  pad="<|endoftext|>", template=QWEN_TEMPLATE, extra=8, add_bos=False),
    "gpt2": dict(special=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad=None, template=None,
                 extra=0, add_bos=False),
}


def make_tokenizer(family: str, extra_special: list[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    special = list(f["special"]) + list(extra_special)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if f["add_bos"]:
        bos_id = tok.token_to_id(f["bos"])
        tok.post_processor = processors.TemplateProcessing(single=f"{f['bos']} $A", pair=f"{f['bos']} $A $B",
                                                           special_tokens=[(f["bos"], bos_id)])
    kwargs = {k: f[k] for k in ("bos", "eos", "pad") if f[k]}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in kwargs.items()})
    if f["template"]:
        fast.chat_template = f["template"]
    return fast


def lm_config(family: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                           tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                           tie_word_embeddings=True)
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=512)


def save_lm(path, family: str, seed: int = 0, tokenizer=None):
    """A random-weight causal LM of ``family`` with its tokenizer, saved at ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer or make_tokenizer(family)
    cfg = lm_config(family, len(tok) + FAMILIES[family]["extra"])
    for k in ("bos", "eos", "pad"):
        tid = tok.convert_tokens_to_ids(FAMILIES[family][k]) if FAMILIES[family][k] else None
        setattr(cfg, f"{k}_token_id", tid)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def vision_config(family: str, layers: int = 3):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if family == "clip" else SiglipVisionConfig
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
               image_size=32, patch_size=8)


def save_vision(path, family: str, seed: int = 0, full: bool = False):
    """A random-weight CLIP/SigLIP vision tower (or, ``full``, a two-tower CLIP) with its image processor."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel, SiglipImageProcessor,
                              SiglipVisionModel)

    torch.manual_seed(seed)
    vc = vision_config(family)
    if full:
        model = CLIPModel(CLIPConfig(vision_config=vc.to_dict(), text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))
    else:
        model = (CLIPVisionModel if family == "clip" else SiglipVisionModel)(vc)
    model.save_pretrained(str(path))
    if family == "clip":
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(path))
    else:
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(path))
    return str(path), model


def picture(size=(32, 32), seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_tower_matches_transformers_hidden_states(tmp_path, family):
    from mmlm.config import VisionConfig

    path, model = save_vision(tmp_path / family, family)
    enc = HFVisionEncoder(VisionConfig(backend="hf", name=path, pretrained=True, feature_layer=-2)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        got = enc(x)
    if family == "clip":
        ref = ref[:, 1:]  # the class token is dropped
    assert got.shape == (2, 16, 32) and enc.num_patches == 16
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert len(enc.tower.encoder.layers) == 2  # pruned after the feature layer
    t = enc.image_transform()
    assert t.size == 32 and t.resize_mode == ("crop" if family == "clip" else "squash")
    keep = HFVisionEncoder(VisionConfig(backend="hf", name=path, pretrained=True, feature_layer=1,
                                        drop_prefix_tokens=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(keep(x), model(pixel_values=x, output_hidden_states=True).hidden_states[1])
    assert keep.num_patches == 16 + (1 if family == "clip" else 0)


def test_full_clip_checkpoint_gives_its_vision_tower(tmp_path):
    from mmlm.config import VisionConfig

    path, model = save_vision(tmp_path / "clip", "clip", full=True)
    enc = HFVisionEncoder(VisionConfig(backend="hf", name=path, pretrained=True, feature_layer=-1)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
        torch.testing.assert_close(enc(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("vision_family,lm_family,template", [
    ("clip", "llama", "vicuna_v1"), ("siglip", "qwen2", None), ("clip", "gpt2", "chatml")])
def test_build_from_pretrained_save_load(tmp_path, vision_family, lm_family, template):
    from mmlm import load
    from mmlm.interop import build_from_pretrained

    vpath, _ = save_vision(tmp_path / "v", vision_family)
    lpath = save_lm(tmp_path / "lm", lm_family)
    vlm, proc = build_from_pretrained(vpath, lpath, "mlp2x_gelu", template, max_length=128)
    vlm.eval()
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    emb = vlm.lm.get_input_embeddings().num_embeddings
    assert vlm.config.image_token_id == image_id == proc.image_token_id
    assert emb >= len(tok) and vlm.config.text.hf_config["vocab_size"] == emb
    if lm_family == "qwen2":  # padded vocabulary: no resize needed
        assert emb == len(tok) - 1 + 8
        assert "<|im_start|>" in proc.chat_template and "{% generation %}" in proc.chat_template
    else:  # grown to a multiple of 64
        assert emb % 64 == 0
    # pretrained LM weights survive (old rows unchanged)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(lpath)
    n = ref.get_input_embeddings().num_embeddings
    torch.testing.assert_close(vlm.lm.get_input_embeddings().weight[:n], ref.get_input_embeddings().weight)
    # a training batch with assistant-only labels, and a loss
    batch = proc(images=[picture()], conversations=[[{"role": "user", "content": "<image>\nwhat color is the star?"},
                                                     {"role": "assistant", "content": "red"}]])
    labels = batch["labels"][batch["labels"] != -100]
    assert tok.decode(labels).strip().startswith("red")
    with torch.no_grad():
        out = vlm(**batch)
    assert torch.isfinite(out.loss)
    # save -> load (offline, from config.json alone: the parts are gone) gives the same logits
    vlm.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(vpath)
    shutil.rmtree(lpath)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["vision"]["backend"] == "hf" and cfg["image_token_id"] == image_id
    vlm2, proc2 = load(tmp_path / "ckpt", device="cpu", dtype="float32")
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(vlm2(**batch).logits, vlm(**batch).logits)
    assert proc2.chat_template == proc.chat_template and proc2.config.stop_tokens == proc.config.stop_tokens


def test_lm_without_chat_template_needs_a_name(tmp_path):
    from mmlm.interop import build_from_pretrained

    vpath, _ = save_vision(tmp_path / "v", "clip")
    lpath = save_lm(tmp_path / "lm", "llama")
    with pytest.raises(ValueError) as e:
        build_from_pretrained(vpath, lpath)
    # every entry point's way to name one (`mmlm fit` reaches this through build_from_pretrained)
    for way in ("`mmlm fit --model.chat_template NAME`", "`mmlm import hf --chat-template NAME`",
                "chat_template=NAME"):
        assert way in str(e.value)
    assert "vicuna_v1" in str(e.value) and "pass --chat-template" not in str(e.value)
    with pytest.raises(ValueError, match="unknown chat template 'nope'"):
        build_from_pretrained(vpath, lpath, chat_template="nope")


def test_chat_template_choice():
    from mmlm.templates import choose_chat_template

    qwen = make_tokenizer("qwen2")
    assert choose_chat_template(qwen).name == "chatml"  # recognised from its template's markers
    qwen.chat_template = None
    assert choose_chat_template(qwen).name == "chatml"  # ... or from its vocabulary
    marked = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    qwen.chat_template = marked
    assert choose_chat_template(qwen).template == marked  # the LM's own, when it has generation marks
    assert choose_chat_template(qwen, "llama3").name == "llama3"
    llava = make_tokenizer("llama")
    llava.chat_template = LLAVA_TEMPLATE
    assert choose_chat_template(llava).name == "vicuna_v1"


@pytest.mark.parametrize("name", ["chatml", "vicuna_v1", "llama3", "mmlm"])
def test_named_templates_take_string_and_list_contents(name):
    from mmlm.templates import get_template

    tok = make_tokenizer("llama", ["<image>"])
    tok.chat_template = get_template(name).template
    as_text = [{"role": "user", "content": "<image>\nwhat is it?"}, {"role": "assistant", "content": "a star"}]
    as_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "a star"}]}]
    text = tok.apply_chat_template(as_text, tokenize=False)
    assert text == tok.apply_chat_template(as_list, tokenize=False)
    enc = tok.apply_chat_template(as_text, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = tok.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert answer.strip().startswith("a star")
    prompt = tok.apply_chat_template(as_text[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)  # generation starts where training's answer does


def test_vision_backend_is_guessed(tmp_path):
    from mmlm.interop import vision_config_for

    timm_cfg = vision_config_for("vit_small_patch16_224.augreg_in21k", pretrained=False)
    assert timm_cfg.backend == "timm" and timm_cfg.image_size == 224 and timm_cfg.patch_size == 16
    path, _ = save_vision(tmp_path / "s", "siglip")
    hf_cfg = vision_config_for(path)
    assert hf_cfg.backend == "hf" and hf_cfg.image_size == 32 and hf_cfg.patch_size == 8
    with pytest.raises(ValueError, match="CLIP and SigLIP"):
        lm = save_lm(tmp_path / "lm", "gpt2")
        vision_config_for(lm, backend="hf")


def test_checkpoint_preprocessing_is_recorded(tmp_path):
    from transformers import LlavaImageProcessor

    from mmlm.interop import vision_config_for

    path, _ = save_vision(tmp_path / "c", "clip")
    LlavaImageProcessor(do_pad=True, size={"height": 32, "width": 32}, do_center_crop=False,
                        image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(path)
    cfg = vision_config_for(path, pretrained=False)
    t = HFVisionEncoder(cfg).image_transform()
    assert (t.resize_mode, t.mean, t.std, t.size) == ("pad", (0.5,) * 3, (0.25,) * 3, 32)
    assert t.resize_kernel == "auto"
    cfg.image_transform = {**cfg.image_transform, "resize_kernel": "pil"}  # an override, as model_overrides gives
    assert HFVisionEncoder(cfg).image_transform().resize_kernel == "pil"
