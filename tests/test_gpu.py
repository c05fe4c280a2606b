"""The device-side paths, on a GPU: packed attention isolation with each attention kernel, uint8
pixels normalised on the device, compiled (CUDA-graph) decoding, and a few bf16 training steps
through Lightning with the packed stream.

Marked ``gpu`` (deselected by default): ``pytest -m gpu tests/test_gpu.py`` on a machine with CUDA
(``bash benchmarks/gpu.sh tests`` runs them on a lent GPU). ``MMLM_TEST_DEVICE=cpu`` runs the same
tests on the CPU (how they are checked where no GPU is lent).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from _tiny import image, tiny_pair
from _training_kit import shards, tiny_model_args
from mmlm.data.collate import PackCollate, PadCollate, model_inputs
from mmlm.generation import generate

DEVICE = os.environ.get("MMLM_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

COLORS = ["red", "blue", "green", "white", "cyan", "orange"]


@pytest.fixture(autouse=True)
def exact_matmuls():
    """Full float32 matmuls and convolutions (no TF32), so that kernels can be compared closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _samples(proc, n: int = 6) -> list[dict]:
    out = []
    for i in range(n):
        caption = "a small red star" + " on the left and a large blue square" * (i % 3)
        if i % 3 == 2:  # two images in one sample
            conv = [{"role": "user", "content": "<image> and <image>: what color is the star?"},
                    {"role": "assistant", "content": caption}]
            out.append(proc.encode(conv, [image(COLORS[i % 6]), image(COLORS[(i + 1) % 6])], pixel_dtype="uint8"))
        else:
            out.append(proc.encode(proc.caption_conversation(caption), [image(COLORS[i % 6], (30 + i, 20))],
                                   pixel_dtype="uint8"))
    return out


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L, V), (B, L) -> (B, L - 1) next-token losses (0 where unlabelled)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")


def _to(batch: dict) -> dict:
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_samples_stay_apart_with_each_attention_kernel(attn):
    """Per-sample losses of a packed batch equal those of each sample alone (padding-free), on the
    device, with the attention implementation the LM runs (flex: a block mask of the samples)."""
    vlm, proc = tiny_pair()
    vlm = vlm.to(DEVICE)
    samples = _samples(proc)
    pack = PackCollate(proc, max_length=128)
    batch = pack(samples)
    assert batch["input_ids"].shape[0] < len(samples)  # several samples share rows
    rows = pack.plan([s["input_ids"].numel() for s in samples], len(samples))
    vlm.lm.set_attn_implementation(attn)
    assert vlm.lm.config._attn_implementation == attn
    with torch.no_grad():
        packed = _token_losses(vlm(**model_inputs(_to(batch))).logits, batch["labels"].to(DEVICE))
        vlm.lm.set_attn_implementation("sdpa")  # the reference: each sample alone, no padding
        for r, row in enumerate(rows):
            off = 0
            for j in row:
                single = _to(PadCollate(proc)([samples[j]]))
                n = single["input_ids"].shape[1]
                want = _token_losses(vlm(**model_inputs(single)).logits, single["labels"])[0]
                mask = single["labels"][0, 1:] != -100
                assert mask.any()
                torch.testing.assert_close(packed[r, off:off + n - 1][mask], want[mask], atol=1e-4, rtol=1e-4)
                off += n


def test_uint8_pixels_normalised_on_the_device_equal_the_processor_s_floats():
    vlm, proc = tiny_pair()
    vlm = vlm.to(DEVICE)
    conv = proc.caption_conversation("a small red star")
    imgs = [image("red", (50, 31))]
    as_uint8 = PadCollate(proc)([proc.encode(conv, imgs, pixel_dtype="uint8")])
    as_float = PadCollate(proc)([proc.encode(conv, imgs)])
    assert as_uint8["pixel_values"].dtype == torch.uint8
    with torch.no_grad():
        a = vlm(**model_inputs(_to(as_uint8)))
        b = vlm(**model_inputs(_to(as_float)))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss)


def test_compiled_decode_step_equals_eager_on_the_device():
    """Greedy tokens of the compiled decode step (CUDA graphs on a GPU) equal eager decoding, for a
    left-padded batch and for one prompt; the second call reuses the compiled step."""
    vlm, proc = tiny_pair()
    vlm = vlm.to(DEVICE)
    images = [image(c) for c in COLORS[:3]]
    prompts = ["what color is the star?", None, "how many shapes are there? tell me"]
    for imgs, ps in ((images, prompts), (images[:1], prompts[:1])):
        b = _to(proc.prompt_inputs(imgs, ps))
        args = (vlm, b["input_ids"], b["pixel_values"], b["attention_mask"])
        kw = dict(num_images=b["num_images"], max_new_tokens=10, eos_token_id=None,
                  pad_token_id=proc.tokenizer.pad_token_id)
        eager = generate(*args, **kw)
        compiled = generate(*args, compile=True, **kw)
        again = generate(*args, compile=True, **kw)
        assert eager.shape == (len(imgs), 10)
        assert torch.equal(eager, compiled) and torch.equal(compiled, again)


def test_bf16_packed_training_steps_through_lightning(tmp_path):
    """A few bf16-mixed steps of ``Trainer.fit`` on the packed, uint8 stream with loader workers
    (pinned memory on a GPU): finite losses, the weights move, the loader position advances."""
    import lightning.pytorch as pl

    from mmlm.data import VLMDataModule
    from mmlm.training.callbacks import TrainingMonitor
    from mmlm.training.module import VLMModule

    module = VLMModule(**tiny_model_args())
    dm = VLMDataModule(train=str(shards() / "train"), batch_size=2, num_workers=1, packing=True, max_length=160,
                       shuffle_buffer=16, min_samples=1000)
    losses, start = [], {}

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            start.update({k: v.detach().clone().cpu() for k, v in pl_module.vlm.state_dict().items()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    trainer = pl.Trainer(max_steps=4, accelerator="gpu" if DEVICE == "cuda" else DEVICE, devices=1,
                         precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=[TrainingMonitor(), Record()])
    trainer.fit(module, dm)
    assert trainer.global_step == 4 and len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert next(module.vlm.parameters()).device.type == DEVICE
    end = module.vlm.state_dict()
    assert any(not torch.equal(v.cpu(), start[k]) for k, v in end.items())
    assert dm.consumed_samples > 4 * 2  # 4 batches of 2 packed rows, each row several samples
