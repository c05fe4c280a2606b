"""Shared image positions: every token of an image at one rotary position (``VLMConfig.image_positions``)."""

import pytest
import torch

from _tiny import image, tiny_config, tiny_tokenizer
from mmlm import VLM, Processor
from mmlm.generation import generate
from mmlm.modeling.fusion import shared_image_positions

I = 5  # the image token id in the hand-written rows


def test_positions_collapse_each_image_and_respect_padding_and_packing():
    ids = torch.tensor([[7, I, I, I, 8, 9], [0, 7, I, I, I, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])  # the second row left-padded
    assert shared_image_positions(ids, I, 3, mask).tolist() == [[0, 1, 1, 1, 2, 3], [0, 0, 1, 1, 1, 2]]
    # two packed samples: positions restart at 0 for the second
    packed = torch.tensor([[7, I, I, 8, 7, I, I, 9]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    assert shared_image_positions(packed, I, 2, position_ids=pos).tolist() == [[0, 1, 1, 2, 0, 1, 1, 2]]
    # two images back to back stay apart; text only is unchanged
    assert shared_image_positions(torch.tensor([[7, I, I, 8, I, I, I, I, 9]]), I, 2).tolist() == [[0, 1, 1, 2, 3, 3, 4, 4, 5]]
    assert shared_image_positions(torch.tensor([[7, 8, 9]]), I, 2).tolist() == [[0, 1, 2]]


def _shared_pair(seed: int = 0):
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = tiny_config(tok).updated(projector={"position_embedding": True}, image_positions="shared")
    cfg.text.hf_config["tie_word_embeddings"] = False
    vlm = VLM(cfg).eval()
    with torch.no_grad():  # weights scaled up: greedy text differs between images and positions
        for p in vlm.parameters():
            p.mul_(3)
    return vlm, Processor.for_model(vlm, tok, max_length=128)


PROMPTS = ["what color is the star?", "Describe the image briefly."]
IMAGES = [image("red"), image("blue", (20, 50))]


def test_forward_runs_the_lm_at_the_shared_positions():
    vlm, proc = _shared_pair()
    batch = proc(images=IMAGES, text=PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours = vlm(ids, batch["pixel_values"], mask, num_images=batch["num_images"]).logits
        embeds = vlm.embed(ids, batch["pixel_values"], batch["num_images"])
        pos = shared_image_positions(ids, vlm.config.image_token_id, vlm.num_image_tokens, mask)
        ref = vlm.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        plain = vlm.lm(inputs_embeds=embeds, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real])
    assert not torch.allclose(ours[real], plain[real])  # the positions matter
    assert int(pos.max()) == int(mask.sum(1).max()) - vlm.num_image_tokens  # 15 of 16 image positions gone


def test_bad_settings_fail_in_one_line():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="needs projector.position_embedding=True"):
        VLM(tiny_config(tok).updated(image_positions="shared"))
    with pytest.raises(ValueError, match=r"unknown image_positions 'mixed'; known: \['sequential', 'shared'\]"):
        VLM(tiny_config(tok).updated(image_positions="mixed"))
    vlm, proc = _shared_pair()
    with pytest.raises(ValueError, match="needs position_ids with past_key_values"):
        vlm(torch.tensor([[7]]), past_key_values=object())
    with pytest.raises(ValueError, match="packed rows.*data.packing false"):
        vlm(torch.tensor([[7, 8]]), position_ids=torch.tensor([[0, 0]]))


def _gen(vlm, proc, images, prompts, **opts):
    batch = proc(images=images, text=prompts)
    return generate(vlm, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                    num_images=batch["num_images"], eos_token_id=[], pad_token_id=proc.tokenizer.pad_token_id, **opts)


def test_greedy_decoding_continues_the_shared_positions():
    vlm, proc = _shared_pair()
    cached = _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=8)
    assert torch.equal(cached, _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=8, use_cache=False))
    assert torch.equal(cached, _gen(vlm, proc, IMAGES, PROMPTS, max_new_tokens=8, cache="static"))
    for i in range(2):  # the left-padded batch equals one prompt at a time
        assert torch.equal(cached[i], _gen(vlm, proc, IMAGES[i:i + 1], PROMPTS[i:i + 1], max_new_tokens=8)[0])
    # each new token is the argmax of the forward pass over prompt + tokens so far (teacher forcing)
    batch = proc(images=IMAGES[:1], text=PROMPTS[:1])
    ids = torch.cat([batch["input_ids"], cached[:1]], dim=1)
    with torch.no_grad():
        logits = vlm(ids, batch["pixel_values"], num_images=batch["num_images"]).logits  # (1, L + 8, V)
    prompt = batch["input_ids"].shape[1]
    assert logits[0, prompt - 1:-1].argmax(-1).tolist() == cached[0].tolist()


def test_beam_search_keeps_the_shared_positions():
    import transformers

    vlm, proc = _shared_pair()
    if int(transformers.__version__.split(".")[0]) < 5:  # refused in one line, not decoded wrongly
        with pytest.raises(ValueError, match="needs transformers >= 5"):
            _gen(vlm, proc, IMAGES[:1], PROMPTS[:1], max_new_tokens=2, num_beams=3)
        return
    greedy = _gen(vlm, proc, IMAGES[:1], PROMPTS[:1], max_new_tokens=6)
    assert torch.equal(_gen(vlm, proc, IMAGES[:1], PROMPTS[:1], max_new_tokens=1, num_beams=3), greedy[:, :1])
    beams = _gen(vlm, proc, IMAGES[:1], PROMPTS[:1], max_new_tokens=6, num_beams=4)
    batch = proc(images=IMAGES[:1], text=PROMPTS[:1])
    prompt = batch["input_ids"].shape[1]

    def logprob(new):  # of the new tokens under the model's own forward pass (shared positions)
        ids = torch.cat([batch["input_ids"], new], dim=1)
        with torch.no_grad():
            logp = vlm(ids, batch["pixel_values"], num_images=batch["num_images"]).logits.log_softmax(-1)
        return logp[0, prompt - 1:-1].gather(-1, new[0, :, None]).sum().item()

    assert beams.shape == greedy.shape and logprob(beams) >= logprob(greedy) - 1e-4  # a beam finds no worse text
