"""The VLM: shapes, loss, placeholder checks, parity with the bare LM, projectors, presets."""

import copy

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


def test_a_grid_pixel_shuffle_cannot_merge_fails_when_the_model_is_built():
    """Not at the first forward, after the processor was made with P // r^2 tokens per image."""
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"square patch grid whose side is divisible by pixel_shuffle_factor=3, "
                                         r"got 16 patches"):
        VLM(tiny_config(tok, projector="pixel_shuffle", factor=3))
    with pytest.raises(ValueError, match=r"factor=2, got 17 patches \(class/register tokens count"):
        VLM(tiny_config(tok, projector="pixel_shuffle").updated(vision={"drop_prefix_tokens": False}))


def test_processor_for_a_model_with_another_image_token_id_fails():
    from mmlm import Processor

    tok = tiny_tokenizer()
    vlm = VLM(tiny_config(tok).updated(image_token_id=5))
    with pytest.raises(ValueError, match=r"the model's image_token_id=5 is not the tokenizer's <image> id 2"):
        Processor.for_model(vlm, tok)


def test_a_preset_builds_without_an_image_token_id_and_runs_text_only():
    """``VLM.from_preset("tiny")`` as DESIGN.md shows it: built, text runs; images and a processor refuse
    the unset id (-1), and an id outside the vocabulary stays an error."""
    from mmlm import Processor

    vlm = VLM.from_preset("tiny")
    assert vlm.config.image_token_id == -1 and vlm.num_image_tokens > 0
    ids = torch.randint(0, 50, (1, 6))
    assert vlm(input_ids=ids).logits.shape[:2] == (1, 6)
    with pytest.raises(ValueError, match="no image_token_id"):
        vlm(input_ids=ids, pixel_values=torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_token_id=-1 is not the tokenizer's"):
        Processor.for_model(vlm, tiny_tokenizer())
    with pytest.raises(ValueError, match="outside the LM vocabulary"):
        VLM.from_preset("tiny", image_token_id=10**6)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "pixel_shuffle"])
def test_position_embedding_adds_one_learned_vector_per_image_token(projector):
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, projector=projector)
    torch.manual_seed(0)
    plain = VLM(cfg)
    placed = VLM(cfg.updated(projector={"position_embedding": True}))
    missing, unexpected = placed.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["projector.position_embedding"] and not unexpected
    pos = placed.projector.position_embedding
    assert pos.shape == (placed.num_image_tokens, placed.lm.config.hidden_size)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pos.copy_(torch.randn_like(pos))
    torch.testing.assert_close(placed.encode_images(x), plain.encode_images(x) + pos)  # (N, T, D): token t + pos[t]
    placed.encode_images(x).sum().backward()
    torch.testing.assert_close(pos.grad, torch.full_like(pos, 2.0))  # trained: each row gets both images' gradient
    assert plain.projector.position_embedding is None
    t = placed.num_image_tokens  # a 2x wider grid of patches than the model was built for
    with pytest.raises(ValueError, match=f"position embedding has {t} tokens but the image gives {4 * t}"):
        placed.projector(torch.randn(1, 4 * placed.vision.num_patches, 32))


def test_position_embedding_init_std_sets_the_scale_and_survives_a_save(tmp_path):
    tok = tiny_tokenizer()
    cfg = tiny_config(tok)
    torch.manual_seed(0)
    default = VLM(cfg.updated(projector={"position_embedding": True})).projector.position_embedding
    loud = VLM(cfg.updated(projector={"position_embedding": True, "position_embedding_std": 0.5}))
    pos = loud.projector.position_embedding
    assert pos.numel() >= 1000  # enough draws for the sample std to sit within 10% of the asked one
    assert abs(default.std().item() - 0.02) < 0.002 and abs(pos.std().item() - 0.5) < 0.05
    loud.save_pretrained(tmp_path)
    again = VLM.from_pretrained(tmp_path)
    assert again.config.projector.position_embedding_std == 0.5
    torch.testing.assert_close(again.projector.position_embedding, pos)  # the weights, not a fresh draw
    with pytest.raises(ValueError, match="position_embedding_std must be >= 0, got -0.1"):
        VLM(cfg.updated(projector={"position_embedding": True, "position_embedding_std": -0.1}))


def test_unknown_names_list_the_known_ones():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"unknown projector 'nope'; known: \['linear', 'mlp2x_gelu', 'pixel_shuffle'\]"):
        VLM(tiny_config(tok, projector="nope"))
    with pytest.raises(ValueError, match="unknown preset 'huge'; known:"):
        get_preset("huge")
    assert get_preset("llava-1.5-7b-like") == get_preset("llava-1.5-7b")  # DESIGN.md's name for it
    with pytest.raises(ValueError, match="unknown key"):
        tiny_config(tok).updated(vision={"widht": 3})


def test_bad_image_settings_fail_in_the_config_and_list_the_known_values():
    """They used to pass the config and the model build and fail later: a resize mode when the processor
    was made, an image_transform key as a bare TypeError, a 2-value mean or a zero std at normalisation."""
    from mmlm.config import ImageTransformConfig, VisionConfig

    with pytest.raises(ValueError, match=r"unknown vision resize_mode 'fit'; known: \['squash', 'crop', 'pad'\]"):
        get_preset("tiny").updated(vision={"resize_mode": "fit"})
    with pytest.raises(ValueError, match=r"image_transform: unknown key\(s\) \['meen'\]; known keys: \['crop_pct', "):
        get_preset("tiny").updated(vision={"image_transform": {"meen": [0.5, 0.5, 0.5]}})
    assert VisionConfig(image_transform={"mean": [0.4, 0.4, 0.4], "resize_kernel": "pil"}).resize_mode is None
    with pytest.raises(ValueError, match=r"3 each\), got mean=\[0.5, 0.5\]"):
        ImageTransformConfig(size=8, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"std must be > 0 per channel, got \[0.0, 0.5, 0.5\]"):
        ImageTransformConfig(size=8, std=(0, 0.5, 0.5))


