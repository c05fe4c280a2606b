"""The processor: label masks, image expansion, truncation, padding, system prompt, transforms."""

import pytest
import torch
from PIL import Image

from _tiny import image, pair, tiny_pair  # noqa: F401
from mmlm.config import ImageTransformConfig
from mmlm.image_transform import ImageTransform
from mmlm.processing import ImageSpanTruncated, SampleTooLong


def _labelled_text(proc, enc):
    return proc.tokenizer.decode(enc["labels"][enc["labels"] != -100])



def _labelled_runs(enc: dict) -> list[list[int]]:
    """The token ids of each run of consecutive labelled positions of an encoded sample."""
    runs, prev = [], False
    for tok, flag in zip(enc["input_ids"].tolist(), (enc["labels"] != -100).tolist()):
        if flag and not prev:
            runs.append([])
        if flag:
            runs[-1].append(tok)
        prev = flag
    return runs

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
    assert [proc.tokenizer.decode(r) for r in _labelled_runs(enc)] == ["red<|end|>", "two<|end|>"]
    text = proc.tokenizer.decode(enc["input_ids"][~labelled])
    assert "You are a helpful assistant." in text and "how many shapes" in text


def _gpt2_style_tokenizer():
    """A byte-level BPE tokenizer like GPT-2's tokenizer.json: its offsets are trimmed of whitespace
    (``ByteLevel(trim_offsets=True)``), so a leading space belongs to no token's offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from _tiny import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_labels_of_answers_that_start_with_a_space_and_a_tokenizer_that_trims_offsets():
    """vicuna_v1 labels " answer</s>" (the space belongs to the answer). transformers' assistant mask maps the
    span's first character, a space, to a token; GPT-2-style offsets give it none, and every label was lost."""
    from mmlm.processing import Processor, ProcessorConfig
    from mmlm.templates import TEMPLATES

    proc = Processor(_gpt2_style_tokenizer(), ProcessorConfig(ImageTransformConfig(size=32), num_image_tokens=2),
                     TEMPLATES["vicuna_v1"].template)
    conv = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>\nwhat color is the star?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "how many shapes are there?"}, {"role": "assistant", "content": "two"}]
    enc = proc.encode(conv, [image()])
    assert [proc.tokenizer.decode(r) for r in _labelled_runs(enc)] == [" red<|endoftext|>", " two<|endoftext|>"]
    assert torch.equal(enc["labels"][enc["labels"] != -100], enc["input_ids"][enc["labels"] != -100])
    # the generation prompt is the training text's prefix up to the answer
    gen = proc.encode(conv[:2], [image()], add_generation_prompt=True)["input_ids"]
    assert torch.equal(enc["input_ids"][: gen.numel()], gen)


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


