"""`mmlm import hf`: transformers LLaVA checkpoints -> mmlm checkpoints (and back, unchanged)."""

from __future__ import annotations

import json

import pytest
import torch

from mmlm import describe, load
from mmlm.cli.main import main
from mmlm.interop import import_hf
from test_interop_parts import LLAVA_TEMPLATE, lm_config, make_tokenizer, picture, vision_config

QUESTION = "what color is the star?"
PROMPT = f"USER: <image>\n{QUESTION} ASSISTANT:"


def save_llava(path, *, vision: str = "clip", act: str = "gelu", strategy: str = "default", seed: int = 0):
    """A random-weight LLaVA made with transformers (CLIP/SigLIP + Llama), saved with its processor."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    tok = make_tokenizer("llama", ["<image>"])
    image_id = tok.convert_tokens_to_ids("<image>")
    text = lm_config("llama", len(tok))
    text.bos_token_id, text.eos_token_id = tok.bos_token_id, tok.eos_token_id
    cfg = LlavaConfig(vision_config=vision_config(vision), text_config=text, image_token_index=image_id,
                      image_seq_length=16, projector_hidden_act=act, vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(path))
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy,
                   chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1 if vision == "clip" else 0,
                   ).save_pretrained(str(path))
    return model


def rendered_prompt(path) -> str:
    """QUESTION about one image as the checkpoint's own chat template writes it."""
    from transformers import AutoProcessor

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return AutoProcessor.from_pretrained(str(path)).apply_chat_template(msgs, add_generation_prompt=True)


def hf_logits(path, image, prompt=None):
    """transformers' logits for ``prompt`` (None: as the checkpoint's template renders QUESTION, the
    model cards' way: processor(images=..., text=apply_chat_template(...)))."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(path)).eval()
    proc = AutoProcessor.from_pretrained(str(path))
    inputs = proc(images=[image], text=[prompt or rendered_prompt(path)], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits, inputs


def test_import_then_export_gives_the_original(tmp_path):
    save_llava(tmp_path / "llava")
    assert main(["import", "hf", "--model", str(tmp_path / "llava"), "--out", str(tmp_path / "mmlm")]) == 0
    assert main(["export", "hf", "--model", str(tmp_path / "mmlm"), "--out", str(tmp_path / "back")]) == 0
    image = picture(seed=1)
    # llava-hf's template writes no BOS (its tokenizer adds one); the export's vicuna_v1 writes it and its
    # tokenizer adds none, so that vLLM's way (template rendered, then tokenized without special tokens)
    # gets it too. A prompt written by hand follows the checkpoint's template.
    assert rendered_prompt(tmp_path / "llava") == PROMPT
    assert rendered_prompt(tmp_path / "back") == "<s>" + PROMPT
    original, inputs = hf_logits(tmp_path / "llava", image)
    again, inputs2 = hf_logits(tmp_path / "back", image)
    assert inputs["input_ids"].tolist() == inputs2["input_ids"].tolist()
    torch.testing.assert_close(again, original, rtol=0, atol=1e-4)
    # mmlm's own model and processor agree with the original
    vlm, proc = load(tmp_path / "mmlm", device="cpu", dtype="float32")
    cfg = json.loads((tmp_path / "mmlm" / "config.json").read_text())
    assert cfg["vision"]["backend"] == "hf" and cfg["vision"]["feature_layer"] == -2
    hfv = cfg["vision"]["hf_config"]  # the geometry fields show the tower's, not the timm defaults
    assert (cfg["vision"]["width"], cfg["vision"]["num_heads"]) == (hfv["hidden_size"], hfv["num_attention_heads"])
    assert cfg["vision"]["depth"] == hfv["num_hidden_layers"]
    mine = proc(images=[image], text=[QUESTION])
    assert mine["input_ids"].tolist() == inputs["input_ids"].tolist()  # vicuna_v1, chosen from the template
    torch.testing.assert_close(mine["pixel_values"], inputs["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = vlm(input_ids=mine["input_ids"], pixel_values=mine["pixel_values"],
                   attention_mask=mine["attention_mask"]).logits
    torch.testing.assert_close(ours, original, rtol=0, atol=1e-4)
    # and the imported checkpoint is an ordinary mmlm checkpoint
    assert len(describe([image], model=(vlm, proc), max_new_tokens=3)) == 1
    batch = proc(images=[image], conversations=[[{"role": "user", "content": "what is it?"},
                                                 {"role": "assistant", "content": "a star"}]])
    assert torch.isfinite(vlm(**batch).loss)


def test_linear_projector_is_folded(tmp_path):
    save_llava(tmp_path / "llava", act="linear", strategy="full", seed=2)
    vlm, proc = import_hf(tmp_path / "llava")
    assert vlm.config.projector.name == "linear" and not vlm.config.vision.drop_prefix_tokens
    image = picture(seed=3)
    theirs, inputs = hf_logits(tmp_path / "llava", image)
    with torch.no_grad():
        ours = vlm(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                   attention_mask=inputs["attention_mask"]).logits
    assert vlm.num_image_tokens == 17  # 16 patches + the class token ("full")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_refuses_what_mmlm_cannot_represent(tmp_path, capsys):
    save_llava(tmp_path / "silu", act="silu")
    with pytest.raises(ValueError, match="projector activation 'silu'"):
        import_hf(tmp_path / "silu")
    save_llava(tmp_path / "siglip", vision="siglip", strategy="default")
    with pytest.raises(ValueError, match="without a class token"):
        import_hf(tmp_path / "siglip")
    (tmp_path / "notllava").mkdir()
    (tmp_path / "notllava" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    capsys.readouterr()
    rc = main(["import", "hf", "--model", str(tmp_path / "notllava"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a LLaVA checkpoint" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    rc = main(["import", "hf", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # transformers would ask for a model_type key in a config.json that is not there
    rc = main(["import", "hf", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["import", "export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "--model" in capsys.readouterr().out


def test_max_length_follows_the_lms_positions(tmp_path):
    save_llava(tmp_path / "llava", seed=4)
    positions = json.loads((tmp_path / "llava" / "config.json").read_text())["text_config"]["max_position_embeddings"]
    _, proc = import_hf(tmp_path / "llava")
    assert proc.config.max_length == min(2048, positions)
    assert import_hf(tmp_path / "llava", max_length=positions // 2)[1].config.max_length == positions // 2
    with pytest.raises(ValueError, match=f"exceeds the LM's {positions} positions"):
        import_hf(tmp_path / "llava", max_length=positions + 1)
