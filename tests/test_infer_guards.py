"""Inference guards: bad checkpoints, devices and decoding inputs give one clear error instead of a
traceback or a silently wrong result (prompts past the LM's positions, right-padded prompts, a bf16
load that rounds the rotary frequencies, a processor from another model)."""

import argparse
import json
import shutil

import pytest
import torch

from _tiny import image, tiny_checkpoint, tiny_pair
from mmlm import describe, load
from mmlm.checkpoint import load_vlm, read_config
from mmlm.cli.main import main
from mmlm.generation import GenerationConfig, generate
from mmlm.processing import Processor


@pytest.fixture
def ckpt(tmp_path_factory, tmp_path):
    """A private copy of the tiny checkpoint, free to damage."""
    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoint(tmp_path_factory), path)
    return path


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------- generation
def test_prompt_past_the_lm_positions_is_an_error_and_generation_stops_at_the_last_one():
    """GPT-2's learned positions (256 here): an IndexError before; a rotary LM would decode on silently."""
    vlm, proc = tiny_pair(lm="gpt2")
    limit = vlm.lm.config.max_position_embeddings
    with pytest.raises(ValueError, match="positions but the model has 256"):
        describe([image()], model=(vlm, proc), prompt="red star " * 200, max_new_tokens=2)
    batch = proc(images=[image()], text=["what color is the star?"])
    prompt_len = batch["input_ids"].shape[1]
    out = generate(vlm, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                   num_images=batch["num_images"], max_new_tokens=limit, eos_token_id=None)  # no eos: runs to the end
    assert out.shape == (1, limit - prompt_len)


def test_right_padded_prompts_are_refused():
    """A right-padded row would predict its first token from a pad; generate takes left-padded prompts."""
    vlm, proc = tiny_pair()
    enc = [proc.encode([{"role": "user", "content": q}], [image()], add_generation_prompt=True)
           for q in ("what color is the star?", "how many shapes are there? is there a green circle?")]
    right = proc.pad(enc, "right")
    with pytest.raises(ValueError, match="left-padded"):
        generate(vlm, right["input_ids"], right["pixel_values"], right["attention_mask"],
                 num_images=right["num_images"], max_new_tokens=2)
    left = proc.pad(enc, "left")
    assert generate(vlm, left["input_ids"], left["pixel_values"], left["attention_mask"],
                    num_images=left["num_images"], max_new_tokens=2).shape[0] == 2


def test_negative_top_k_is_refused():
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        GenerationConfig(do_sample=True, top_k=-3)


# ---------------------------------------------------------------------------------- load
def test_bf16_load_keeps_the_rotary_frequencies_float32(ckpt):
    """As transformers loads an LM in bf16: the inverse frequencies rounded to bf16 move the angles of
    position p by up to ~0.4% of p (greedy tokens at positions 1000-1500 of a random Llama: 39% equal
    to float32's instead of 91%)."""
    ref, _ = load(ckpt, device="cpu", dtype="float32")
    vlm, proc = load(ckpt, device="cpu", dtype="bfloat16")
    freqs = {n: b for n, b in vlm.named_buffers() if n.endswith("inv_freq")}
    assert freqs, "the tiny Llama has rotary frequencies"
    ref_buffers = dict(ref.named_buffers())
    for name, b in freqs.items():
        assert b.dtype == torch.float32 and torch.equal(b, ref_buffers[name]), name
    assert {p.dtype for p in vlm.parameters()} == {torch.bfloat16}
    assert set(vlm.state_dict()) == set(ref.state_dict())  # still non-persistent: not saved
    assert len(describe([image()], model=(vlm, proc), max_new_tokens=2)) == 1
    # a cast in Python keeps them too (vlm.to, .half()), as transformers' from_pretrained(dtype=...) does
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)):
        again, _ = load(ckpt, device="cpu", dtype="float32")
        cast(again)
        assert {p.dtype for p in again.parameters()} != {torch.float32}
        assert all(b.dtype == torch.float32 and torch.equal(b, ref_buffers[n])
                   for n, b in again.named_buffers() if n.endswith("inv_freq"))


def test_a_processor_from_another_model_is_refused_at_load(ckpt):
    _edit_json(ckpt / "processor_config.json", num_image_tokens=7)
    with pytest.raises(ValueError, match="processor_config.json is not this model's"):
        load(ckpt, device="cpu")


# ---------------------------------------------------------------------------------- damaged checkpoints
def test_damaged_config_json_is_a_clear_error(ckpt):
    (ckpt / "config.json").write_text('{"format": "mmlm-vlm", ')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        read_config(ckpt)
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an mmlm model config"):
        read_config(ckpt)


def test_weights_of_other_shapes_are_a_one_line_error(ckpt):
    hidden = json.loads((ckpt / "config.json").read_text())["text"]["hf_config"]["intermediate_size"]
    _edit_json(ckpt / "config.json", **{"text.hf_config.intermediate_size": 2 * hidden})
    with pytest.raises(ValueError, match="does not match its config: .* of another shape") as e:
        load_vlm(ckpt)
    assert "\n" not in str(e.value)


def test_truncated_weights_file_is_a_one_line_cli_error(ckpt, tmp_path, capsys):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    img = tmp_path / "red.png"
    image().save(img)
    assert main(["describe", str(img), "--model", str(ckpt), "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model.safetensors cannot be read" in err[0]


def test_a_tokenizer_without_its_config_is_refused_as_one_line(ckpt, tmp_path, capsys):
    """Without tokenizer_config.json the tokenizer loads with no eos/pad token: describe, chat and eval ended in a
    traceback in the first pad, and mmlm.load returned a model whose generation would never stop."""
    (ckpt / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="the tokenizer has no end-of-sequence token") as e:
        Processor.from_pretrained(ckpt)
    assert "\n" not in str(e.value)
    img = tmp_path / "red.png"
    image().save(img)
    assert main(["describe", str(img), "--model", str(ckpt), "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "tokenizer_config.json missing?" in err


def test_damaged_processor_files_are_clear_errors(ckpt):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="cannot load the tokenizer") as e:
        Processor.from_pretrained(ckpt)
    assert "\n" not in str(e.value)
    (ckpt / "processor_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"processor_config\.json is not a valid processor config"):
        Processor.from_pretrained(ckpt)
    (ckpt / "processor_config.json").write_text('{"num_image_tokens": 4}')
    with pytest.raises(ValueError, match="image_transform"):
        Processor.from_pretrained(ckpt)


def test_a_checkpoint_without_its_chat_template_is_refused(ckpt):
    """Falling back to mmlm's default template would prompt e.g. a ChatML model in another format, silently."""
    (ckpt / "chat_template.jinja").unlink()
    with pytest.raises(FileNotFoundError, match="has no chat_template.jinja"):
        Processor.from_pretrained(ckpt)


def test_a_run_directory_given_as_the_model_names_its_model(ckpt, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.move(str(ckpt), run_dir / "model")
    with pytest.raises(FileNotFoundError, match=r"a run directory\? its model is .*run/model"):
        read_config(run_dir)


# ---------------------------------------------------------------------------------- devices
def test_mps_without_mps_is_a_clear_error(ckpt, monkeypatch):
    from mmlm.cli.describe import check_model_args

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device mps: MPS"):
        check_model_args(argparse.Namespace(device="mps", model=str(ckpt)))

