"""Generation: cache parity, batch parity, parity with transformers, sampling, beams, streaming."""

import pytest
import torch

from _tiny import image, pair, tiny_pair, tiny_tokenizer  # noqa: F401
from mmlm.api import TextStream, describe, generate_texts
from mmlm.generation import GenerationConfig, generate

PROMPTS = ["what color is the star?", "how many shapes are there?", "Describe the image briefly."]
IMAGES = [image("red"), image("blue", (20, 50)), image("green")]


def _gen(vlm, proc, images, prompts, **opts):
    batch = proc(images=images, text=prompts)
    return generate(vlm, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                    num_images=batch["num_images"], eos_token_id=proc.stop_token_ids,
                    pad_token_id=proc.tokenizer.pad_token_id, **opts)


def _strip(row, pad):
    row = row.tolist()
    while row and row[-1] == pad:
        row.pop()
    return row


def test_kv_cache_equals_no_cache(pair):
    vlm, proc = pair
    a = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=12)
    b = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=12, use_cache=False)
    assert torch.equal(a, b)


def test_decoding_warns_nothing_under_the_installed_transformers(pair, caplog):
    """The KV cache goes in under the installed transformers' name for it (``cache`` since 5.24, where
    ``past_key_values`` is a deprecated alias that warns: in ``mmlm chat`` the warning lands in the reply)."""
    import warnings

    vlm, proc = pair
    for cache in ("dynamic", "static"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            out = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=4, cache=cache)
        assert out.shape[0] == 3
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            assert vlm(**proc(images=IMAGES[:1], text=PROMPTS[:1]), use_cache=True).past_key_values is not None
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_left_padded_batch_equals_one_by_one(pair):
    vlm, proc = pair
    pad = proc.tokenizer.pad_token_id
    batched = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=12)
    for i in range(3):
        single = _gen(vlm, proc, IMAGES[i:i + 1], PROMPTS[i:i + 1], max_new_tokens=12)
        assert _strip(batched[i], pad) == _strip(single[0], pad)


def test_greedy_equals_transformers_generate(pair):
    vlm, proc = pair
    batch = proc(images=IMAGES, text=PROMPTS)
    embeds = vlm.embed(batch["input_ids"], batch["pixel_values"], batch["num_images"])
    ref = vlm.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], do_sample=False,
                          max_new_tokens=10, eos_token_id=proc.stop_token_ids,
                          pad_token_id=proc.tokenizer.pad_token_id)
    ours = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=10)
    pad = proc.tokenizer.pad_token_id
    for i in range(3):
        assert _strip(ours[i], pad) == _strip(ref[i], pad)


def test_beam_search_width_one_is_greedy_and_wider_beams_run(pair):
    vlm, proc = pair
    pad = proc.tokenizer.pad_token_id
    greedy = _gen(vlm, proc, IMAGES[:1], PROMPTS[:1], max_new_tokens=8)
    beam = _gen(vlm, proc, IMAGES[:1], PROMPTS[:1], max_new_tokens=8, num_beams=3)
    assert beam.shape[0] == 1 and beam.shape[1] <= 8
    assert len(_strip(greedy[0], pad)) >= 1


def test_beam_search_ignores_the_lm_s_own_generation_config():
    """A pretrained LM's generation_config.json (repetition penalty, n-gram blocking, its own eos) must not
    reach mmlm's beam search, as it never reaches greedy decoding: only GenerationConfig's options apply."""
    vlm, proc = tiny_pair()
    # a model that repeats one token: what n-gram blocking would change
    vlm.lm.lm_head.register_forward_hook(lambda mod, args, out: out.index_fill(-1, torch.tensor([45]), 100.0))
    clean = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=6, num_beams=2)
    gc = vlm.lm.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.eos_token_id = 5.0, 1, 45
    assert torch.equal(_gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=6, num_beams=2), clean)
    assert clean.shape == (3, 6) and (clean == 45).all()
    assert vlm.lm.generation_config is gc and gc.no_repeat_ngram_size == 1  # put back as it was
    # no eos given: run to max_new_tokens, as greedy decoding does (not the LM's eos)
    batch = proc(images=IMAGES[:1], text=PROMPTS[:1])
    assert generate(vlm, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                    num_images=batch["num_images"], max_new_tokens=4, num_beams=2).shape == (1, 4)


