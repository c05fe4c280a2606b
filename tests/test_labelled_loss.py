"""The labelled-positions loss (``VLM.forward(..., return_logits=False)``): the same loss and the same
gradients as the full-logit path (padded and packed batches, llama and qwen2 LMs, no labels at all),
a fall-back for LMs outside the allowlist or wrapped, and the training module using it."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from _tiny import image, tiny_pair
from _training_kit import tiny_model_args
from mmlm.data.collate import PackCollate, PadCollate, model_inputs
from mmlm.modeling.fusion import labelled_cross_entropy, labelled_positions, shifted_cross_entropy
from mmlm.modeling.vlm import LABELLED_LOSS_MODEL_TYPES, labelled_loss_parts
from mmlm.training.module import VLMModule

COLORS = ["red", "blue", "green", "white", "cyan", "orange"]


def _samples(proc, n: int = 6) -> list[dict]:
    """Varied samples: one image, two images, text only; captions of varied lengths."""
    out = []
    for i in range(n):
        caption = "a small red star" + " on the left and a large blue square" * (i % 3)
        if i % 4 == 3:
            conv = [{"role": "user", "content": "how many shapes are there?"},
                    {"role": "assistant", "content": caption}]
            out.append(proc.encode(conv, []))
        elif i % 3 == 1:
            conv = [{"role": "user", "content": "<image> and <image>: what color is the star?"},
                    {"role": "assistant", "content": caption}]
            out.append(proc.encode(conv, [image(COLORS[i]), image(COLORS[i - 1])]))
        else:
            out.append(proc.encode(proc.caption_conversation(caption), [image(COLORS[i], (30 + i, 20))]))
    return out


def _vary_labels(batch: dict) -> dict:
    """Row 1 keeps every other label, row 2 keeps a single one, the rest stay as collated."""
    labels = batch["labels"].clone()
    kept = (labels[1] != -100).nonzero().flatten()
    labels[1, kept[::2]] = -100
    kept = (labels[2] != -100).nonzero().flatten()
    labels[2, kept[1:]] = -100
    return {**batch, "labels": labels}


def _loss_and_grads(vlm, inputs: dict, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    vlm.zero_grad(set_to_none=True)
    out = vlm(**inputs, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same_loss_and_grads(vlm, inputs: dict) -> None:
    full, want = _loss_and_grads(vlm, inputs)
    fast, got = _loss_and_grads(vlm, inputs, return_logits=False)
    assert full.logits is not None and fast.logits is None and fast.past_key_values is None
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-6, rtol=0, equal_nan=True)
    assert got.keys() == want.keys() and len(want) == len(list(vlm.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, equal_nan=True, msg=name)


def _head_inputs(vlm) -> list[tuple[int, ...]]:
    """Records the input shapes of the LM's output layer (2-D on the labelled path, 3-D on the full one)."""
    shapes: list[tuple[int, ...]] = []
    vlm.lm.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


# ---------------------------------------------------------------------------------- the pure helpers
def test_labelled_positions_are_the_shifted_labels():
    labels = torch.tensor([[-100, 5, 6, -100, 7], [-100, -100, -100, -100, 3]])
    assert labelled_positions(labels).tolist() == [[True, True, False, True, False], [False, False, False, True, False]]


def test_labelled_cross_entropy_equals_shifted_cross_entropy():
    torch.manual_seed(0)
    head = nn.Linear(8, 11, bias=True).to(torch.bfloat16)
    hidden = torch.randn(3, 6, 8, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (3, 6))
    labels[torch.rand(3, 6) < 0.5] = -100
    labels[2] = -100  # a row without labels
    want = shifted_cross_entropy(head(hidden), labels)
    got = labelled_cross_entropy(hidden, labels, head)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_allowlisted_types_qualify_others_and_wrappers_do_not():
    for model_type in sorted(LABELLED_LOSS_MODEL_TYPES):  # every allowlisted type builds a stock class that qualifies
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        lm = AutoModelForCausalLM.from_config(cfg).eval()
        parts = labelled_loss_parts(lm)
        assert parts is not None, model_type
        decoder, head = parts
        embeds = torch.randn(2, 5, 32)
        with torch.no_grad():
            torch.testing.assert_close(head(decoder(inputs_embeds=embeds).last_hidden_state),
                                       lm(inputs_embeds=embeds).logits, atol=0, rtol=0, msg=model_type)
    for model_type in ("gemma2", "cohere", "granite", "gpt2"):  # logit softcapping / scaling, or not allowlisted
        assert model_type not in LABELLED_LOSS_MODEL_TYPES
    vlm, _ = tiny_pair()
    assert labelled_loss_parts(vlm.lm) is not None

    class Wrapper(nn.Module):  # like peft's PeftModel around the LM
        def __init__(self, lm):
            super().__init__()
            self.base_model = lm

        def forward(self, **kw):
            return self.base_model(**kw)

    class Subclass(LlamaForCausalLM):  # a forward defined outside transformers may differ
        pass

    assert labelled_loss_parts(Wrapper(vlm.lm)) is None
    assert labelled_loss_parts(Subclass(vlm.lm.config)) is None


