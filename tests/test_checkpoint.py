"""Checkpoints: save -> load is bit-identical, atomic, offline, and never unpickles."""

import json
import os

import pytest
import torch

from _tiny import image, tiny_pair
from mmlm import VLM, Processor, load
from mmlm.checkpoint import UnsafeCheckpointError, save_pretrained


def test_save_load_bit_identical(tmp_path):
    vlm, proc = tiny_pair(projector="pixel_shuffle")
    save_pretrained(tmp_path / "ckpt", vlm, proc)
    names = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind
    vlm2, proc2 = load(tmp_path / "ckpt", device="cpu")
    conv = [{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": "red"}]
    b1, b2 = proc(images=[image()], conversations=[conv]), proc2(images=[image()], conversations=[conv])
    for k in ("input_ids", "labels", "attention_mask", "pixel_values", "num_images"):
        assert torch.equal(b1[k], b2[k]), k
    with torch.no_grad():
        assert torch.equal(vlm(**b1).logits, vlm2(**b2).logits)
    assert proc2.chat_template == proc.chat_template
    assert proc2.config == proc.config


def test_separate_saves_share_a_directory(tmp_path):
    vlm, proc = tiny_pair()
    vlm.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    vlm.save_pretrained(tmp_path / "m")  # re-saving the model keeps the processor files
    assert (tmp_path / "m" / "processor_config.json").is_file()
    assert isinstance(VLM.from_pretrained(tmp_path / "m"), VLM)
    assert isinstance(Processor.from_pretrained(tmp_path / "m"), Processor)


def test_pickle_weights_are_refused(tmp_path):
    vlm, _ = tiny_pair()
    vlm.save_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Boom()}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pickle-based weights"):
        VLM.from_pretrained(tmp_path / "m")
    assert not (tmp_path / "pwned").exists()


def test_bad_directories_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        VLM.from_pretrained(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="mmlm import hf"):
        VLM.from_pretrained(tmp_path / "other")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    vlm, proc = tiny_pair()

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(proc, "save_pretrained", broken)
    with pytest.raises(RuntimeError):
        save_pretrained(tmp_path / "ckpt", vlm, proc)
    assert os.listdir(tmp_path) == []


def test_a_model_with_lora_adapters_is_refused_not_saved_unloadable(tmp_path):
    """peft's wrapper renames every LM weight (base_model.model..., lora_A/B): such a checkpoint matched no
    config.json and failed only when loaded. (A stand-in for peft, which is optional.)"""
    vlm, _ = tiny_pair()

    class PeftModelForCausalLM(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.base_model = lm

    PeftModelForCausalLM.__module__ = "peft.peft_model"
    vlm.lm = PeftModelForCausalLM(vlm.lm)
    with pytest.raises(ValueError, match=r"the LM carries LoRA adapters: merge them first"):
        vlm.save_pretrained(tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_an_lm_config_that_records_a_dtype_still_builds_and_loads_in_float32(tmp_path):
    """A hub LM's config records its weights' dtype ("dtype": "bfloat16"); mmlm keeps that config. The LM
    was built in bfloat16 from it, so a float32 checkpoint loaded rounded, with other logits."""
    from _tiny import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_config(tok)
    cfg.text.hf_config["dtype"] = "bfloat16"
    torch.manual_seed(0)
    vlm = VLM(cfg).eval()
    assert {p.dtype for p in vlm.parameters()} == {torch.float32}
    proc = Processor.for_model(vlm, tok, max_length=128)
    save_pretrained(tmp_path / "m", vlm, proc)
    again, _ = load(tmp_path / "m", device="cpu", dtype="float32")
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    batch = proc(images=[image()], conversations=[[{"role": "user", "content": "<image>what color?"},
                                                   {"role": "assistant", "content": "red"}]])
    with torch.no_grad():
        assert torch.equal(vlm(**batch).logits, again(**batch).logits)


def test_written_files_get_the_usual_permissions_not_the_temporary_names_owner_only_ones(tmp_path):
    """Everything written through a temporary name (a checkpoint directory, JSON results, describe's
    rewritten output, plot's PNG) ends 0666/0777 less the umask, as plain open/mkdir would leave it:
    mkstemp/mkdtemp's 0600/0700 would hide a trained model from the rest of a shared machine."""
    import stat

    from mmlm.io import atomic_write_bytes, atomic_write_text

    old = os.umask(0o022)
    try:
        vlm, proc = tiny_pair()
        save_pretrained(tmp_path / "model", vlm, proc)
        atomic_write_text(tmp_path / "results.json", "{}")
        atomic_write_bytes(tmp_path / "out" / "curves.png", b"\x89PNG")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "model") == 0o755
    assert {mode(p) for p in (tmp_path / "model").iterdir()} == {0o644}
    assert mode(tmp_path / "results.json") == 0o644 and mode(tmp_path / "out" / "curves.png") == 0o644