def test_sampling_is_seeded_and_top_p_small_is_greedy(pair):
    vlm, proc = pair
    a = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    b = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    assert torch.equal(a, b)
    nucleus = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=1)
    greedy = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=8)
    assert torch.equal(nucleus, greedy)


def test_a_seeded_sample_draws_from_its_own_stream_whatever_its_batch(pair):
    """Each row samples from a stream seeded by (seed, its key): a row's tokens are the same alone or in a
    batch, in any place in it; equal inputs under other keys draw otherwise (the streams are not shared)."""
    from mmlm.generation import sample_seed

    vlm, proc = pair
    prompt = [PROMPTS[2]]  # one prompt: rows without padding, so their logits match across batches
    opts = dict(max_new_tokens=8, do_sample=True, temperature=2.0, seed=7)
    both = _gen(vlm, proc, IMAGES[:2], prompt * 2, seed_keys=["a.png", "b.png"], **opts)
    swapped = _gen(vlm, proc, IMAGES[1::-1], prompt * 2, seed_keys=["b.png", "a.png"], **opts)
    alone = _gen(vlm, proc, IMAGES[1:2], prompt, seed_keys=["b.png"], **opts)
    pad = proc.tokenizer.pad_token_id
    assert _strip(both[1], pad) == _strip(alone[0], pad)
    assert _strip(both[0], pad) == _strip(swapped[1], pad) and _strip(both[1], pad) == _strip(swapped[0], pad)
    same = _gen(vlm, proc, IMAGES[:1] * 4, prompt * 4, seed_keys=["x", "x", "y", "z"], **opts)
    assert torch.equal(same[0], same[1]) and len({tuple(r) for r in same.tolist()}) == 3
    assert torch.equal(_gen(vlm, proc, IMAGES[:2], prompt * 2, **opts),  # default keys: the rows' indices
                       _gen(vlm, proc, IMAGES[:2], prompt * 2, seed_keys=[0, 1], **opts))
    assert sample_seed(7, "b.png") == sample_seed(7, "b.png") != sample_seed(8, "b.png")
    assert 0 <= sample_seed(2**40, "\udcff") < 2**63  # any key (a non-UTF-8 file name), a manual_seed value
    with pytest.raises(ValueError, match="1 seed_keys for 2 rows"):
        _gen(vlm, proc, IMAGES[:2], prompt * 2, seed_keys=["a"], **opts)


def test_text_stream_sends_each_complete_piece_once():
    """Token by token: a delta per whole word, a multi-byte character held back until its last byte,
    nothing after a stop token; rows independent."""
    from types import SimpleNamespace

    tok = tiny_tokenizer()
    proc = SimpleNamespace(tokenizer=tok, stop_token_ids=[tok.eos_token_id])
    got: list[tuple[int, str]] = []
    stream = TextStream(proc, 2, lambda row, delta: got.append((row, delta)))
    words, char = tok("a red star")["input_ids"], tok("日")["input_ids"]
    assert len(words) == 3 and len(char) == 3  # three word tokens; one character in three byte tokens
    for step in range(3):
        stream(torch.tensor([words[step], char[step]]))
    stream(torch.tensor([tok.eos_token_id, words[0]]))
    stream(torch.tensor([words[0], tok.eos_token_id]))  # row 0 has stopped: nothing more from it
    stream(torch.tensor([words[1], words[1]]))
    assert [d for r, d in got if r == 0] == ["a", " red", " star"]
    assert [d for r, d in got if r == 1] == ["日", "a"]


