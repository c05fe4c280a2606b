"""The VLM: shapes, loss, placeholder checks, parity with the bare LM, projectors, presets."""

import pytest
import torch

from _tiny import image, pair, tiny_config, tiny_pair, tiny_tokenizer  # noqa: F401
from mmlm import VLM
from mmlm.modeling.fusion import check_image_tokens
from mmlm.modeling.projector import pixel_shuffle
from mmlm.presets import PRESETS, get_preset


def _conv(n_images: int, answer: str = "red"):
    return [{"role": "user", "content": "<image>" * n_images + "what color is the star?"},
            {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_forward_shapes_and_loss(pair, n_images):
    vlm, proc = pair
    batch = proc(images=[[image()] * n_images, [image("blue")] * n_images],
                 conversations=[_conv(n_images), _conv(n_images, "blue")])
    out = vlm(**batch)
    B, L = batch["input_ids"].shape
    assert out.logits.shape == (B, L, vlm.lm.config.vocab_size)
    assert (batch["input_ids"] == vlm.config.image_token_id).sum() == 2 * n_images * vlm.num_image_tokens
    assert torch.isfinite(out.loss) and out.loss > 0
    # the loss is the shifted CE over labels != -100
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, ref)


def test_mismatch_names_the_sample(pair):
    vlm, proc = pair
    batch = proc(images=[[image()], [image()]], conversations=[_conv(1), _conv(1)])
    ids = batch["input_ids"].clone()
    ids[1, ids[1] == vlm.config.image_token_id] = 7  # sample 1 loses its placeholders
    with pytest.raises(ValueError, match=r"sample 1: 0 image placeholder tokens but 1 image\(s\)"):
        vlm(ids, batch["pixel_values"], batch["attention_mask"], num_images=batch["num_images"])
    with pytest.raises(ValueError, match=r"per sample: \[16, 0\]\) but 2 image\(s\)"):
        check_image_tokens(ids, vlm.config.image_token_id, vlm.num_image_tokens, 2)
    with pytest.raises(ValueError, match="image placeholder tokens"):  # features without placeholders
        vlm(batch["input_ids"], batch["pixel_values"][:1], batch["attention_mask"])


@pytest.mark.parametrize("lm", ["llama", "gpt2", "qwen2"])
def test_text_only_logits_equal_bare_lm(lm):
    vlm, proc = tiny_pair(lm=lm)
    batch = proc(text=["what color is the star?", "how many shapes?"])
    ours = vlm(batch["input_ids"], attention_mask=batch["attention_mask"],
               position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    bare = vlm.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], bare[real], rtol=0, atol=0)


def test_pixel_shuffle_reduces_tokens_and_processor_matches():
    vlm, proc = tiny_pair(projector="pixel_shuffle", factor=2)
    assert vlm.vision.num_patches == 16 and vlm.num_image_tokens == 4
    enc = proc.encode(_conv(1), [image()])
    assert int((enc["input_ids"] == vlm.config.image_token_id).sum()) == 4
    out = vlm(enc["input_ids"][None], enc["pixel_values"], labels=enc["labels"][None])
    assert torch.isfinite(out.loss)
    x = torch.arange(2 * 16 * 3, dtype=torch.float).reshape(2, 16, 3)
    y = pixel_shuffle(x, 2)
    assert y.shape == (2, 4, 12)
    # the top-left output token holds patches (0,0), (0,1), (1,0), (1,1) of the 4x4 grid
    grid = x.reshape(2, 4, 4, 3)
    torch.testing.assert_close(y[:, 0], torch.cat([grid[:, 0, 0], grid[:, 0, 1], grid[:, 1, 0], grid[:, 1, 1]], -1))


def test_unknown_names_list_the_known_ones():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"unknown projector 'nope'; known: \['linear', 'mlp2x_gelu', 'pixel_shuffle'\]"):
        VLM(tiny_config(tok, projector="nope"))
    with pytest.raises(ValueError, match="unknown preset 'huge'; known:"):
        get_preset("huge")
    with pytest.raises(ValueError, match="unknown key"):
        tiny_config(tok).updated(vision={"widht": 3})


def test_feature_layer_and_prefix_tokens():
    tok = tiny_tokenizer()
    cfg = tiny_config(tok).updated(vision={"depth": 3, "feature_layer": -2, "drop_prefix_tokens": False})
    vlm = VLM(cfg)
    assert len(vlm.vision.vit.blocks) == 2  # the last block is pruned: never used
    assert vlm.num_image_tokens == 16 + 1  # patches + class token
    with pytest.raises(ValueError, match="feature_layer=-5 is outside a 3-block encoder"):
        VLM(tiny_config(tok).updated(vision={"depth": 3, "feature_layer": -5}))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = get_preset(name).updated(image_token_id=3)
    with torch.device("meta"):  # architecture and shapes, no memory, nothing downloaded
        vlm = VLM(cfg)
    assert vlm.num_image_tokens > 0
    params = vlm.num_parameters()
    expected = {"tiny": (1e6, 2e7), "small": (1.3e8, 2.0e8), "base": (5.5e8, 7.5e8), "llava-1.5-7b": (6.8e9, 7.4e9)}
    lo, hi = expected[name]
    assert lo < params < hi, params


def test_tiny_preset_runs_on_cpu():
    tok = tiny_tokenizer()
    vlm = VLM.from_preset("tiny", image_token_id=tok.convert_tokens_to_ids("<image>"),
                          text={"hf_config": {"vocab_size": len(tok)}})
    side = vlm.config.vision.image_size
    x = torch.randn(2, 3, side, side)
    assert vlm.num_image_tokens == 9  # one token per cell of the synthetic scenes' 3x3 layout
    assert vlm.encode_images(x).shape == (2, vlm.num_image_tokens, vlm.lm.config.hidden_size)
