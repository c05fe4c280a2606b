"""`mmlm export hf`: a stock transformers LLaVA directory that gives mmlm's logits and greedy text."""

from __future__ import annotations

import os

import pytest
import torch

from _tiny import tiny_pair, tiny_tokenizer
from mmlm import VLM, Processor
from mmlm.checkpoint import save_pretrained
from mmlm.cli.main import main
from mmlm.config import ImageTransformConfig, ProjectorConfig, TextConfig, VisionConfig, VLMConfig
from mmlm.interop import ExportError, build_from_pretrained, check_exportable, export_hf, image_processor_for
from mmlm.image_transform import ImageTransform
from test_interop_parts import picture, save_lm, save_vision

PROMPT = "what color is the star?"


def hf_pair(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(str(path)).eval(), AutoProcessor.from_pretrained(str(path))


def user_turn(image, text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def transformers_inputs(hp, image, text: str = PROMPT) -> dict:
    """The exported processor's inputs both ways users call it: ``apply_chat_template(tokenize=True)``,
    and the model cards' ``processor(images=..., text=apply_chat_template(...))``."""
    msgs = user_turn(image, text)
    by_template = hp.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    prompt = hp.apply_chat_template(msgs, add_generation_prompt=True)
    by_text = hp(images=[image], text=[prompt], return_tensors="pt")
    return {"apply_chat_template(tokenize=True)": by_template, "processor(text=prompt)": by_text}


def assert_same_as_transformers(vlm, proc, out, image, check_text: bool = True):
    """Same input ids, logits within 1e-4 (both ways of calling the processor) and the same greedy
    text, transformers vs mmlm."""
    from mmlm.api import generate_texts
    from mmlm.generation import GenerationConfig

    model, hp = hf_pair(out)
    mine = proc(images=[image], text=[PROMPT])
    with torch.no_grad():
        ours = vlm(input_ids=mine["input_ids"], pixel_values=mine["pixel_values"],
                   attention_mask=mine["attention_mask"]).logits
    ways = transformers_inputs(hp, image)
    for how, theirs_in in ways.items():
        assert theirs_in["input_ids"].tolist() == mine["input_ids"].tolist(), how
        torch.testing.assert_close(theirs_in["pixel_values"], mine["pixel_values"], rtol=0, atol=1e-5)
        with torch.no_grad():
            theirs = model(**theirs_in).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4, msg=lambda m, how=how: f"{how}: {m}")
    hin = ways["apply_chat_template(tokenize=True)"]
    if check_text:
        with torch.no_grad():
            gen = model.generate(**hin, max_new_tokens=8, do_sample=False)
        text = hp.batch_decode(gen[:, hin["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert text == generate_texts(vlm, proc, [image], [PROMPT], GenerationConfig(max_new_tokens=8))[0]


@pytest.mark.parametrize("vision_family,lm_family,template", [("clip", "llama", "vicuna_v1"),
                                                             ("siglip", "qwen2", None)])
def test_export_matches_transformers(tmp_path, vision_family, lm_family, template):
    vpath, _ = save_vision(tmp_path / "v", vision_family, seed=1)
    lpath = save_lm(tmp_path / "lm", lm_family, seed=2)
    system = "You are a helpful assistant." if lm_family == "qwen2" else None
    vlm, proc = build_from_pretrained(vpath, lpath, "mlp2x_gelu", template, max_length=128, system_prompt=system)
    save_pretrained(tmp_path / "ckpt", vlm.eval(), proc)
    rc = main(["export", "hf", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert rc == 0
    names = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "generation_config.json", "chat_template.jinja"} <= names
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # nothing half-written left behind
    import json

    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["vision_feature_layer"] == -1
    assert cfg["vision_config"]["num_hidden_layers"] == 2  # feature layer -2 of 3: the layers kept
    assert cfg["vision_feature_select_strategy"] == ("default" if vision_family == "clip" else "full")
    assert cfg["image_token_index"] == vlm.config.image_token_id
    tok = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok["model_input_names"] == ["input_ids", "attention_mask"]  # no token_type_ids (transformers 4.x)
    assert_same_as_transformers(vlm, proc, tmp_path / "hf", picture(seed=3))


def bos_lm_pair(tmp_path, seed: int = 0):
    """A CLIP tower + a random-weight Llama whose tokenizer adds BOS itself (as Llama-2, Vicuna and
    Mistral tokenizers do), with the vicuna_v1 template, which writes ``bos_token`` too."""
    vpath, _ = save_vision(tmp_path / "v", "clip", seed=seed)
    lpath = save_lm(tmp_path / "lm", "llama", seed=seed + 1)
    vlm, proc = build_from_pretrained(vpath, lpath, "mlp2x_gelu", "vicuna_v1", max_length=128)
    return vlm.eval(), proc


def test_export_of_a_bos_adding_lm_gives_mmlms_ids_every_way(tmp_path):
    from transformers import AutoTokenizer

    vlm, proc = bos_lm_pair(tmp_path, seed=11)
    bos = proc.tokenizer.bos_token_id
    assert AutoTokenizer.from_pretrained(tmp_path / "lm")("a")["input_ids"][0] == bos  # the LM's adds BOS
    image = picture(seed=12)
    mine = proc(images=[image], text=[PROMPT])["input_ids"][0].tolist()
    assert mine[0] == bos and mine[1] != bos  # mmlm: the template's BOS, once
    export_hf((vlm, proc), tmp_path / "hf")
    assert proc.tokenizer("a")["input_ids"][0] == bos  # the mmlm processor's tokenizer is left as it was
    # both transformers call styles: the same ids and logits as mmlm (no second BOS)
    assert_same_as_transformers(vlm, proc, tmp_path / "hf", image, check_text=False)
    # vLLM-style: the tokenizer renders the template, then tokenizes it with or without special tokens
    _, hp = hf_pair(tmp_path / "hf")
    msgs = [{"role": "user", "content": "<image>\n" + PROMPT}]
    prompt = hp.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = hp.tokenizer(prompt)["input_ids"]
    assert ids == hp.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids == hp.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    image_id = vlm.config.image_token_id  # mmlm's ids with each image's span as the one <image> written
    written = [t for i, t in enumerate(mine) if t != image_id or mine[i - 1] != image_id]
    assert ids == written and ids[0] == bos and ids[1] != bos


def test_export_pads_on_the_left_for_batched_generation(tmp_path):
    """A batch of two prompts of different lengths generates what each prompt does alone."""
    import json

    vlm, proc = bos_lm_pair(tmp_path, seed=13)
    with torch.no_grad():  # random weights with some spread: greedy tokens that depend on the input
        for p in vlm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    export_hf((vlm, proc), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["padding_side"] == "left"
    model, hp = hf_pair(tmp_path / "hf")
    assert hp.tokenizer.padding_side == "left"
    images = [picture(seed=14), picture(seed=15)]
    prompts = [PROMPT, "how many shapes are there in this picture, and where is the blue square?"]
    texts = [hp.apply_chat_template(user_turn(im, q), add_generation_prompt=True) for im, q in zip(images, prompts)]
    with torch.no_grad():
        alone = []
        for im, t in zip(images, texts):
            hin = hp(images=[im], text=[t], return_tensors="pt")
            alone.append(model.generate(**hin, max_new_tokens=8, do_sample=False)[0, hin["input_ids"].shape[1]:])
        batch = hp(images=images, text=texts, padding=True, return_tensors="pt")
        assert batch["attention_mask"][0].tolist() != batch["attention_mask"][1].tolist()  # one is padded
        together = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert len(set(alone[0].tolist())) > 1  # not one token over and over
    for i in range(2):
        n = len(alone[i])  # alone, a prompt may stop early; in the batch it goes on after its eos
        assert together[i, :n].tolist() == alone[i].tolist(), i


def test_export_linear_projector_keeping_the_class_token(tmp_path):
    """Also GPT-2, whose tied embeddings LLaVA cannot tie (no embed_tokens): exported untied."""
    vpath, _ = save_vision(tmp_path / "v", "clip", seed=4)
    lpath = save_lm(tmp_path / "lm", "gpt2", seed=5)
    vlm, proc = build_from_pretrained(vpath, lpath, "linear", "chatml", drop_prefix_tokens=False,
                                      feature_layer=-1, max_length=128)
    export_hf((vlm.eval(), proc), tmp_path / "hf")
    model, hp = hf_pair(tmp_path / "hf")
    assert hp.vision_feature_select_strategy == "full" and hp.num_additional_image_tokens == 1
    assert model.config.projector_hidden_act == "linear"
    assert_same_as_transformers(vlm, proc, tmp_path / "hf", picture(seed=6), check_text=False)


def timm_pair(layout: str, seed: int = 0):
    """A from-scratch timm ViT with CLIP's layout (class token + pre-norm, QuickGELU) or SigLIP's."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    kwargs = {"pre_norm": True, "act_layer": "quick_gelu"} if layout == "clip" else {"act_layer": "gelu_tanh"}
    cfg = VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=3, num_heads=2, feature_layer=-2,
                            class_token=layout == "clip", timm_kwargs=kwargs),
        projector=ProjectorConfig(name="mlp2x_gelu"),
        text=TextConfig(hf_config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                                   "vocab_size": len(tok), "max_position_embeddings": 256}),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    vlm = VLM(cfg).eval()
    return vlm, Processor.for_model(vlm, tok, max_length=128)


@pytest.mark.parametrize("layout", ["clip", "siglip"])
def test_export_timm_tower_converted_to_transformers(tmp_path, layout):
    vlm, proc = timm_pair(layout, seed=7)
    plan = check_exportable(vlm)
    assert plan["vision_hf"]["model_type"] == f"{layout}_vision_model"
    export_hf((vlm, proc), tmp_path / "hf")
    assert_same_as_transformers(vlm, proc, tmp_path / "hf", picture(seed=8), check_text=False)
    # a from-scratch LM's config holds its class's default ids (Llama: eos 2, here <image>): the export's
    # text config carries the tokenizer's instead, as its generation config does
    import json

    text_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
    stops = proc.stop_token_ids
    assert text_cfg["eos_token_id"] == (stops if len(stops) > 1 else stops[0])
    assert text_cfg["bos_token_id"] == proc.tokenizer.bos_token_id
    assert vlm.config.image_token_id not in stops


def test_refuses_what_llava_cannot_represent(tmp_path, capsys):
    vlm, proc = tiny_pair(projector="pixel_shuffle")
    with pytest.raises(ExportError, match=r"pixel_shuffle.*Idefics3.*mlp2x_gelu"):
        check_exportable(vlm)
    # the plain from-scratch timm ViT (class token, no pre-norm) and a conv stem
    with pytest.raises(ExportError, match=r"no pre-norm.*vision.class_token false.*vision.backend='hf'"):
        check_exportable(tiny_pair()[0])
    conv = VLM.from_preset("tiny", image_token_id=5)
    with pytest.raises(ExportError, match="conv stem"):
        check_exportable(conv)
    # an MLP projector narrower than the LM, and one that adds a position embedding to its tokens
    vlm2, _ = timm_pair("clip")
    narrow = VLM(vlm2.config.updated(projector={"hidden_dim": 16}))
    with pytest.raises(ExportError, match="hidden_dim=None"):
        check_exportable(narrow)
    placed = VLM(vlm2.config.updated(projector={"position_embedding": True}))
    with pytest.raises(ExportError, match=r"^cannot export to transformers LLaVA: the projector adds a learned "
                                          r"position embedding[^|]*$"):
        check_exportable(placed)  # the only problem
    shared = VLM(vlm2.config.updated(projector={"position_embedding": True}, image_positions="shared"))
    with pytest.raises(ExportError, match="image_positions='shared'"):
        check_exportable(shared)
    # a processor that puts images after the question: LlavaProcessor cannot, so nothing is written
    vlm3, proc3 = timm_pair("clip")
    proc3.config.image_placement = "after_text"
    with pytest.raises(ExportError, match="image_placement='after_text'"):
        export_hf((vlm3, proc3), tmp_path / "placed")
    assert not (tmp_path / "placed").exists()
    # through the CLI: exit 2, one line, nothing written
    save_pretrained(tmp_path / "ckpt", vlm, proc)
    capsys.readouterr()
    rc = main(["export", "hf", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: cannot export") and "\n" not in err and "Idefics3" in err
    assert not (tmp_path / "hf").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("mode,pct,size", [("squash", 1.0, (50, 37)), ("crop", 1.0, (48, 36)),
                                           ("crop", 0.875, (50, 37)), ("pad", 1.0, (37, 50))])
def test_image_processor_matches_the_transform(mode, pct, size):
    t = ImageTransformConfig(size=32, resize_mode=mode, crop_pct=pct, mean=(0.48145466, 0.4578275, 0.40821073),
                             std=(0.26862954, 0.26130258, 0.27577711))
    im = picture(size, seed=9)
    theirs = image_processor_for(t)(images=[im], return_tensors="pt")["pixel_values"][0]
    ours = ImageTransform(t)(im)
    assert theirs.shape == ours.shape == (3, 32, 32)
    diff = (theirs - ours).abs()  # torchvision vs PIL resampling: the same geometry, rounding apart
    assert diff.mean() < 0.01 and diff.max() < 0.2


def test_export_says_when_its_centre_crop_can_be_a_pixel_off():
    """transformers floors the crop offset where mmlm (as timm) rounds it: an odd excess is one pixel off."""
    from mmlm.interop.export import crop_difference

    assert crop_difference(ImageTransformConfig(size=64, resize_mode="squash")) is None
    assert crop_difference(ImageTransformConfig(size=64, resize_mode="pad")) is None
    odd = crop_difference(ImageTransformConfig(size=64, resize_mode="crop", crop_pct=0.95))  # 67 - 64 = 3
    assert "one pixel off mmlm's for every image" in odd and "resize_mode squash exports exactly" in odd
    even = crop_difference(ImageTransformConfig(size=32, resize_mode="crop", crop_pct=0.875))  # 36 - 32 = 4
    assert "non-square images" in even