def test_stop_strings_streaming_and_describe(pair):
    vlm, proc = pair
    config = GenerationConfig(max_new_tokens=10)
    full = generate_texts(vlm, proc, IMAGES[:1], [None], config)[0]
    pieces = []
    streamed = generate_texts(vlm, proc, IMAGES[:1], [None], config, on_text=lambda row, d: pieces.append(d))[0]
    assert streamed == full and "".join(pieces).strip() == full
    if len(full) > 2:
        stop = full[1:3]
        cut = generate_texts(vlm, proc, IMAGES[:1], [None], config, stop_strings=[stop])[0]
        assert stop not in cut and full.startswith(cut)
    texts = describe(IMAGES, model=(vlm, proc), prompt=None, batch_size=2, max_new_tokens=10)
    assert texts[0] == full and len(texts) == 3


def test_a_stop_string_given_alone_is_one_string_not_its_characters(tmp_path):
    from _tiny import save_tiny_checkpoint

    from mmlm import load

    save_tiny_checkpoint(tmp_path / "m")
    vlm, proc = load(tmp_path / "m", device="cpu")
    config = GenerationConfig(max_new_tokens=8)
    full = generate_texts(vlm, proc, IMAGES[:1], [None], config)[0]
    assert full
    never = full[:1] + "@never@"  # split into characters, its first would cut the whole text
    assert generate_texts(vlm, proc, IMAGES[:1], [None], config, stop_strings=never)[0] == full
    assert describe(IMAGES[:1], model=(vlm, proc), stop_strings=never, max_new_tokens=8) == [full]


def test_describe_takes_one_image_of_any_kind_alone(pair, tmp_path):
    """A lone array is one image (not one per pixel row), a lone binary file one image (not one per line)."""
    import numpy as np

    vlm, proc = pair
    one = describe([IMAGES[0]], model=(vlm, proc), max_new_tokens=6)
    IMAGES[0].save(tmp_path / "a.png")
    with open(tmp_path / "a.png", "rb") as f:
        assert describe(f, model=(vlm, proc), max_new_tokens=6) == one
    assert describe(np.asarray(IMAGES[0]), model=(vlm, proc), max_new_tokens=6) == one


