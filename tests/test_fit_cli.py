"""`mmlm fit` end to end (LightningCLI, the real data module, a tiny model), its errors, and `mmlm plot`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from _tiny import image
from _training_kit import fit_args, read_metrics
from mmlm.cli import fit, plot
from mmlm.cli.main import main as mmlm_main


def test_help_documents_every_section(capsys):
    assert mmlm_main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model.stage", "--model.lr", "--model.warmup", "--data.batch_size", "--trainer.max_steps",
                 "--checkpoint.every_n_train_steps", "--preflight.num_batches", "--signals.signals", "--ckpt_path"):
        assert flag in out, flag
    assert "RUN_DIR/model" in out and "what trains: align (projector)" in out


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    assert fit.main(fit_args(tmp_path / "a", "--model.stage", "pretrain")) == 2  # rejected by the parser
    assert fit.main(fit_args(tmp_path / "a2", "--model.image_placement", "last")) == 2
    assert fit.main(fit_args(tmp_path / "b", "--model.preset", "huge")) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert fit.main(fit_args(tmp_path / "c", "--trainer.max_steps", "-1")) == 2
    err = capsys.readouterr().err
    assert "error: set --trainer.max_steps" in err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("fit") / "run"
    # images after the question (the processor option travels with the model)
    assert fit.main(fit_args(run, "--model.image_placement", "after_text", steps=4, workers=1)) == 0
    return run


def test_fit_writes_the_documented_run_dir(run_dir):
    for rel in ("config.yaml", "checkpoints/last.ckpt", "logs/version_0/metrics.csv", "logs/version_0/config.yaml",
                "preflight.json", "model/config.json", "model/model.safetensors", "model/processor_config.json",
                "model/tokenizer.json", "model/chat_template.jinja"):
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "checkpoints").glob("best-step=*.ckpt"))  # best by val/loss
    m = read_metrics(run_dir)
    assert sorted(m["train/loss"]) == [0, 1, 2, 3] and "val/loss" in m
    assert {"lr/lm", "lr/projector", "lr/vision", "perf/samples_per_s", "perf/tokens_per_s",
            "perf/real_token_frac", "data/skipped"} <= set(m)
    report = json.loads((run_dir / "preflight.json").read_text())
    assert 0 < report["label_coverage"] < 1 and report["image_tokens"] == report["image_tokens_expected"] > 0


def test_the_exported_model_describes_images(run_dir):
    from mmlm import describe, load

    vlm, proc = load(run_dir / "model", device="cpu")
    assert proc.config.max_length == 160 and vlm.num_image_tokens == 4
    assert proc.config.image_placement == "after_text"
    out = describe([image()], model=(vlm, proc), max_new_tokens=4)
    assert isinstance(out[0], str)


def test_plot_draws_the_curves(run_dir, tmp_path, capsys):
    assert plot.main([str(run_dir)]) == 0
    png = run_dir / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 4 * 200
    assert plot.main([str(run_dir / "logs" / "version_0" / "metrics.csv"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    assert plot.main([str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_lightning_checkpoint_loads_on_its_own(run_dir):
    """The checkpoint carries the model config and processor: no shards needed to rebuild it."""
    from mmlm.training import VLMModule

    module = VLMModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.vlm is not None and module.processor.config.max_length == 160
    assert module.hparams.preset == "tiny" and module.hparams.stage == "full"


def test_progress_bar_reads_the_metrics_every_n_steps(monkeypatch):
    """Reading the bar's metrics syncs with the GPU (the loss is a device tensor): only every N steps."""
    from types import SimpleNamespace

    bar = fit.default_progress_bar(metrics_every=10)
    bar._metric_component = SimpleNamespace(update=lambda metrics: None)
    reads = []
    monkeypatch.setattr(type(bar), "get_metrics", lambda self, trainer, module: reads.append(trainer.global_step) or {})
    monkeypatch.setattr(type(bar), "is_enabled", property(lambda self: True))
    for step in range(1, 31):
        bar._update_metrics(SimpleNamespace(training=True, sanity_checking=False, global_step=step), None)
    bar._update_metrics(SimpleNamespace(training=False, sanity_checking=False, global_step=31), None)  # validation end
    assert reads == [10, 20, 30, 31]
