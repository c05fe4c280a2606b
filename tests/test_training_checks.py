"""Set-up checks that refuse a run which would train silently wrong (mmlm.training.checks)."""

import pytest
import torch

from _tiny import tiny_pair


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16))


def test_packing_is_refused_for_an_lm_whose_mask_ignores_packed_positions():
    """OPT builds its causal mask without position_ids: packed samples attend to each other. The probe says so
    (llama keeps them apart), and a packing run of such a model is refused before any data is read."""
    from mmlm.training.checks import check_packing, packing_isolates

    vlm, _ = tiny_pair()
    assert packing_isolates(vlm.lm) is True
    check_packing(vlm, True)
    opt = _opt()
    opt.train()
    assert packing_isolates(opt) is False
    assert opt.training and all(m.training for m in opt.modules())  # the probe ran in eval mode, then restored
    vlm.lm = opt
    with pytest.raises(ValueError, match=r"^data.packing true: this LM \(OPTForCausalLM\) lets packed samples attend"):
        check_packing(vlm, True)
    check_packing(vlm, False)  # without packing: nothing to check
    with torch.device("meta"):
        assert packing_isolates(_opt()) is None  # not materialised: cannot tell


def test_parts_named_by_a_missing_local_path_are_one_line_errors(tmp_path):
    from mmlm.config import VLMConfig
    from mmlm.presets import get_preset
    from mmlm.training.build import check_local_paths

    cfg = get_preset("tiny")
    check_local_paths(cfg)  # nothing local named
    cases = [
        (cfg.updated(text={"name": str(tmp_path / "lm-typo")}), r"^model_overrides.text.name: no such file or directory"),
        (cfg.updated(vision={"name": f"local-dir:{tmp_path}/vit"}), r"^model_overrides.vision.name: no such file or"),
        (cfg.updated(vision={"checkpoint_path": str(tmp_path / "w.safetensors")}),
         r"^model_overrides.vision.checkpoint_path: no such file: .*w.safetensors$"),
    ]
    for bad, message in cases:
        assert isinstance(bad, VLMConfig)
        with pytest.raises(ValueError, match=message):
            check_local_paths(bad)
    with pytest.raises(ValueError, match=r"^model.tokenizer: no such file or directory: \./nope$"):
        check_local_paths(cfg, "./nope")
    (tmp_path / "lm").mkdir()
    check_local_paths(cfg.updated(text={"name": str(tmp_path / "lm")}))  # exists: fine
    check_local_paths(cfg.updated(text={"name": "HuggingFaceTB/SmolLM2-135M"}))  # a hub name: not checked here


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused():
    from mmlm.processing import Processor

    vlm, proc = tiny_pair()
    tok = proc.tokenizer
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ValueError, match=r"^the tokenizer has neither a pad nor an end-of-sequence token"):
        Processor(tok, proc.config)


def test_init_from_says_that_it_keeps_its_checkpoint_s_tokenizer_and_template(tmp_path_factory):
    from _tiny import tiny_checkpoint
    from mmlm.training.build import build_model_and_processor

    ckpt = tiny_checkpoint(tmp_path_factory)
    with pytest.warns(UserWarning, match=r"^model.tokenizer and model.chat_template ignored: a model initialised from"):
        build_model_and_processor(init_from=ckpt, tokenizer="gpt2", chat_template="chatml")


def test_a_from_scratch_tokenizer_reads_pipe_shards_the_data_module_allowed():
    """The data module resolved (and so allowed) the pipe: sources; the tokenizer's corpus reader refused them."""
    import shlex

    from _training_kit import shards
    from mmlm.training.build import tokenizer_from_shards, train_sources

    tars = sorted((shards() / "train").glob("*.tar"))
    spec = [f"pipe:cat {shlex.quote(str(t))}" for t in tars]
    with pytest.raises(ValueError, match="allow_pipes"):
        tokenizer_from_shards(spec, 300, log=lambda *_: None)  # a raw spec: as refused as the data module's
    resolved = train_sources(spec, allow_pipes=True)  # what `mmlm fit --data.allow_pipes true` hands over
    tok = tokenizer_from_shards(resolved, 300, log=lambda *_: None)
    assert len(tok) > 100
