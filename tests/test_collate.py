"""Collation: the batch contract of PadCollate / PackCollate, packing plans, and packing keeping
samples apart (per-sample losses of the tiny model are the same packed and unpadded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _tiny import image, tiny_pair
from mmlm.data.collate import PackCollate, PadCollate, model_inputs

CONTRACT = {"input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "num_images", "num_samples",
            "real_tokens", "total_tokens", "loader_state", "skipped"}
COLORS = ["red", "blue", "green", "white", "cyan", "orange", "yellow", "purple"]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def _samples(proc, n: int = 8, with_text_only: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        caption = "a small red star" + " on the left and a large blue square" * (i % 4) * 2
        if with_text_only and i % 5 == 4:  # a text-only sample (no image)
            conv = [{"role": "user", "content": "how many shapes are there?"}, {"role": "assistant", "content": caption}]
            enc = proc.encode(conv, [])
        elif i % 3 == 2:  # two images
            conv = [{"role": "user", "content": "<image> and <image>: what color is the star?"},
                    {"role": "assistant", "content": caption}]
            enc = proc.encode(conv, [image(COLORS[i % 8]), image(COLORS[(i + 1) % 8])])
        else:
            enc = proc.encode(proc.caption_conversation(caption), [image(COLORS[i % 8], (30 + i, 20))])
        out.append(enc)
    return out


def test_pad_collate_contract(pair):
    _, proc = pair
    samples = _samples(proc, 5)
    b = PadCollate(proc)(samples)
    assert set(b) == CONTRACT
    lengths = [s["input_ids"].numel() for s in samples]
    assert b["input_ids"].shape == (5, max(lengths)) and b["input_ids"].dtype == torch.long
    assert b["labels"].dtype == torch.long and b["attention_mask"].dtype == torch.long
    assert b["position_ids"] is None
    assert b["num_images"].tolist() == [s["num_images"] for s in samples]
    assert b["pixel_values"].shape[0] == sum(s["num_images"] for s in samples)
    assert b["num_samples"] == 5 and b["real_tokens"] == sum(lengths) and b["total_tokens"] == 5 * max(lengths)
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_pack_collate_contract(pair):
    _, proc = pair
    samples = _samples(proc, 8)
    for i, s in enumerate(samples):  # tag each sample's images with its index to check their order
        if s["pixel_values"] is not None:
            s["pixel_values"] = torch.full_like(s["pixel_values"], float(i))
    pack = PackCollate(proc, max_length=128)
    b = pack(samples, batch_size=8)
    assert set(b) == CONTRACT
    assert b["attention_mask"] is None and b["position_ids"].shape == b["input_ids"].shape
    assert b["input_ids"].shape[1] <= 128 and b["num_samples"] == 8
    rows = pack.plan([s["input_ids"].numel() for s in samples], 8)
    assert sorted(j for r in rows for j in r) == list(range(8))
    expected_order = []
    for r, row in enumerate(rows):
        off = 0
        for j in row:
            n = samples[j]["input_ids"].numel()
            assert b["input_ids"][r, off:off + n].tolist() == samples[j]["input_ids"].tolist()
            assert b["position_ids"][r, off:off + n].tolist() == list(range(n))
            assert b["labels"][r, off] == -100
            assert b["labels"][r, off + 1:off + n].tolist() == samples[j]["labels"][1:].tolist()
            expected_order += [j] * samples[j]["num_images"]
            off += n
        assert (b["labels"][r, off:] == -100).all() and (b["input_ids"][r, off:] == proc.tokenizer.pad_token_id).all()
        assert b["num_images"][r] == sum(samples[j]["num_images"] for j in row)
    assert b["pixel_values"][:, 0, 0, 0].tolist() == [float(j) for j in expected_order]
    assert b["real_tokens"] == sum(s["input_ids"].numel() for s in samples)
    assert b["total_tokens"] == b["input_ids"].numel()


def test_packed_padding_positions_stay_below_the_longest_sample(pair):
    """A short row's padding tail counted on from 0 to the row's end: past a learned position table (GPT-2's,
    OPT's) when the packed rows are longer than it, an IndexError. It restarts before the longest sample's length."""
    _, proc = pair
    samples = _samples(proc, 8)
    longest = max(s["input_ids"].numel() for s in samples)
    b = PackCollate(proc, max_length=4 * longest).collate_rows([samples[:6], samples[6:7]])
    row = b["position_ids"][1]
    n = samples[6]["input_ids"].numel()
    assert row[:n].tolist() == list(range(n)) and int(row.max()) < longest
    tail = row[n:].tolist()  # the padding: segments restarting at 0, each counting up by one
    assert tail[0] == 0 and all(b == a + 1 or b == 0 for a, b in zip(tail, tail[1:])) and tail.count(0) >= 2


def test_collates_keep_uint8_pixels_and_refuse_a_dtype_mix(pair):
    _, proc = pair
    convs = [[{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": "red"}]] * 3
    u8 = [proc.encode(c, [image()], pixel_dtype="uint8") for c in convs]
    for collate in (PadCollate(proc), PackCollate(proc, max_length=128)):
        b = collate(u8)
        assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape == (3, 3, 32, 32)
        with pytest.raises(ValueError, match="cannot batch pixel values of different dtypes"):
            collate(u8[:2] + [proc.encode(convs[0], [image()])])


def test_length_window_is_the_least_padding_window_with_the_oldest():
    """Against brute force over every subset of the buffer that holds index 0 (random buffers)."""
    import itertools
    import random

    from mmlm.data.collate import PadCollate, length_window

    rng = random.Random(0)
    for _ in range(200):
        n, size = rng.randint(3, 8), rng.randint(2, 4)
        if n <= size:
            continue
        lengths = [rng.randint(5, 15) for _ in range(n)]
        got = length_window(lengths, size)
        assert 0 in got and got == sorted(got) and len(set(got)) == size
        pad = lambda idx: size * max(lengths[i] for i in idx) - sum(lengths[i] for i in idx)  # noqa: E731
        best = min(pad((0,) + c) for c in itertools.combinations(range(1, n), size - 1))
        assert pad(got) == best
    collate = PadCollate(processor=None, group_by_length=2)
    assert not collate.ready(3, 0, batch_size=2) and collate.ready(4, 0, batch_size=2)
    assert collate.plan([9, 1, 9, 2], 2) == [[0], [2]]
    assert collate.plan([9, 1], 2) == [[0], [1]]  # the drain at the end of a finite stream
    assert PadCollate(processor=None).plan([9, 1, 9], 2) == [[0], [1]]


def test_pack_plan_best_fit_oldest_first_bounded():
    pack = PackCollate(processor=None, max_length=10)
    rows = pack.plan([2, 9, 5, 5, 1, 8], batch_size=2)
    assert rows[0][0] == 0  # the oldest sample always goes
    assert len(rows) <= 2 and all(sum([2, 9, 5, 5, 1, 8][j] for j in r) <= 10 for r in rows)
    assert rows == [[0, 5], [1, 4]]  # best-fit decreasing: 9+1 and 2+8; the two 5s wait
    with pytest.raises(ValueError, match="max_length"):
        pack.plan([11], batch_size=1)
    assert pack.ready(3, 40, batch_size=2) and not pack.ready(3, 39, batch_size=2)
    assert PadCollate(None).ready(2, 0, batch_size=2) and PadCollate(None).plan([5, 5, 5], 2) == [[0], [1]]


def _per_sample_losses(logits, labels) -> list[torch.Tensor]:
    """Shifted cross-entropy per labelled token (B, L, V), (B, L) -> flat list of token losses."""
    lg, tg = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), reduction="none", ignore_index=-100)
    return loss.view(tg.shape)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_packing_keeps_samples_apart_losses_equal_unpacked(pair, attn):
    """With SDPA (a block-diagonal mask from the position ids) and FlexAttention (a block mask)."""
    vlm, proc = pair
    samples = _samples(proc, 6)
    pack = PackCollate(proc, max_length=128)
    b = pack(samples)
    assert b["num_samples"] == 6 and b["input_ids"].shape[0] < 6  # several samples share rows
    default = vlm.lm.config._attn_implementation  # the unpadded reference below keeps it
    vlm.lm.set_attn_implementation(attn)
    try:
        with torch.no_grad():
            packed = vlm(**model_inputs(b))
    finally:
        vlm.lm.set_attn_implementation(default)
    with torch.no_grad():
        token_losses = _per_sample_losses(packed.logits, b["labels"])
        rows = pack.plan([s["input_ids"].numel() for s in samples], 6)
        for r, row in enumerate(rows):
            off = 0
            for j in row:
                s = samples[j]
                n = s["input_ids"].numel()
                single = PadCollate(proc)([s])
                out = vlm(input_ids=single["input_ids"], attention_mask=single["attention_mask"],
                          pixel_values=single["pixel_values"], num_images=single["num_images"])
                want = _per_sample_losses(out.logits, single["labels"])[0]  # (n-1,)
                got = token_losses[r, off:off + n - 1]
                mask = single["labels"][0, 1:] != -100
                assert mask.any()
                torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got[mask].mean(), want[mask].mean(), atol=1e-5, rtol=1e-5)
                off += n
        # the boundary token (last of a sample -> first of the next) carries no loss
        assert packed.loss is not None and torch.isfinite(packed.loss)


def test_packing_reports_a_higher_real_token_fraction(pair):
    _, proc = pair
    samples = _samples(proc, 8, with_text_only=False)
    lengths = [s["input_ids"].numel() for s in samples]
    assert max(lengths) > 1.5 * min(lengths)  # a mixed-length set
    padded = PadCollate(proc)(samples)
    packed = PackCollate(proc, max_length=128)(samples)
    pad_frac = padded["real_tokens"] / padded["total_tokens"]
    pack_frac = packed["real_tokens"] / packed["total_tokens"]
    assert packed["real_tokens"] == padded["real_tokens"] == sum(lengths)
    assert pack_frac > pad_frac