def test_an_lm_of_another_family_replaces_the_preset_s_architecture(tmp_path):
    """Overrides merge key by key, but not two architectures: the tiny preset's Llama keys (hidden_size=128,
    3 layers) used to reach a GPT-2 hf_config through transformers' attribute map."""
    tok = tiny_tokenizer()
    iid = tok.convert_tokens_to_ids("<image>")
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": len(tok), "n_positions": 256}
    vlm = VLM.from_preset("tiny", image_token_id=iid, text={"hf_config": gpt2})
    assert vlm.config.text.hf_config == gpt2
    assert (vlm.lm.config.n_embd, vlm.lm.config.n_layer, vlm.lm.config.n_positions) == (64, 2, 256)
    # the same family still merges (the README's vocabulary override)
    assert get_preset("tiny").updated(text={"hf_config": {"model_type": "llama", "vocab_size": 300}}).text.hf_config[
        "hidden_size"] == 128
    # another LM by name: its architecture comes from it, not from the preset's hf_config
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=len(tok))).save_pretrained(tmp_path)
    cfg = get_preset("small").updated(text={"name": str(tmp_path)})
    assert cfg.text.hf_config == {} and cfg.text.name == str(tmp_path)
    vlm = VLM(cfg.updated(image_token_id=iid, vision={"name": None, "width": 32, "depth": 2, "num_heads": 2,
                                                      "image_size": 32}))
    assert vlm.lm.config.model_type == "qwen2" and vlm.config.text.hf_config["hidden_size"] == 64
    assert get_preset("small").updated(text={"name": None}).text.hf_config["model_type"] == "llama"


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


# ------------------------------------------------------------------ uint8 pixel values
def _noise(seed: int, size=(40, 30)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _float_and_uint8_batches(proc):
    images = [[_noise(0)], [_noise(1), _noise(2, (20, 50))]]
    convs = [_conv(1), _conv(2, "blue")]
    batch = proc(images=images, conversations=convs)  # float pixel values, normalised by the processor
    u8 = torch.cat([proc.encode(c, ims, pixel_dtype="uint8")["pixel_values"] for c, ims in zip(convs, images)])
    assert batch["pixel_values"].dtype == torch.float32 and u8.dtype == torch.uint8
    return batch, {**batch, "pixel_values": u8}


def test_uint8_pixels_give_the_float_path_s_loss_and_logits(pair):
    """The model normalises uint8 pixel values on its device: same loss and logits as the processor's
    float pixel values (in fact bit-identical: one formula, float32, true divisions)."""
    vlm, proc = pair
    f, u = _float_and_uint8_batches(proc)
    with torch.no_grad():
        out_f, out_u = vlm(**f), vlm(**u)
        torch.testing.assert_close(out_u.logits, out_f.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_u.loss, out_f.loss, rtol=0, atol=1e-6)
        assert torch.equal(vlm.encode_images(u["pixel_values"]), vlm.encode_images(f["pixel_values"]))
        # the training path (labelled positions only) and bf16 autocast see the same normalised input
        lf, lu = vlm(**f, return_logits=False).loss, vlm(**u, return_logits=False).loss
        torch.testing.assert_close(lu, lf, rtol=0, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            af, au = vlm(**f).loss, vlm(**u).loss
        assert torch.equal(af, au)
        # a float64 model: float pixels are cast, uint8 ones normalised in float32 then cast: the same
        vlm64 = copy.deepcopy(vlm).double()
        torch.testing.assert_close(vlm64(**u).logits, vlm64(**f).logits, rtol=0, atol=0)


def test_pixel_dtypes_other_than_uint8_or_float_are_refused(pair):
    vlm, proc = pair
    enc = proc.encode(_conv(1), [image()], pixel_dtype="uint8")
    ids = enc["input_ids"][None]
    with torch.no_grad():
        vlm(ids, enc["pixel_values"].double() / 255)  # any floating dtype: taken as normalised already
        for bad in (torch.int32, torch.int64, torch.bool):
            with pytest.raises(ValueError, match=r"pixel_values must be uint8 RGB \(normalised by the model\) or "
                                                 rf"floating point \(normalised already\), got {bad}$"):
                vlm(ids, enc["pixel_values"].to(bad))


def test_an_attention_kernel_the_lm_lacks_names_mmlm_s_option():
    """transformers' own message (e.g. Gemma-2 without SDPA in 5.x, or an unknown name) plus the option
    that sets it, in one ValueError."""
    cfg = tiny_config(tiny_tokenizer())
    cfg.text.attn_implementation = "flashy"
    with pytest.raises(ValueError, match=r"^text\.attn_implementation='flashy': .*flashy.*"
                                         r"--model\.model_overrides\.text\.attn_implementation eager\)$"):
        VLM(cfg)


def test_pixel_values_of_another_size_are_a_clear_error():
    """timm answered with an AssertionError about its own input size; an (N, H, W, 3) uint8 batch with a
    broadcasting error in the normalisation."""
    vlm, proc = tiny_pair()
    size = vlm.image_transform().size
    for bad in (torch.zeros(1, 3, size + 8, size), torch.zeros(1, size, size, 3, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=rf"^pixel_values must be \(N, 3, {size}, {size}\) .* got"):
            vlm.vision_features(bad)
