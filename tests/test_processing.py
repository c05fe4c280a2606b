"""The processor: label masks, image expansion, truncation, padding, system prompt, transforms."""

import pytest
import torch
from PIL import Image

from _tiny import image, pair, tiny_pair  # noqa: F401
from mmlm.config import ImageTransformConfig
from mmlm.processing import ImageSpanTruncated, ImageTransform


def _labelled_text(proc, enc):
    return proc.tokenizer.decode(enc["labels"][enc["labels"] != -100])


def test_labels_cover_exactly_the_assistant_tokens_single_turn(pair):
    _, proc = pair
    enc = proc.encode([{"from": "human", "value": "<image>\nwhat color is the star?"},
                       {"from": "gpt", "value": "red"}], [image()])
    assert _labelled_text(proc, enc) == "red<|end|>"
    # the labelled positions are exactly the ids of the answer and the end-of-turn token
    answer_ids = proc.tokenizer("red<|end|>", add_special_tokens=False)["input_ids"]
    labelled = enc["labels"][enc["labels"] != -100].tolist()
    assert labelled == answer_ids
    pos = (enc["labels"] != -100).nonzero().flatten().tolist()
    assert enc["input_ids"][pos].tolist() == answer_ids


def test_labels_multi_turn_with_system_prompt(pair):
    vlm, proc = pair
    conv = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<image>\nwhat color is the star?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "how many shapes are there?"},
        {"role": "assistant", "content": "two"},
    ]
    enc = proc.encode(conv, [image()])
    labelled = enc["labels"] != -100
    # two separate labelled runs: "red<|end|>" and "two<|end|>"
    runs, prev = [], False
    for i, flag in enumerate(labelled.tolist()):
        if flag and not prev:
            runs.append([])
        if flag:
            runs[-1].append(int(enc["input_ids"][i]))
        prev = flag
    assert [proc.tokenizer.decode(r) for r in runs] == ["red<|end|>", "two<|end|>"]
    text = proc.tokenizer.decode(enc["input_ids"][~labelled])
    assert "You are a helpful assistant." in text and "how many shapes" in text


def test_caption_is_the_answer_to_the_caption_prompt(pair):
    _, proc = pair
    enc = proc.encode(proc.caption_conversation("a small red star"), [image()])
    assert _labelled_text(proc, enc) == "a small red star<|end|>"
    assert proc.config.caption_prompt in proc.tokenizer.decode(enc["input_ids"])


def test_image_placement_rules(pair):
    vlm, proc = pair
    enc = proc.encode([{"role": "user", "content": "what color?"}, {"role": "assistant", "content": "red"}],
                      [image(), image()])  # no placeholder: both images go before the first user turn
    assert int((enc["input_ids"] == proc.image_token_id).sum()) == 2 * vlm.num_image_tokens
    assert enc["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"sample 'k1': 2 <image> placeholder\(s\) in the text but 1 image"):
        proc.encode([{"role": "user", "content": "<image><image>hi"}], [image()], key="k1")


def test_system_prompt_from_config():
    vlm, proc = tiny_pair()
    proc.config.system_prompt = "You are a helpful assistant."
    enc = proc.encode([{"role": "user", "content": "hi"}], [], add_generation_prompt=True)
    assert proc.tokenizer.decode(enc["input_ids"]).startswith("<|system|>You are a helpful assistant.<|end|>")
    assert (enc["labels"] == -100).all()


def test_truncation_never_cuts_an_image_span():
    vlm, proc = tiny_pair()
    conv = [{"role": "user", "content": "<image>what color is the star?"}, {"role": "assistant", "content": "red " * 40}]
    proc.config.max_length = 30  # the image span (16 tokens) fits, the long answer is cut
    enc = proc.encode(conv, [image()])
    assert enc["input_ids"].numel() == 30
    assert int((enc["input_ids"] == proc.image_token_id).sum()) == 16
    proc.config.max_length = 10  # the cut would fall inside the image span
    with pytest.raises(ImageSpanTruncated, match="sample 's7'.*inside an image span"):
        proc.encode(conv, [image()], key="s7")
    proc.config.on_overflow = "drop"
    assert proc.encode(conv, [image()]) is None


def test_left_padding_for_generation(pair):
    _, proc = pair
    batch = proc(images=[image(), image()], text=["what color?", "how many shapes are there in the picture?"])
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]  # left padded
    assert (batch["input_ids"][mask == 0] == proc.tokenizer.pad_token_id).all()
    last = proc.tokenizer.convert_ids_to_tokens(int(batch["input_ids"][0, -1]))
    assert last == "<|assistant|>"  # the generation prompt ends the sequence


@pytest.mark.parametrize("mode", ["squash", "crop", "pad"])
def test_image_transform_modes(mode):
    cfg = ImageTransformConfig(size=16, resize_mode=mode, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    x = ImageTransform(cfg)(im)
    assert x.shape == (3, 16, 16)
    if mode == "pad":  # top and bottom rows are the mean colour -> 0 after normalisation
        assert torch.allclose(x[:, 0], torch.zeros(3, 16), atol=1e-2)
        assert torch.allclose(x[0, 8], torch.ones(16), atol=1e-2)
    else:
        assert torch.allclose(x[0], torch.ones(16, 16), atol=1e-2)


def test_image_transform_matches_timm_for_crop():
    """Our crop transform equals timm's eval transform (resize shorter side, centre crop)."""
    import numpy as np
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ours = ImageTransform(ImageTransformConfig(size=32, resize_mode="crop", crop_pct=0.875,
                                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))(im)
    timm_tf = create_transform(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bicubic",
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    torch.testing.assert_close(ours, timm_tf(im), atol=1e-5, rtol=0)