def test_a_pil_image_is_turned_upright_by_its_exif_orientation_as_a_file_is(tmp_path):
    from PIL import Image

    from mmlm.api import open_image

    im = Image.new("RGB", (40, 20), "red")
    im.paste(Image.new("RGB", (10, 20), "blue"), (0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "r.jpg") as opened:
        from_pil = open_image(opened)
    from_path = open_image(tmp_path / "r.jpg")
    assert from_pil.size == from_path.size == (20, 40)
    assert list(from_pil.getdata()) == list(from_path.getdata())


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.warns(UserWarning, match=r"^temperature=0.5, seed=3 apply to sampling only: set do_sample"):
        GenerationConfig(temperature=0.5, seed=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerationConfig()
        GenerationConfig(do_sample=True, temperature=0.5, seed=3)


def test_static_cache_equals_dynamic_cache(pair):
    vlm, proc = pair
    for images, prompts in ((IMAGES, PROMPTS), (IMAGES[:1], PROMPTS[:1])):  # left-padded batch, and none
        dynamic = _gen(vlm, proc, images, prompts, max_new_tokens=12)
        static = _gen(vlm, proc, images, prompts, max_new_tokens=12, cache="static")
        assert torch.equal(dynamic, static)
    with pytest.raises(ValueError, match="unknown cache"):
        GenerationConfig(cache="paged")


def test_compiled_decode_step_equals_eager(pair):
    vlm, proc = pair
    for images, prompts in ((IMAGES, PROMPTS), (IMAGES[:1], PROMPTS[:1])):  # left-padded batch, and none
        eager = _gen(vlm, proc, images, prompts, max_new_tokens=12)
        compiled = _gen(vlm, proc, images, prompts, max_new_tokens=12, compile=True)
        assert torch.equal(eager, compiled)
    sampled = {c: _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=8, do_sample=True, seed=5, compile=c)
               for c in (False, True)}
    assert torch.equal(sampled[False], sampled[True])
    assert vlm.lm._compiled_call is not None  # transformers' cached compiled call: later calls reuse it
    assert vlm.lm._last_compile_config.dynamic is False  # static shapes on a CPU (torch 2.11's inductor fails on symbolic)
    assert GenerationConfig(compile=True).cache == "static"
    with pytest.raises(ValueError, match="not beam search"):
        GenerationConfig(compile=True, num_beams=2)
    with pytest.raises(ValueError, match="needs the KV cache"):
        GenerationConfig(compile=True, use_cache=False)


def test_static_cache_length_is_bucketed_only_when_compiled():
    from mmlm.generation import CACHE_BUCKET, static_cache_length

    assert static_cache_length(30, 12, compiled=False) == 42
    assert static_cache_length(30, 12, compiled=True) == CACHE_BUCKET
    assert static_cache_length(CACHE_BUCKET, 1, compiled=True) == 2 * CACHE_BUCKET


def test_rows_that_end_early_are_padded_with_eos_by_default_and_vlm_generate_guards_its_inputs(pair):
    """No pad id given: a finished row is filled with its first eos id (dropped by decode), not id 0, which is a
    text token in GPT-2's and Qwen's vocabularies ("!"). ``vlm.generate`` refuses training inputs and warns
    when it has no eos to stop at."""
    vlm, proc = pair
    batch = proc(images=IMAGES[:2], text=PROMPTS[:2])
    inputs = dict(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                  attention_mask=batch["attention_mask"], num_images=batch["num_images"])
    first = generate(vlm, **inputs, max_new_tokens=1)[0, 0].item()  # row 0's first token ends it
    other = proc.stop_token_ids[0]
    out = generate(vlm, **inputs, eos_token_id=[first, other], max_new_tokens=5)
    assert out[0, 0] == first and (out[0, 1:] == min(first, other)).all()  # the first (lowest) eos id
    with pytest.warns(UserWarning, match="generate without eos_token_id"):
        vlm.generate(**batch, max_new_tokens=2)
    train = proc(images=IMAGES[:1], conversations=[[{"role": "user", "content": "<image>what?"},
                                                    {"role": "assistant", "content": "red"}]])
    with pytest.raises(ValueError, match=r"generate takes prompts \(processor\(text=\.\.\.\)\)"):
        vlm.generate(**train, eos_token_id=proc.stop_token_ids)


def test_generation_runs_in_eval_mode_and_restores_each_module_s_mode():
    """A model in train mode (fresh from from_preset, or a training loop) decodes without dropout, and the
    modes come back as they were (a frozen part kept in eval stays so)."""
    vlm, proc = tiny_pair()
    seen = []
    vlm.lm.register_forward_pre_hook(lambda mod, args: seen.append(any(m.training for m in mod.modules())))
    vlm.train()
    vlm.vision.eval()  # as training keeps a frozen tower
    _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=3)
    assert seen and not any(seen)  # no module of the LM was in train mode at any step
    assert vlm.lm.training and vlm.projector.training and not any(m.training for m in vlm.vision.modules())


def test_generation_builds_no_autograd_graph(pair):
    """generate runs under no_grad (a decorator put above another one once took it off: decoding built a graph,
    22% slower and holding every step's activations)."""
    vlm, proc = pair
    seen = []
    vlm.lm.register_forward_hook(lambda mod, args, out: seen.append(torch.is_grad_enabled()))
    _gen(vlm, proc, IMAGES[:1], PROMPTS[:1], max_new_tokens=2)
    assert seen and not any(seen)