def test_batch_errors_name_the_sample(pair):
    from dataclasses import replace

    from mmlm.processing import Processor

    _, proc = pair
    ok = [{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(ValueError, match=r"^sample 1: 1 <image> placeholder\(s\) in the text but 2 image\(s\)$"):
        proc(images=[[image()], [image(), image()]], conversations=[ok, ok])
    long = [{"role": "user", "content": "what color is the star? " * 30 + "<image>"}, ok[1]]
    with pytest.raises(ImageSpanTruncated, match=r"^sample 2: .* inside an image span"):
        proc(images=[image(), image(), image()], conversations=[ok, ok, long])
    dropping = Processor(proc.tokenizer, replace(proc.config, on_overflow="drop"))
    with pytest.raises(ImageSpanTruncated, match=r"^sample 1: \d+ tokens exceed max_length=128 .* inside an image"):
        dropping(images=[image(), image()], conversations=[ok, long])  # a batch has no row to drop
    with pytest.raises(ValueError, match=r"^sample 1: 2 <image> placeholder\(s\) in the text but 1 image\(s\)$"):
        proc(images=[image(), image()], text=["what?", "<image> or <image>?"])
    with pytest.raises(ValueError, match=r"^sample 1: the conversation has no turns$"):
        proc(conversations=[ok[1:], []])
    with pytest.raises(ValueError, match=r"^no samples: pass at least one prompt or conversation$"):
        proc(conversations=[])


def test_prompts_carry_no_labels_and_an_unlabelled_training_batch_is_refused(pair):
    """Generation prompts have nothing to supervise: no labels key, so ``vlm(**batch)`` gives no (NaN) loss.
    A conversations batch in which no sample has an assistant turn would train on nothing: refused."""
    vlm, proc = pair
    batch = proc(images=[image()], text=["what color is the star?"])
    assert "labels" not in batch and vlm(**batch).loss is None
    ask = [{"role": "user", "content": "<image>what color?"}]
    with pytest.raises(ValueError, match=r"^no token of the batch is labelled .* pass text="):
        proc(images=[image(), image()], conversations=[ask, ask])
    # one labelled sample is enough: the other is a valid (unsupervised) row
    mixed = proc(images=[image(), image()], conversations=[ask, [*ask, {"role": "assistant", "content": "red"}]])
    assert (mixed["labels"][0] == -100).all() and torch.isfinite(vlm(**mixed).loss)


def test_a_template_that_masks_every_label_raises_naming_the_sample():
    from mmlm.processing import DEFAULT_CHAT_TEMPLATE, Processor

    _, proc = tiny_pair()
    marks_nothing = DEFAULT_CHAT_TEMPLATE.replace(
        "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}",
        "{{ message['content'] + '<|end|>' }}{% generation %}{% endgeneration %}")
    assert marks_nothing != DEFAULT_CHAT_TEMPLATE
    bad = Processor(proc.tokenizer, proc.config, marks_nothing)
    conv = [{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(ValueError, match=r"^sample 's3': the chat template masks every label"):
        bad.encode(conv, [image()], key="s3")
    with pytest.raises(ValueError, match=r"^sample 0: the chat template masks every label"):
        bad(images=[image()], conversations=[conv])
    # prompts and conversations without assistant text have no label to lose
    assert bad.encode(conv[:1], [image()], add_generation_prompt=True) is not None
    assert bad.encode(conv[:1] + [{"role": "assistant", "content": " "}], [image()]) is not None


def test_generation_marks_with_whitespace_control_are_accepted():
    from mmlm.processing import Processor

    _, proc = tiny_pair()  # its own tokenizer: a Processor sets the tokenizer's template
    template = proc.chat_template.replace("{% generation %}", "{%- generation -%}").replace(
        "{% endgeneration %}", "{%- endgeneration -%}")
    assert "{% generation %}" not in template and "{%- generation %}" not in template
    other = Processor(proc.tokenizer, proc.config, template)
    enc = other.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}])
    assert _labelled_text(other, enc) == "red<|end|>"
    with pytest.raises(ValueError, match="must mark assistant text"):
        Processor(proc.tokenizer, proc.config, template.replace("generation", "block"))


def test_place_images_after_text():
    from mmlm.processing import place_images

    def user(text):
        return [{"role": "user", "content": text}, {"role": "assistant", "content": "red"}]

    conv = user("<image>\nwhat color is the star?") + [{"role": "user", "content": "and its size?"}]
    assert place_images(conv, 1) == conv  # as_written: where the text puts it
    assert place_images(conv, 1, placement="after_text") == (
        user("what color is the star?\n<image>") + [{"role": "user", "content": "and its size?"}])
    # no placeholder: before the text as written, after it otherwise; images of several turns stay in their turn
    assert place_images(user("what color?"), 1)[0]["content"] == "<image>\nwhat color?"
    assert place_images(user("what color?"), 2, placement="after_text")[0]["content"] == "what color?\n<image><image>"
    two = user("<image>\nfirst?") + [{"role": "user", "content": "<image> second?"}]
    placed = place_images(two, 2, placement="after_text")
    assert [placed[0]["content"], placed[2]["content"]] == ["first?\n<image>", "second?\n<image>"]
    assert place_images(user("<image>"), 1, placement="after_text")[0]["content"] == "<image>"
    assert place_images(user("hi"), 0, placement="after_text") == user("hi")
    with pytest.raises(ValueError, match=r"unknown image placement 'last'; known: \['as_written', 'after_text'\]"):
        place_images(conv, 1, placement="last")
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) in the text but 1 image"):
        place_images(user("<image><image>hi"), 1, placement="after_text")


