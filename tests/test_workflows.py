"""Multi-step researcher workflows of `mmlm fit`: gradient accumulation's logged loss, run lengths given
in epochs, a later stage's init_from (positions, a run directory), and a --ckpt_path of another stage."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from _tiny import tiny_config, tiny_tokenizer
from _training_kit import fit_args, read_metrics
from mmlm.cli import fit


class MicroBatchLosses(pl.Callback):
    """Writes each training micro-batch's own loss (un-normalised) to ``RUN_DIR/micro-losses.json``."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning hands back the loss divided by accumulate_grad_batches
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)

    def on_fit_end(self, trainer, pl_module):
        from pathlib import Path

        (Path(trainer.default_root_dir) / "micro-losses.json").write_text(json.dumps(self.losses))


def test_accumulated_train_loss_is_the_mean_of_the_window(tmp_path):
    """With accumulate_grad_batches 2, train/loss at a step was the window's last micro-batch alone (half
    the global batch); it is the mean over the window, the loss that step's update follows."""
    (tmp_path / "probe.yaml").write_text("trainer:\n  callbacks:\n    - class_path: test_workflows.MicroBatchLosses\n")
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--config", str(tmp_path / "probe.yaml"), "--trainer.accumulate_grad_batches", "2",
                             "--data.val", "null", steps=3)) == 0
    micro = json.loads((run / "micro-losses.json").read_text())
    logged = read_metrics(run)["train/loss"]
    assert len(micro) == 6 and sorted(logged) == [0, 1, 2]
    for step in range(3):
        a, b = micro[2 * step], micro[2 * step + 1]
        assert abs(a - b) > 1e-6  # the two micro-batches differ: the test tells the mean from either one
        assert logged[step] == pytest.approx((a + b) / 2, rel=1e-5), step


def test_max_epochs_on_the_endless_stream_is_refused_before_anything_is_written(tmp_path, capsys):
    """An epoch of the resampled stream never ends: --trainer.max_epochs 1 (meaning one pass over the data)
    ran for the recipe's max_steps instead, silently."""
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--trainer.max_epochs", "1", steps=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: trainer.max_epochs 1 does not bound the run") and "max_steps" in err[-1]
    assert not run.exists()


def test_init_from_a_run_directory_exits_2_before_anything_is_written(tmp_path, capsys):
    """--model.init_from RUN (not RUN/model): one line naming the model directory, and no run directory
    (config.yaml, logs) left behind for a run that never started."""
    other = tmp_path / "stage1"
    (other / "model").mkdir(parents=True)
    (other / "model" / "config.json").write_text("{}")
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--model.init_from", str(other))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --model.init_from:") and f"its model is {other / 'model'}" in err[-1]
    assert not run.exists()


def test_init_from_with_a_max_length_beyond_the_lm_s_positions_is_refused(tmp_path):
    """A later stage's max_length (instruct recipes: 2048) past a GPT-2's learned positions built a model
    that fails mid-run at the first long sample; a pretrained LM's build already refused it."""
    from mmlm import VLM, Processor
    from mmlm.checkpoint import save_pretrained
    from mmlm.training.build import build_model_and_processor

    tok = tiny_tokenizer()
    vlm = VLM(tiny_config(tok, lm="gpt2"))  # n_positions 256
    save_pretrained(tmp_path / "stage1", vlm, Processor.for_model(vlm, tok, max_length=128))
    with pytest.raises(ValueError, match=r"max_length=512 exceeds the LM's n_positions=256") as e:
        build_model_and_processor(init_from=tmp_path / "stage1", max_length=512)
    assert "\n" not in str(e.value)
    _, proc = build_model_and_processor(init_from=tmp_path / "stage1", max_length=256)
    assert proc.config.max_length == 256


def test_a_checkpoint_of_another_stage_in_ckpt_path_is_one_clear_line(tmp_path, capsys):
    """Resuming a stage-full checkpoint with --model.stage align: torch's "loaded state dict has a different
    number of parameter groups" becomes a line that says what differs and what to do."""
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--data.val", "null", steps=1)) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match="stage: 'align'"):
        code = fit.main(fit_args(run, "--data.val", "null", "--model.stage", "align", "--ckpt_path", "last", steps=2))
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: the checkpoint's optimizer trains other parameters (vision.")
    assert "--model.init_from RUN/model" in err[0]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1  # untouched


