"""Bringing your own backbones: what mmlm takes from a pretrained tower and LM whichever way they come in
(a transformers tower's own image processor, a timm SigLIP's squash, a local timm directory, the stop token of
an LM's own chat template, the BOS its tokenizer adds). Tiny random-weight parts saved locally, nothing downloaded."""

from __future__ import annotations

import warnings

import pytest
from test_interop_parts import make_tokenizer, save_lm, save_vision

from mmlm.config import VisionConfig

OWN_MEAN, OWN_STD = (0.1, 0.2, 0.3), (0.2, 0.25, 0.3)

# Gemma-like: its own template marks {% generation %}, writes bos_token and ends turns with <end_of_turn> (not eos)
MARKED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<start_of_turn>model\n"
    "{% generation %}{{ m['content'] }}<end_of_turn>{% endgeneration %}\n{% else %}<start_of_turn>user\n"
    "{{ m['content'] }}<end_of_turn>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
CONVERSATION = [{"role": "user", "content": "what color is the star?"}, {"role": "assistant", "content": "red"}]


def _own_preprocessor(path, family: str) -> None:
    """Replace the tower's image processor with one whose mean/std are not the family's."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    if family == "clip":
        ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                image_mean=list(OWN_MEAN), image_std=list(OWN_STD))
    else:
        ip = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=list(OWN_MEAN), image_std=list(OWN_STD))
    ip.save_pretrained(path)


def _lm_with_template(path, template: str | None, extra=TURN_TOKENS):
    """A Llama-like LM (its tokenizer adds <s>) with ``template`` as its own chat template."""
    tok = make_tokenizer("llama", list(extra))
    tok.chat_template = template
    return save_lm(path, "llama", tokenizer=tok)


def _timm_dir(path, arch: str = "vit_base_patch16_siglip_224", size: int = 32) -> str:
    """A tiny random timm model saved as timm saves one for the hub (config.json with ``architecture``)."""
    import timm
    from timm.models import save_for_hf

    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": size}
    model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    save_for_hf(model, str(path), model_args=args, safe_serialization=True)
    return str(path)


# ------------------------------------------------------------------ #3: a transformers tower's own image processor
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vision_config_records_the_towers_own_preprocessing(tmp_path, family):
    from mmlm.interop import build_from_pretrained
    from mmlm.modeling.hf_vision import HFVisionEncoder

    vpath, _ = save_vision(tmp_path / "v", family)
    _own_preprocessor(vpath, family)
    lpath = save_lm(tmp_path / "lm", "llama")
    # the way `mmlm fit` comes in (model_overrides.vision), and the name's: the same transform
    _, by_config = build_from_pretrained(VisionConfig(backend="hf", name=vpath, pretrained=True), lpath,
                                         chat_template="vicuna_v1")
    _, by_name = build_from_pretrained(vpath, lpath, chat_template="vicuna_v1")
    t = by_config.config.image_transform
    assert (t.mean, t.std) == (OWN_MEAN, OWN_STD)
    assert t == by_name.config.image_transform
    # the encoder given a bare VisionConfig too
    enc = HFVisionEncoder(VisionConfig(backend="hf", name=vpath, pretrained=False))
    assert (enc.image_transform().mean, enc.image_transform().std) == (OWN_MEAN, OWN_STD)


def test_user_image_transform_wins_over_the_towers(tmp_path):
    from mmlm.interop import build_from_pretrained

    vpath, _ = save_vision(tmp_path / "v", "clip")
    _own_preprocessor(vpath, "clip")
    lpath = save_lm(tmp_path / "lm", "llama")
    mine = VisionConfig(backend="hf", name=vpath, pretrained=False, image_transform={"mean": [0.4] * 3})
    _, proc = build_from_pretrained(mine, lpath, chat_template="vicuna_v1")
    t = proc.config.image_transform
    assert t.mean == (0.4,) * 3 and t.std == OWN_STD  # the user's field, the tower's others
    squash = VisionConfig(backend="hf", name=vpath, pretrained=False, resize_mode="squash")
    assert build_from_pretrained(squash, lpath, chat_template="vicuna_v1")[1].config.image_transform.resize_mode \
        == "squash"


# ------------------------------------------------------------------ #4: the stop token of an LM's own template
def test_end_of_turn_tokens_of_a_template():
    from mmlm.templates import end_of_turn_tokens

    tok = make_tokenizer("qwen2", ["<end_of_turn>"])
    span = "{% for m in messages %}{% generation %}{{ m['content'] }}END{% endgeneration %}{% endfor %}"
    assert end_of_turn_tokens(tok, span.replace("END", "<end_of_turn>")) == ("<end_of_turn>",)
    assert end_of_turn_tokens(tok, span.replace("END", "<end_of_turn>\n")) == ("<end_of_turn>",)  # trailing newline
    assert end_of_turn_tokens(tok, span.replace("END", "<|im_start|><|im_end|>")) == ()  # eos ends it: nothing more
    assert end_of_turn_tokens(tok, span.replace("END", "{{ eos_token }}")) == ()
    assert end_of_turn_tokens(tok, span.replace("END", " bye")) == ()  # plain text: no token to stop at
    assert end_of_turn_tokens(tok, "{{ raise_exception('no') }}{% generation %}{% endgeneration %}") == ()


def test_own_marked_template_stops_at_its_end_of_turn(tmp_path):
    from mmlm import load
    from mmlm.interop import build_from_pretrained

    vpath, _ = save_vision(tmp_path / "v", "clip")
    lpath = _lm_with_template(tmp_path / "lm", MARKED_TEMPLATE)
    vlm, proc = build_from_pretrained(vpath, lpath, max_length=128)
    tok = proc.tokenizer
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert proc.chat_template == MARKED_TEMPLATE
    labels = [int(i) for i in proc.encode(CONVERSATION)["labels"] if i != -100]
    assert labels[-1] == end  # training teaches the model to end its turn there ...
    assert proc.config.stop_tokens == ["<end_of_turn>"]  # ... so generation stops there
    assert set(proc.stop_token_ids) == {tok.eos_token_id, end}
    proc.save_pretrained(tmp_path / "ckpt")
    vlm.save_pretrained(tmp_path / "ckpt")
    assert end in load(tmp_path / "ckpt", device="cpu")[1].stop_token_ids


def test_own_template_ending_with_eos_needs_no_stop_token(tmp_path):
    from mmlm.interop import build_from_pretrained

    vpath, _ = save_vision(tmp_path / "v", "clip")
    lpath = _lm_with_template(tmp_path / "lm", MARKED_TEMPLATE.replace("<end_of_turn>{% endgeneration %}",
                                                                       "{{ eos_token }}{% endgeneration %}"))
    _, proc = build_from_pretrained(vpath, lpath, max_length=128)
    assert proc.config.stop_tokens == [] and proc.stop_token_ids == [proc.tokenizer.eos_token_id]


# ------------------------------------------------------------------ #5: a timm SigLIP squashes
@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224.webli", "vit_so400m_patch14_siglip_384.webli"])
def test_timm_siglip_squashes_unless_told(name):
    from mmlm.interop import vision_config_for
    from mmlm.modeling.vision import TimmViTEncoder

    tiny = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 28 if "patch14" in name else 32}
    cfg = vision_config_for(name, pretrained=False)
    cfg.timm_kwargs = tiny
    t = TimmViTEncoder(cfg).image_transform()
    assert (t.resize_mode, t.crop_pct) == ("squash", 1.0)
    cfg = vision_config_for(name, pretrained=False, resize_mode="crop")  # the user's choice stands
    cfg.timm_kwargs = tiny
    t = TimmViTEncoder(cfg).image_transform()
    assert (t.resize_mode, t.crop_pct) == ("crop", 0.9)


def test_other_timm_models_keep_their_crop():
    from mmlm.interop import vision_config_for
    from mmlm.modeling.vision import TimmViTEncoder

    cfg = vision_config_for("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=False)
    cfg.timm_kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}
    t = TimmViTEncoder(cfg).image_transform()
    assert (t.resize_mode, t.crop_pct) == ("crop", 0.9)


# ------------------------------------------------------------------ #6: the BOS an LM's tokenizer adds
def _ids(proc, conversation, prompt: bool = False) -> list[int]:
    return proc.encode(conversation, add_generation_prompt=prompt)["input_ids"].tolist()


def test_named_template_without_bos_writes_the_tokenizers_bos(tmp_path):
    from mmlm import load
    from mmlm.interop import build_from_pretrained
    from mmlm.interop.export import prompt_tokenizer

    vpath, _ = save_vision(tmp_path / "v", "clip")
    lpath = _lm_with_template(tmp_path / "lm", None, extra=())  # Llama-like: its tokenizer adds <s>
    with pytest.warns(UserWarning, match=r"adds <s> to every text but chat template 'chatml' never writes bos_token"):
        vlm, proc = build_from_pretrained(vpath, lpath, chat_template="chatml", max_length=128)
    bos = proc.tokenizer.bos_token_id
    train, prompt = _ids(proc, CONVERSATION), _ids(proc, CONVERSATION[:1], prompt=True)
    assert train[0] == bos and train.count(bos) == 1  # once, in training ...
    assert prompt[0] == bos and prompt.count(bos) == 1 and train[:len(prompt)] == prompt  # ... and in prompts
    # the export's tokenizer (adds nothing; the template writes BOS) gives the same ids
    export_tok = prompt_tokenizer(proc.tokenizer)
    text = export_tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert export_tok(text)["input_ids"] == prompt
    # saved and loaded: the same ids
    proc.save_pretrained(tmp_path / "ckpt")
    vlm.save_pretrained(tmp_path / "ckpt")
    proc2 = load(tmp_path / "ckpt", device="cpu")[1]
    assert _ids(proc2, CONVERSATION) == train and _ids(proc2, CONVERSATION[:1], prompt=True) == prompt


def test_bos_is_left_alone_where_nothing_is_missing(tmp_path):
    from mmlm.interop import build_from_pretrained
    from mmlm.templates import get_template

    vpath, _ = save_vision(tmp_path / "v", "clip")
    qwen = save_lm(tmp_path / "qwen", "qwen2")  # adds no BOS
    llama = _lm_with_template(tmp_path / "llama", None, extra=())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, proc = build_from_pretrained(vpath, qwen, chat_template="chatml", max_length=128)
        assert proc.chat_template == get_template("chatml").template
        _, proc = build_from_pretrained(vpath, llama, chat_template="vicuna_v1", max_length=128)  # writes BOS
        assert _ids(proc, CONVERSATION).count(proc.tokenizer.bos_token_id) == 1


def test_own_template_without_bos_is_warned_about(tmp_path):
    from mmlm.interop import build_from_pretrained

    vpath, _ = save_vision(tmp_path / "v", "clip")
    no_bos = MARKED_TEMPLATE.replace("{{ bos_token }}", "")
    lpath = _lm_with_template(tmp_path / "lm", no_bos)
    with pytest.warns(UserWarning, match=r"write \{\{ bos_token \}\} at the start of the template"):
        _, proc = build_from_pretrained(vpath, lpath, max_length=128)
    assert proc.chat_template == no_bos  # the LM author's template, as it is


# ------------------------------------------------------------------ #10: a local timm model in Python
@pytest.mark.parametrize("prefix", ["local-dir:", ""])
def test_local_timm_directory_is_a_timm_tower(tmp_path, prefix):
    import torch

    from mmlm.interop import build_from_pretrained, vision_config_for

    vdir = _timm_dir(tmp_path / "siglip-timm")
    cfg = vision_config_for(prefix + vdir)
    assert (cfg.backend, cfg.name, cfg.image_size, cfg.patch_size) == ("timm", "local-dir:" + vdir, 32, 16)
    lpath = save_lm(tmp_path / "lm", "qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # image and patch size right: no "do not apply" warning
        vlm, proc = build_from_pretrained(prefix + vdir, lpath, max_length=128)
    assert vlm.config.vision.backend == "timm" and vlm.num_image_tokens == 4
    assert proc.config.image_transform.resize_mode == "squash"  # a SigLIP, known by its recorded architecture
    # the weights are the directory's
    from safetensors.torch import load_file

    saved = load_file(f"{vdir}/model.safetensors")
    torch.testing.assert_close(vlm.vision.vit.patch_embed.proj.weight, saved["patch_embed.proj.weight"])


def test_directory_without_timm_config_is_refused(tmp_path):
    from mmlm.interop import vision_config_for

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a local timm model is a directory with timm's config.json"):
        vision_config_for(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no timm config.json"):
        vision_config_for("local-dir:" + str(tmp_path / "empty"))


# ------------------------------------------------------------------ a named timm tower through `mmlm fit`'s overrides
def test_a_named_timm_tower_takes_its_own_sizes_without_a_warning_unless_sizes_are_given(tmp_path):
    import warnings

    from mmlm.presets import get_preset
    from mmlm.training.build import named_vision_geometry

    def resolved(vision: dict):
        overrides = {"vision": vision}
        return named_vision_geometry(get_preset("small").updated(**overrides), overrides).vision

    v = resolved({"name": "vit_large_patch14_clip_336.openai"})
    assert (v.image_size, v.patch_size) == (336, 14)  # not the small preset's 224/16
    v = resolved({"name": "vit_base_patch16_siglip_224", "timm_kwargs": {"img_size": 256}})
    assert (v.image_size, v.patch_size) == (256, 16)
    v = resolved({"name": "vit_large_patch14_clip_336.openai", "image_size": 448})  # the user's word stands
    assert (v.image_size, v.patch_size) == (448, 16)
    # and the encoder built from it does not warn (it did: the preset's 224/16 "do not apply")
    from mmlm.modeling.vision import TimmViTEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = TimmViTEncoder(resolved({"name": "vit_tiny_patch16_384", "pretrained": False}))
    assert enc.num_patches == (384 // 16) ** 2
    with pytest.warns(UserWarning, match="do not apply to timm model"):
        TimmViTEncoder(resolved({"name": "vit_tiny_patch16_384", "pretrained": False, "image_size": 224}))