def test_images_after_the_question_in_the_tokens():
    from dataclasses import replace

    from mmlm.processing import Processor

    vlm, proc = tiny_pair()
    after = Processor(proc.tokenizer, replace(proc.config, image_placement="after_text"))
    conv = [{"role": "user", "content": "<image>\nwhat color is the star?"}, {"role": "assistant", "content": "red"}]
    a, b = proc.encode(conv, [image()]), after.encode(conv, [image()])
    img = proc.image_token_id
    question = proc.tokenizer("what color is the star?", add_special_tokens=False)["input_ids"]

    def where(ids, span):
        ids = ids.tolist()
        return next(i for i in range(len(ids)) if ids[i:i + len(span)] == span)

    first_image = lambda ids: int((ids == img).nonzero()[0])  # noqa: E731
    assert first_image(a["input_ids"]) < where(a["input_ids"], question)
    assert first_image(b["input_ids"]) > where(b["input_ids"], question)
    assert int((b["input_ids"] == img).sum()) == vlm.num_image_tokens
    assert _labelled_text(after, b) == _labelled_text(proc, a) == "red<|end|>"
    # the generation prompt ends with the image span and the assistant's header: the answer right after it
    g = after.encode([{"role": "user", "content": "what color is the star?"}], [image()], add_generation_prompt=True)
    assert int((g["input_ids"] == img).nonzero()[-1]) >= g["input_ids"].numel() - 4
    # saved and loaded with the model; a bad value fails when the processor is made
    assert type(after.config).from_dict(after.config.to_dict()).image_placement == "after_text"
    with pytest.raises(ValueError, match=r"unknown image_placement 'end'; known"):
        Processor(proc.tokenizer, replace(proc.config, image_placement="end"))


def test_system_prompt_from_config():
    vlm, proc = tiny_pair()
    proc.config.system_prompt = "You are a helpful assistant."
    enc = proc.encode([{"role": "user", "content": "hi"}], [], add_generation_prompt=True)
    assert proc.tokenizer.decode(enc["input_ids"]).startswith("<|system|>You are a helpful assistant.<|end|>")
    assert (enc["labels"] == -100).all()


def test_truncation_never_cuts_an_image_span():
    vlm, proc = tiny_pair()
    conv = [{"role": "user", "content": "<image>what color is the star?"}, {"role": "assistant", "content": "red " * 40}]
    proc.config.max_length = 34  # the image span (16 tokens) fits, the long answer is cut
    enc = proc.encode(conv, [image()])
    assert enc["input_ids"].numel() == 34 and (enc["labels"] != -100).any()
    assert int((enc["input_ids"] == proc.image_token_id).sum()) == 16
    proc.config.max_length = 10  # the cut would fall inside the image span
    with pytest.raises(ImageSpanTruncated, match="sample 's7'.*inside an image span"):
        proc.encode(conv, [image()], key="s7")
    proc.config.on_overflow = "drop"
    assert proc.encode(conv, [image()]) is None