def test_the_vqa_suffix_a_run_trains_with_is_recorded_and_is_what_eval_asks_with(tmp_path):
    """data.vqa_suffix travels with the model (processor_config.json) and is `mmlm eval vqa`'s default suffix:
    a model trained without LLaVA's short-answer instruction was scored asking with it (0% on the run's own
    questions). A caption-only stage records nothing; a checkpoint without a record gets LLaVA's suffix."""
    import argparse

    from _training_kit import shards
    from mmlm.cli import eval as eval_cli
    from mmlm.cli.eval import recorded_vqa_suffix
    from mmlm.processing import DEFAULT_VQA_SUFFIX, PROCESSOR_CONFIG

    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--data.vqa_suffix", "Short answer.", "--data.val", "null", steps=1)) == 0
    assert json.loads((run / "model" / PROCESSOR_CONFIG).read_text())["vqa_suffix"] == "Short answer."
    assert recorded_vqa_suffix(run / "model") == "Short answer." and recorded_vqa_suffix(None) == DEFAULT_VQA_SUFFIX

    parser = argparse.ArgumentParser(prog="mmlm")
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval"
    args = parser.parse_args(["eval", "vqa", "--benchmark", "shards", "--shards", str(shards() / "val"), "--model",
                              str(run / "model"), "--limit", "2", "--device", "cpu", "--out", str(out),
                              "--no-progress", "--bootstrap", "0"])
    assert args.run(args) == 0
    assert json.loads((out / "metrics.json").read_text())["prompt_suffix"] == "Short answer."

    captions = tmp_path / "captions"
    assert fit.main(fit_args(captions, "--data.sample_mode", "caption", "--data.val", "null", steps=1)) == 0
    assert json.loads((captions / "model" / PROCESSOR_CONFIG).read_text())["vqa_suffix"] is None
    assert recorded_vqa_suffix(captions / "model") == DEFAULT_VQA_SUFFIX


def test_a_new_run_into_a_run_directory_with_a_run_in_it_is_refused(tmp_path, capsys):
    """Without --ckpt_path, a second run into RUN_DIR used to start from scratch, overwrite RUN_DIR/model and
    config.yaml, and leave its checkpoints (last-v1.ckpt) beside the first run's; a max_steps below the
    checkpoint's step trained nothing, re-exported the model and exited 0."""
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--data.val", "null", steps=2)) == 0
    before = (run / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert fit.main(fit_args(run, "--data.val", "null", steps=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {run} already holds a run (last.ckpt, model/)") and "--ckpt_path last" in err[-1]
    assert (run / "model" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]

    assert fit.main(fit_args(run, "--data.val", "null", "--ckpt_path", "last", steps=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --trainer.max_steps 1 is below the step the checkpoint reached (2,")
    assert (run / "model" / "model.safetensors").read_bytes() == before


def test_a_resumed_run_keeps_its_checkpoint_s_warmup_and_a_warmup_longer_than_the_run_warns(tmp_path):
    """A resumed run's learning-rate schedule is its checkpoint's, as the warning about changed settings says
    (a warmup given again, e.g. a recipe's default, used to restart a warmup mid-run)."""
    run = tmp_path / "a"
    with pytest.warns(UserWarning, match=r"the warmup \(100\) spans the whole run of 4 steps"):
        assert fit.main(fit_args(run, "--data.val", "null", steps=4)) == 0

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert fit.main(fit_args(full, "--data.val", "null", "--model.warmup", "2", steps=5)) == 0
    assert fit.main(fit_args(resumed, "--data.val", "null", "--model.warmup", "2", steps=3)) == 0
    with pytest.warns(UserWarning, match=r"warmup: 50.0 \(checkpoint: 2.0\).*schedule \(warmup, min_lr_ratio\) "
                                         "continue from the checkpoint"):
        assert fit.main(fit_args(resumed, "--data.val", "null", "--model.warmup", "50", "--ckpt_path", "last",
                                 steps=5)) == 0
    a, b = read_metrics(full)["lr/lm"], read_metrics(resumed)["lr/lm"]
    assert sorted(b) == sorted(a) == [0, 1, 2, 3, 4]
    # step 4 follows the checkpoint's 2-step warmup redrawn over 5 steps (as the full run), not a 50-step warmup
    # (0.04x of the peak; step 3 still runs at the rate the checkpoint's scheduler set for it)
    assert b[4] == pytest.approx(a[4], rel=1e-6) and b[4] > 0.2 * max(a.values())


def test_a_learning_rate_for_a_frozen_part_warns(tmp_path):
    with pytest.warns(UserWarning, match="model.vision_lr is set but stage 'instruct' keeps the vision frozen"):
        assert fit.main(fit_args(tmp_path / "run", "--model.stage", "instruct", "--model.vision_lr", "1e-4",
                                 "--data.val", "null", steps=1)) == 0