# ---------------------------------------------------------------------------------- VLM.forward
@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_padded_batch_same_loss_and_grads(lm):
    vlm, proc = tiny_pair(lm=lm)
    assert labelled_loss_parts(vlm.lm) is not None
    batch = _vary_labels(PadCollate(proc)(_samples(proc)))
    assert batch["position_ids"] is None and (batch["attention_mask"] == 0).any()  # right padded
    shapes = _head_inputs(vlm)
    _assert_same_loss_and_grads(vlm, model_inputs(batch))
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert shapes == [(*batch["input_ids"].shape, 64), (n, 64)]  # the fast path applied the head to N rows


@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_packed_batch_same_loss_and_grads(lm):
    vlm, proc = tiny_pair(lm=lm)
    batch = PackCollate(proc, max_length=128)(_samples(proc))
    assert batch["attention_mask"] is None and batch["input_ids"].shape[0] < batch["num_samples"]  # packed rows
    shapes = _head_inputs(vlm)
    _assert_same_loss_and_grads(vlm, model_inputs(batch))
    assert len(shapes[1]) == 2


def test_a_lora_lm_takes_the_labelled_path_with_the_same_loss_and_grads():
    """LoRA training built full-vocabulary logits at every position (the PeftModel wrapper was refused): more
    memory than full fine-tuning on a real vocabulary. Adapters with random weights, the head adapted too."""
    peft = pytest.importorskip("peft")
    vlm, proc = tiny_pair()
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    vlm.lm = peft.get_peft_model(vlm.lm, config)
    assert labelled_loss_parts(vlm.lm) is not None
    batch = _vary_labels(PadCollate(proc)(_samples(proc)))
    shapes = _head_inputs(vlm)
    full, want = _loss_and_grads(vlm, model_inputs(batch))
    fast, got = _loss_and_grads(vlm, model_inputs(batch), return_logits=False)
    assert fast.logits is None and len(shapes[1]) == 2  # the head saw the labelled rows only
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-6, rtol=0)
    assert got.keys() == want.keys() and any("lora_" in n for n in want)  # the adapters train (the base is frozen)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    prompt = peft.get_peft_model(tiny_pair()[0].lm, peft.PromptTuningConfig(num_virtual_tokens=2,
                                                                            task_type="CAUSAL_LM"))
    assert labelled_loss_parts(prompt) is None  # prompt learning changes the inputs: the full path


def test_no_labels_matches_the_full_path():
    vlm, proc = tiny_pair()
    batch = PadCollate(proc)(_samples(proc, 3))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    _assert_same_loss_and_grads(vlm, model_inputs(batch))
    loss = vlm(**model_inputs(batch), return_logits=False).loss.detach()
    assert math.isnan(float(loss))  # the mean over no token, as on the full path


def test_other_model_types_fall_back_to_full_logits():
    vlm, proc = tiny_pair(lm="gpt2")
    assert labelled_loss_parts(vlm.lm) is None
    batch = _vary_labels(PadCollate(proc)(_samples(proc)))
    shapes = _head_inputs(vlm)
    _assert_same_loss_and_grads(vlm, model_inputs(batch))
    assert all(len(s) == 3 for s in shapes)  # full logits both times (dropped the second time)


def test_without_labels_or_with_cache_the_full_path_runs():
    vlm, proc = tiny_pair()
    batch = PadCollate(proc)(_samples(proc, 2))
    inputs = {**model_inputs(batch), "labels": None}
    with torch.no_grad():
        out = vlm(**inputs, return_logits=False)
        assert out.loss is None and out.logits is None
        out = vlm(**model_inputs(batch), use_cache=True, return_logits=False)
        assert out.logits is None and out.past_key_values is not None


# ---------------------------------------------------------------------------------- the training module
def test_training_and_validation_steps_use_the_labelled_path(tmp_path):
    vlm, proc = tiny_pair()
    module = VLMModule(**tiny_model_args())
    module._install(vlm.train(), proc, {})
    batch = PadCollate(proc)(_samples(proc, 4))
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    shapes = _head_inputs(vlm)
    seen: list = []
    vlm.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs.get("return_logits"), out.logits)),
                              with_kwargs=True)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert len(seen) == 2 and all(flag is False and logits is None for flag, logits in seen)  # train + val step
    assert len(shapes) == 2 and all(len(s) == 2 for s in shapes)  # the head saw labelled rows only
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