def test_a_generation_prompt_longer_than_max_length_is_not_cut():
    """Cut on the right, a prompt loses the assistant's header: the model would continue the question."""
    vlm, proc = tiny_pair()
    proc.config.max_length = 24
    question = "how many shapes are there? " * 4
    batch = proc(images=[image(), image()], text=["what color?", question])
    assert batch["input_ids"].shape[1] > 24
    assert proc.tokenizer.convert_ids_to_tokens(batch["input_ids"][:, -1].tolist()) == ["<|assistant|>"] * 2
    assert (batch["input_ids"] == proc.image_token_id).sum(dim=1).tolist() == [16, 16]
    assert question.strip() in proc.tokenizer.decode(batch["input_ids"][1])
    # training samples are still cut at max_length
    enc = proc.encode([{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": question}], [image()])
    assert enc["input_ids"].numel() == 24


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


@pytest.mark.parametrize("kernel", ["pil", "torch"])
def test_image_transform_matches_timm_for_crop(kernel):
    """Our crop transform equals timm's eval transform (resize shorter side, centre crop): bit for
    bit with PIL's resampling, within 2/255 (and identical on >= 98% of values) with torch's."""
    import numpy as np
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    t = ImageTransform(ImageTransformConfig(size=32, resize_mode="crop", crop_pct=0.875, resize_kernel=kernel,
                                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    assert t.torch_kernel == (kernel == "torch")
    ours = t(im)
    timm_tf = create_transform(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bicubic",
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    if kernel == "pil":
        torch.testing.assert_close(ours, timm_tf(im), atol=1e-5, rtol=0)
    else:
        levels = ((ours - timm_tf(im)) * torch.tensor(t.cfg.std).view(3, 1, 1) * 255).abs()
        assert levels.max() < 2.01 and (levels < 0.01).float().mean() >= 0.98


def _resize_cases():
    """Sizes (w, h) x fits that downscale: wide, tall (Pillow 13 resizes those vertically first),
    square, barely smaller, near-degenerate; smooth JPEG-like and noise pixels."""
    sizes = [(500, 400), (400, 500), (300, 1000), (1000, 300), (257, 250), (250, 900), (640, 480), (1200, 40)]
    return [(size, mode, interp) for size in sizes for mode in ("squash", "crop", "pad")
            for interp in ("bicubic", "bilinear")]


def test_torch_resize_kernel_equals_pil_within_two_levels():
    """``resize_kernel="torch"`` (torch's antialiased uint8 interpolate, PIL's pass order) against
    PIL's ``resize`` through the same geometry: >= 99% of values identical, none more than 2 apart,
    over wide, tall and square downscales in every mode; upscales are PIL's own (exact)."""
    import numpy as np

    rng = np.random.default_rng(0)
    diffs = []
    for (w, h), mode, interp in _resize_cases():
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(noise).resize((max(w // 12, 1), max(h // 12, 1)))
                            .resize((w, h), Image.Resampling.BICUBIC))
        for arr in (noise, smooth):
            im = Image.fromarray(arr)
            t = ImageTransform(ImageTransformConfig(size=64, resize_mode=mode, interpolation=interp,
                                                    crop_pct=0.9 if mode == "crop" else 1.0, resize_kernel="torch"))
            ours, ref = t.to_uint8(im), t.to_uint8_pil(im)
            assert ours.dtype == torch.uint8 and ours.shape == ref.shape == (3, 64, 64), (w, h, mode)
            d = (ours.int() - ref.int()).abs()
            assert d.max() <= 2, ((w, h), mode, interp, int(d.max()))
            diffs.append(d.flatten())
    d = torch.cat(diffs)
    assert (d == 0).float().mean() >= 0.99
    # an upscale (and a crop past the edge, crop_pct > 1) goes through PIL: exact
    for mode, pct, size in [("squash", 1.0, (40, 30)), ("crop", 0.9, (60, 200)), ("crop", 1.25, (300, 200))]:
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        t = ImageTransform(ImageTransformConfig(size=64, resize_mode=mode, crop_pct=pct, resize_kernel="torch"))
        assert torch.equal(t.to_uint8(im), t.to_uint8_pil(im)), (mode, pct, size)


def test_pil_resizes_vertically_first_as_installed_pillow_does():
    """The pass order rule read from Pillow's Resample.c, checked against the installed Pillow:
    its resize equals one of the two one-axis sequences, the one the rule names."""
    import numpy as np

    from mmlm.image_transform import pil_resizes_vertically_first

    rng, B = np.random.default_rng(1), Image.Resampling.BICUBIC
    decided = 0
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(20, 300, 2))
        nw, nh = int(rng.integers(8, w)), int(rng.integers(8, h))
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = np.asarray(im.resize((nw, nh), B))
        h_first = np.array_equal(got, np.asarray(im.resize((nw, h), B).resize((nw, nh), B)))
        v_first = np.array_equal(got, np.asarray(im.resize((w, nh), B).resize((nw, nh), B)))
        if h_first != v_first:
            decided += 1
            assert v_first == pil_resizes_vertically_first(w, h, nw, nh), (w, h, nw, nh)
    assert decided >= 30


def test_resize_kernel_choice_and_bad_names():
    from mmlm.image_transform import torch_resize_is_fast

    auto = ImageTransform(ImageTransformConfig(size=16))
    assert auto.cfg.resize_kernel == "auto" and auto.torch_kernel == torch_resize_is_fast()
    assert not ImageTransform(ImageTransformConfig(size=16, resize_kernel="pil")).torch_kernel
    for interp in ("nearest", "lanczos"):  # torch has no PIL-equal kernel for these
        assert not ImageTransform(ImageTransformConfig(size=16, interpolation=interp, resize_kernel="torch")).torch_kernel
    with pytest.raises(ValueError, match=r"unknown resize_kernel 'fast'; known: \['auto', 'pil', 'torch'\]"):
        ImageTransformConfig(size=16, resize_kernel="fast")


# ---------------------------------------------------------------------------------- pixel values
def _noise(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), (CLIP_MEAN, CLIP_STD)])
def test_normalisation_is_exactly_torchvision_to_tensor_then_normalize(mean, std):
    """``(x / 255 - mean) / std`` as torchvision (and timm's eval transform) compute it, bit for bit,
    whether the processor normalises (float path) or ``normalize_pixels`` does (the model's uint8 path)."""
    import numpy as np
    from torchvision.transforms import functional as TF

    from mmlm.pixels import normalize_pixels

    t = ImageTransform(ImageTransformConfig(size=32, resize_mode="crop", crop_pct=0.9, mean=mean, std=std))
    im = _noise()
    fitted = t.fit(im)
    ref = TF.normalize(TF.to_tensor(fitted), mean, std)
    x = t(im)
    assert x.dtype == torch.float32 and torch.equal(x, ref)
    u8 = t.to_uint8(im)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
    assert torch.equal(u8, torch.from_numpy(np.asarray(fitted).copy()).permute(2, 0, 1))
    assert torch.equal(normalize_pixels(u8, mean, std), ref)
    assert torch.equal(normalize_pixels(u8[None].expand(2, -1, -1, -1), mean, std), ref.expand(2, -1, -1, -1))
    # the formula ImageTransform used before the model could normalise
    old = (u8.float().div_(255.0) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.equal(x, old)


def test_normalize_pixels_ignores_the_default_dtype_and_refuses_floats():
    from mmlm.pixels import normalize_pixels

    u8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = normalize_pixels(u8, CLIP_MEAN, CLIP_STD)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # Lightning's "*-true" precisions change it around the forward
    try:
        got = normalize_pixels(u8, CLIP_MEAN, CLIP_STD)
    finally:
        torch.set_default_dtype(before)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    half = normalize_pixels(u8, CLIP_MEAN, CLIP_STD, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, ref.to(torch.bfloat16))
    with pytest.raises(ValueError, match="takes uint8 RGB pixels, got torch.float32"):
        normalize_pixels(u8.float(), CLIP_MEAN, CLIP_STD)


def test_encode_uint8_pixels_same_tokens_and_normalise_to_the_float_path(pair):
    from mmlm.pixels import normalize_pixels

    _, proc = pair
    conv = proc.caption_conversation("a small red star")
    images = [_noise(seed=1), _noise((20, 50), seed=2)]
    f = proc.encode(conv, images)
    u = proc.encode(conv, images, pixel_dtype="uint8")
    assert f["pixel_values"].dtype == torch.float32 and u["pixel_values"].dtype == torch.uint8
    assert u["pixel_values"].shape == f["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(u["input_ids"], f["input_ids"]) and torch.equal(u["labels"], f["labels"])
    cfg = proc.config.image_transform
    assert torch.equal(normalize_pixels(u["pixel_values"], cfg.mean, cfg.std), f["pixel_values"])
    with pytest.raises(ValueError, match=r"pixel_dtype must be one of \('float', 'uint8'\), got 'int32'"):
        proc.encode(conv, images, pixel_dtype="int32")
    with pytest.raises(ValueError, match="cannot batch pixel values of different dtypes"):
        proc.pad([f, u])  # uint8 would silently become unnormalised float
    assert proc.pad([u, u])["pixel_values"].dtype == torch.uint8


def _old_encode(proc, conversation, images, add_generation_prompt=False, key=None):
    """``Processor.encode`` as it was before the uint8 option and the vectorised image expansion."""
    import numpy as np

    from mmlm.processing import normalize_messages, place_images

    messages = proc._with_system(place_images(normalize_messages(conversation, key), len(images), key))
    enc = proc.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             add_generation_prompt=add_generation_prompt,
                                             return_assistant_tokens_mask=not add_generation_prompt)
    ids = list(enc["input_ids"])
    mask = [0] * len(ids) if add_generation_prompt else enc["assistant_masks"]
    img, n = proc.image_token_id, proc.config.num_image_tokens
    out_ids, out_labels = [], []
    for t, lab in zip(ids, [t if m else -100 for t, m in zip(ids, mask)]):
        if t == img:
            out_ids += [img] * n
            out_labels += [-100] * n
        else:
            out_ids.append(t)
            out_labels.append(lab)
    ids, labels = torch.tensor(out_ids, dtype=torch.long), torch.tensor(out_labels, dtype=torch.long)
    if not add_generation_prompt:  # generation prompts are never cut (the cut would remove the assistant header)
        try:
            ids, labels = proc._truncate(ids, labels, key)
        except SampleTooLong:  # on_overflow="drop"
            return None
    tf = proc.image_transform
    old = [(torch.from_numpy(np.asarray(tf.fit(im), dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
            - tf._mean) / tf._std for im in images]
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.stack(old) if images else None,
            "num_images": len(images)}


def test_encode_is_byte_identical_to_the_old_path():
    _, proc = tiny_pair()
    proc.config.system_prompt = "You are a helpful assistant."
    proc.config.on_overflow = "drop"
    cases = [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "two"}], 0, False),
        (proc.caption_conversation("a small red star on the left"), 1, False),
        ([{"from": "human", "value": "<image>\nwhat color is the star?"}, {"from": "gpt", "value": "red"},
          {"from": "human", "value": "how many <image> shapes?"}, {"from": "gpt", "value": "two"}], 2, False),
        ([{"role": "user", "content": "what color?"}, {"role": "assistant", "content": "blue"}], 3, False),
        ([{"role": "user", "content": "<image>what color is the star?"}], 1, True),
        ([{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "red " * 40}], 1, False),
    ]
    truncated = 0
    for max_length in (128, 30):
        proc.config.max_length = max_length
        for i, (conv, n, gen) in enumerate(cases):
            images = [_noise((30 + 7 * j, 25), seed=10 * i + j) for j in range(n)]
            new = proc.encode(conv, images, add_generation_prompt=gen)
            old = _old_encode(proc, conv, images, add_generation_prompt=gen)
            if old is None:  # max_length 30 cuts into an image span (or past every answer token)
                assert new is None and max_length == 30
                continue
            truncated += int(old["input_ids"].numel() == max_length)
            assert new.keys() == old.keys() and new["num_images"] == old["num_images"]
            for k in ("input_ids", "labels", "pixel_values"):
                if old[k] is None:
                    assert new[k] is None
                else:
                    assert new[k].dtype == old[k].dtype and torch.equal(new[k], old[k]), (i, k)
    assert truncated  # a cut after the image span was compared too


def test_the_processor_converts_odd_modes_as_training_and_describe_do(pair):
    """Alpha composited on white and 16-bit scaled to 8 bits (``to_rgb``), not PIL's plain convert("RGB"),
    which kept a transparent pixel's colour and clipped 16-bit values to white."""
    from mmlm.api import open_image

    _, proc = pair
    conv = [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "red"}]
    for im in (Image.new("RGBA", (40, 40), (255, 0, 0, 0)), Image.new("I;16", (40, 40), 30000),
               Image.new("LA", (40, 40), (0, 0))):
        direct = proc(images=[im], conversations=[conv])["pixel_values"]
        decoded = proc(images=[open_image(im)], conversations=[conv])["pixel_values"]
        assert torch.equal(direct, decoded), im.mode
        plain = proc(images=[im.convert("RGB")], conversations=[conv])["pixel_values"]
        assert not torch.equal(direct, plain), im.mode  # the case the conversion is for


def test_a_cut_that_would_remove_every_answer_token_raises_or_drops(pair):
    """A long question and a short answer: cut to max_length, the sample would train on nothing (in a batch,
    silently). It raises naming the sample (``too_long`` in the training stream) or, with drop, is dropped."""
    from dataclasses import replace

    from mmlm.data.errors import TOO_LONG, classify
    from mmlm.processing import AnswerTruncated, Processor

    _, proc = pair
    ok = [{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": "red"}]
    long = [{"role": "user", "content": "<image>" + "what color is the star? " * 30}, ok[1]]
    with pytest.raises(AnswerTruncated, match=r"^sample 1: \d+ tokens exceed max_length=128 and the cut would remove "
                                              r"every answer token \(the first at \d+\)"):
        proc(images=[image(), image()], conversations=[ok, long])
    with pytest.raises(AnswerTruncated) as err:
        proc.encode(long, [image()], key="s3")
    assert classify(err.value, "s3").reason == TOO_LONG
    dropping = Processor(proc.tokenizer, replace(proc.config, on_overflow="drop"))
    assert dropping.encode(long, [image()]) is None
    # an answer that starts inside max_length is cut, as before: it keeps its first tokens
    cut = proc.encode([ok[0], {"role": "assistant", "content": "red " * 200}], [image()])
    assert cut["input_ids"].numel() == 128 and (cut["labels"] != -100).any()


def test_images_that_are_not_pil_images_are_a_clear_type_error(pair):
    """A path string was iterated as characters ("27 images"); arrays gave "truth value ... ambiguous"."""
    import numpy as np

    from mmlm.api import open_image

    _, proc = pair
    for bad in ("photo.jpg", [np.zeros((8, 8, 3), np.uint8)], [[image(), "b.png"]]):
        with pytest.raises(TypeError, match=r"^images must be PIL images .* got (str|ndarray): open files with"):
            proc(images=bad, text=["what?"])
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 0] = 255
    assert np.array_equal(np.asarray(open_image(arr)), arr)  # describe takes arrays through open_image
    with pytest.raises(TypeError, match="image tensor is ambiguous"):
        open_image(torch.zeros(3, 8, 8))


def test_an_unknown_processor_option_names_the_known_ones(pair):
    from mmlm.processing import Processor

    vlm, proc = pair
    with pytest.raises(TypeError, match=r"^unknown processor option\(s\) max_lenght; known: .*max_length"):
        Processor.for_model(vlm, proc.tokenizer, max_lenght=10)
