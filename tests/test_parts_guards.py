"""Guards found by a review of the model parts, presets, `mmlm plot` and `mmlm quickstart`'s arguments:
timm towers against their own block outputs, named timm models' geometry, the presets' towers and
transforms, odd metrics.csv files, and re-runs of a quickstart workdir with other options."""

from __future__ import annotations

import json

import pytest
import torch

from mmlm.cli.main import main
from mmlm.config import VisionConfig
from mmlm.modeling.vision import TimmViTEncoder


# ------------------------------------------------------------------------------ timm towers
def _hidden_states(vit, x: torch.Tensor) -> list[torch.Tensor]:
    """transformers-style hidden_states of an unpruned timm ViT: [embeddings, block 1, ..., block n]."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    states = [h]
    for block in vit.blocks:
        h = block(h)
        states.append(h)
    return states


@pytest.mark.parametrize("tokens", [dict(), dict(reg_tokens=2), dict(class_token=False)])
@pytest.mark.parametrize("feature_layer", [-1, -2, 1])
@pytest.mark.parametrize("drop", [True, False])
def test_timm_features_are_the_towers_hidden_states(tokens, feature_layer, drop):
    geometry = dict(image_size=32, patch_size=8, width=32, depth=3, num_heads=2, **tokens)
    torch.manual_seed(0)
    enc = TimmViTEncoder(VisionConfig(feature_layer=feature_layer, drop_prefix_tokens=drop, **geometry)).eval()
    torch.manual_seed(0)
    full = TimmViTEncoder(VisionConfig(feature_layer=-1, drop_prefix_tokens=False, **geometry)).vit.eval()
    x = torch.randn(3, 3, 32, 32)  # 3 images: a tower without prefix tokens once split (2, ...) batches in two
    with torch.no_grad():
        ref = _hidden_states(full, x)[feature_layer]
        got = enc(x)
    if drop:
        ref = ref[:, full.num_prefix_tokens:]
    assert got.shape == ref.shape == (3, enc.num_patches, 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert len(enc.vit.blocks) == {-1: 3, -2: 2, 1: 1}[feature_layer]  # pruned after the feature layer


def test_named_timm_model_records_the_geometry_it_runs_at():
    with torch.device("meta"):
        with pytest.warns(UserWarning, match="takes 224 px images in 16 px patches"):
            cfg = VisionConfig(name="vit_tiny_patch16_224", image_size=64, patch_size=8)
            enc = TimmViTEncoder(cfg)
        assert (cfg.image_size, cfg.patch_size) == (224, 16)  # config.json says what the model does
        assert enc.num_patches == 196 and enc.image_transform().size == 224
        cfg = VisionConfig(name="vit_tiny_patch16_224", image_size=64, timm_kwargs={"img_size": 64})
        enc = TimmViTEncoder(cfg)  # another resolution, the documented way
    assert (cfg.image_size, enc.num_patches, enc.image_transform().size) == (64, 16, 64)


def test_pretrained_siglip_tower_loads_without_an_unexpected_head_report(tmp_path, capfd):
    from test_interop_parts import save_vision

    from mmlm.modeling.hf_vision import HFVisionEncoder

    path, model = save_vision(tmp_path / "siglip", "siglip")  # a checkpoint with SigLIP's pooling head
    capfd.readouterr()
    enc = HFVisionEncoder(VisionConfig(backend="hf", name=path, pretrained=True, feature_layer=-1)).eval()
    out = capfd.readouterr()
    assert "UNEXPECTED" not in out.out + out.err  # transformers' load report: nothing left unused but the head
    assert getattr(enc.tower, "head", None) is None  # ... which is dropped: LLaVA never reads it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model(pixel_values=x, output_hidden_states=True).hidden_states[-1])


# ------------------------------------------------------------------------------ pretrained parts
def test_build_from_pretrained_keeps_samples_within_the_lms_positions(tmp_path):
    from test_interop_parts import save_lm, save_vision

    from mmlm.interop import build_from_pretrained

    vpath, _ = save_vision(tmp_path / "v", "clip")
    lpath = save_lm(tmp_path / "lm", "gpt2")  # learned positions: n_positions=512
    vlm, proc = build_from_pretrained(vpath, lpath, "mlp2x_gelu", "chatml")
    assert proc.config.max_length == 512  # not 2048: a longer sample would be an index error in the LM
    assert build_from_pretrained(vpath, lpath, "mlp2x_gelu", "chatml", max_length=100)[1].config.max_length == 100
    with pytest.raises(ValueError, match="max_length=1024 exceeds the LM's 512 positions"):
        build_from_pretrained(vpath, lpath, "mlp2x_gelu", "chatml", max_length=1024)


# ------------------------------------------------------------------------------ presets
def test_llava_preset_runs_openai_clip_with_quickgelu_and_siglip_preset_squashes():
    from timm.layers.activations import QuickGELU

    from mmlm import VLM

    with torch.device("meta"):
        llava = VLM.from_preset("llava-1.5-7b-like", image_token_id=3)
        base = VLM.from_preset("base", image_token_id=3)
    assert all(isinstance(b.mlp.act, QuickGELU) for b in llava.vision.vit.blocks)  # as OpenAI's weights were trained
    assert llava.num_image_tokens == (336 // 14) ** 2 and len(llava.vision.vit.blocks) == 23
    t = base.image_transform()
    assert (t.resize_mode, t.crop_pct, t.size) == ("squash", 1.0, 224)


# ------------------------------------------------------------------------------ mmlm plot
def _run_dir(tmp_path, *csvs: str):
    for i, text in enumerate(csvs):
        path = tmp_path / "run" / "logs" / f"version_{i}" / "metrics.csv"
        path.parent.mkdir(parents=True)
        path.write_text(text)
    return tmp_path / "run"


def test_plot_a_diverged_run_says_so(tmp_path, capsys):
    run = _run_dir(tmp_path, "epoch,step,train/loss\n0,1,nan\n0,2,inf\n")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN or infinite" in err and "first at step 1" in err and len(err.splitlines()) == 1
    run = _run_dir(tmp_path / "b", "epoch,step,train/loss\n0,1,2.5\n0,2,2.0\n0,3,nan\n0,4,nan\n")
    assert main(["plot", str(run)]) == 0
    err = capsys.readouterr().err
    assert "train/loss: 2 NaN/inf value(s) not drawn, the first at step 3" in err
    assert (run / "curves.png").is_file()


def test_plot_odd_files_are_drawn_or_named(tmp_path, capsys):
    # a torn row longer than the header (its surplus fields), a resumed run in a second version
    run = _run_dir(tmp_path, "epoch,step,train/loss\n0,1,3.0,7,8\n0,2,2.5\n",
                   "epoch,step,train/loss,val/loss\n0,2,2.4,\n0,3,2.2,2.6\n")
    assert main(["plot", str(run)]) == 0 and (run / "curves.png").is_file()
    from mmlm.cli.plot import metric_files, read_metrics

    assert read_metrics(metric_files(run))["train/loss"] == [(1.0, 3.0), (2.0, 2.4), (3.0, 2.2)]
    capsys.readouterr()
    assert main(["plot", str(run), "--out", str(run)]) == 2  # a directory
    err = capsys.readouterr().err.strip()
    assert "is a directory" in err and len(err.splitlines()) == 1
    bad = _run_dir(tmp_path / "c", "epoch,step,train/loss\n0,one,3.0\n")
    assert main(["plot", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "metrics.csv, line 2: step 'one' is not a number" in err
    nostep = _run_dir(tmp_path / "d", "a,b\n1,2\n")
    assert main(["plot", str(nostep)]) == 2 and "no 'step' column" in capsys.readouterr().err


def test_plot_a_later_log_version_replaces_the_earlier_from_its_first_step(tmp_path):
    from mmlm.cli.plot import metric_files, read_metrics

    # killed at step 5 (val at 4), resumed from the checkpoint of step 2: steps 3-5 of version 0 were abandoned
    run = _run_dir(tmp_path, "epoch,step,train/loss,val/loss\n0,1,3.0,\n0,2,2.8,\n0,3,2.6,\n0,4,,2.5\n0,5,2.4,\n",
                   "epoch,step,train/loss,val/loss\n0,3,2.7,\n0,6,2.3,2.4\n")
    m = read_metrics(metric_files(run))
    assert m["train/loss"] == [(1.0, 3.0), (2.0, 2.8), (3.0, 2.7), (6.0, 2.3)] and m["val/loss"] == [(6.0, 2.4)]
    # a fresh run in the same directory: nothing of the old one is left, not even its longer tail
    run = _run_dir(tmp_path / "b", "epoch,step,train/loss\n0,1,3.0\n0,2,2.0\n0,3,1.0\n",
                   "epoch,step,train/loss\n0,1,3.5\n")
    assert read_metrics(metric_files(run)) == {"train/loss": [(1.0, 3.5)]}


# ------------------------------------------------------------------------------ mmlm quickstart
def test_quickstart_refuses_a_workdir_made_with_other_options(tmp_path, capsys):
    from mmlm.quickstart import SETTINGS, check_settings

    work = tmp_path / "qs"
    assert main(["quickstart", "--workdir", str(work), "--max-steps", "0"]) == 2
    assert "--max-steps must be >= 1" in capsys.readouterr().err and not work.exists()
    # a quick look's record, then a full run: its stages would resume from the quick look's models
    work.mkdir()
    (work / SETTINGS).write_text(json.dumps({"recipes": [], "fit_args": ["--trainer.max_steps", "2"]}))
    assert main(["quickstart", "--workdir", str(work), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained with other options" in err and "--workdir" in err and len(err.splitlines()) == 1
    assert not (work / "data").exists()  # refused before building anything
    check_settings(work, {"recipes": [], "fit_args": ["--trainer.max_steps", "2"]})  # the same: resumes
    # the data of another --train-images: the builder's refusal, in the quickstart's words, not a traceback
    (work / SETTINGS).unlink()
    (work / "data").mkdir()
    (work / "data" / "synthetic.json").write_text(json.dumps({"params": {"train": 16}}))
    assert main(["quickstart", "--workdir", str(work), "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "built with other arguments" in err and "use another --workdir" in err and len(err.splitlines()) == 1
    # a workdir that is a file
    (tmp_path / "file").write_text("")
    assert main(["quickstart", "--workdir", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
