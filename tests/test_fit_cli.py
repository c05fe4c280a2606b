"""`mmlm fit` end to end (LightningCLI, the real data module, a tiny model), its errors, and `mmlm plot`."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
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
    # the module docstring's tables keep their lines (argparse reflowed them into one paragraph)
    assert "\n    RUN_DIR/checkpoints/last.ckpt " in out and "Exit codes: 0 done" in out


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
    # the README's recipe for the model of a checkpoint other than the final one; load() points at it
    import torch

    import mmlm

    with pytest.raises(FileNotFoundError, match=r"is a training checkpoint, not a model directory: .*load_from_checkpoint"):
        mmlm.load(run_dir / "checkpoints" / "last.ckpt")
    out = run_dir.parent / "from-last-ckpt"
    module.vlm.save_pretrained(out)
    module.processor.save_pretrained(out)
    vlm, _ = mmlm.load(out, device="cpu", dtype="float32")
    final, _ = mmlm.load(run_dir / "model", device="cpu", dtype="float32")  # last.ckpt holds the final step
    assert all(torch.equal(a, b) for a, b in zip(vlm.state_dict().values(), final.state_dict().values()))


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


def test_progress_bar_counts_optimizer_steps_to_max_steps_not_epochs(monkeypatch):
    """The endless stream has no epochs: the training bar reads "Training (steps)" and global_step of
    max_steps (Lightning's own showed "Epoch 0/-2", and batch_idx of the remaining steps: 400/200 on a
    resume that extends a run)."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    bar = fit.default_progress_bar()
    updates = []  # what Lightning's own _update is asked to show (its body differs across 2.6.x)
    monkeypatch.setattr(RichProgressBar, "_update", lambda self, task, current, *a, **k: updates.append((task, current)))
    bar._trainer = SimpleNamespace(max_steps=400, global_step=250, max_epochs=-1, num_training_batches=float("inf"))
    bar.train_progress_bar_id, bar.val_progress_bar_id = 0, 1
    assert bar.total_train_batches == 400
    description = bar._get_train_description(1)
    assert "Epoch" not in description and description.strip() == "Training (steps)"
    bar._update(0, 201)  # Lightning passes batch_idx + 1 of this epoch: the bar shows the optimizer step
    bar._update(1, 7)  # the validation bar keeps its batch count
    assert updates == [(0, 250), (1, 7)]


def test_best_checkpoints_are_ranked_by_their_own_step_s_validation(tmp_path):
    """Checkpoint and validation every 2 steps: best-step=N.ckpt is scored by the validation after step N
    (Lightning's ModelCheckpoint saved before it and used the previous validation's val/loss)."""
    import torch

    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--checkpoint.save_top_k", "-1", steps=4)) == 0
    val = read_metrics(run)["val/loss"]  # logged at the step index of the last batch (N - 1)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    (scores,) = [s["best_k_models"] for k, s in state.items() if k.startswith("ModelCheckpoint")]
    assert sorted(Path(p).name for p in scores) == ["best-step=2.ckpt", "best-step=4.ckpt"]
    for path, score in scores.items():
        step = int(Path(path).stem.split("=")[1])
        assert abs(float(score) - val[step - 1]) < 1e-6, (path, float(score), val)


class CrashAt(pl.Callback):
    """Raises (a crash: no signal, no checkpoint of its own) before global step ``step``."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_last_checkpoint_is_written_every_n_steps_without_validation_data(tmp_path):
    """No val (the LLaVA recipes): last.ckpt every checkpoint.every_n_train_steps all the same (Lightning's
    ModelCheckpoint waited for a val/loss that never came: a crash lost the whole run)."""
    import torch

    (tmp_path / "crash.yaml").write_text("trainer:\n  callbacks:\n    - class_path: test_fit_cli.CrashAt\n"
                                         "      init_args: {step: 3}\n")
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit.main(fit_args(run, "--data.val", "null", "--config", str(tmp_path / "crash.yaml"), steps=6))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # nothing to rank by
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2


def test_last_checkpoint_holds_the_final_step(tmp_path):
    """max_steps not a multiple of every_n_train_steps: last.ckpt is the final step's (it stayed at the last
    periodic save, so extending the run with --ckpt_path last went back to it)."""
    import torch

    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--checkpoint.every_n_train_steps", "2", steps=3)) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["VLMDataModule"]["ranks"]["0"]["batches"] == 3


def test_more_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    """Trainer values Lightning divides by, a --ckpt_path that is no checkpoint, Lightning's own
    MisconfigurationException (they raised tracebacks), missing or empty shard paths (checked after the
    tokenizer and the pre-flight): one line, exit 2, no run directory."""
    bad_ckpt = tmp_path / "notes.json"
    bad_ckpt.write_text("{}")
    (tmp_path / "no-shards").mkdir()
    (tmp_path / "captions.jsonl").write_text('{"image": "a.jpg", "caption": "a cat"}\n')  # the input, not shards
    cases = [
        (("--data.train", str(tmp_path / "missing")), "data.train: no such shard or directory"),
        (("--data.val", str(tmp_path / "no-shards")), "data.val: source0: ["),
        (("--data.val", str(tmp_path / "no-shards")), "matches no .tar shard (or --data.val null: no validation)"),
        (("--data.train", str(tmp_path / "captions.jsonl")), "captions.jsonl is not a tar shard (build shards"),
        (("--trainer.accumulate_grad_batches", "0"), "trainer.accumulate_grad_batches must be >= 1"),
        (("--trainer.val_check_interval", "0"), "trainer.val_check_interval must be > 0"),
        (("--ckpt_path", str(tmp_path / "missing.ckpt")), "no such checkpoint file"),
        (("--ckpt_path", str(bad_ckpt)), "is not a checkpoint mmlm can read"),
        (("--ckpt_path", "best"), "--ckpt_path best: a new run has no best checkpoint to resume; pass `last`"),
        (("--checkpoint.every_n_train_steps", "-1"), "every_n_train_steps=-1"),
        (("--trainer.strategy", "ddp_spawn"), "trainer.strategy ddp_spawn is not supported: use ddp"),
        (("--checkpoint.dirpath", str(bad_ckpt / "ckpts")), f"--checkpoint.dirpath {bad_ckpt / 'ckpts'}: {bad_ckpt} "
                                                              "is not a directory"),
    ]
    for i, (args, message) in enumerate(cases):
        run = tmp_path / f"run{i}"
        assert fit.main(fit_args(run, *args, steps=1)) == 2, args
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("error:")]
        assert message in line and "Traceback" not in err, (args, err[-500:])
    assert not any((tmp_path / f"run{i}").exists() for i in range(len(cases)))  # checked before any file is written

    # a misspelt option: a short usage, the error, and the option it may have meant (not 120 lines of usage)
    assert fit.main(fit_args(tmp_path / "typo", "--data.trian", "x", "--model.lrr=3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 3 and err[0].startswith("usage: mmlm fit [--config FILE.yaml")
    assert err[-1] == "error: unrecognized arguments: --data.trian x --model.lrr=3 (did you mean --data.train, --model.lr?)"


def test_an_unwritable_run_directory_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import os

    from mmlm.cli import fit_checks

    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(fit_checks.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    with pytest.raises(ValueError, match=r"--checkpoint.dirpath .*: cannot write in .*ro \(read-only"):
        fit_checks.check_writable(ro / "run" / "checkpoints", "--checkpoint.dirpath")
    assert fit.main(fit_args(ro / "run", steps=1)) == 2
    assert "--trainer.default_root_dir" in capsys.readouterr().err and not (ro / "run").exists()


def test_a_validation_interval_longer_than_the_run_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"no validation will run: trainer.val_check_interval 50 training batches "
                                         r"is more than the run's 4 \(max_steps 2 x accumulate_grad_batches 2\)"):
        assert fit.main(fit_args(tmp_path / "run", "--trainer.val_check_interval", "50",
                                 "--trainer.accumulate_grad_batches", "2", steps=2)) == 0


def test_flex_attention_on_a_cpu_is_refused_before_the_first_step(tmp_path, capsys):
    """torch has no FlexAttention backward on a CPU: one line naming the fix, not a traceback from the
    first step's backward."""
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--model.model_overrides.text.attn_implementation", "flex_attention", steps=1)) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "flex_attention trains on a GPU only" in line and "attn_implementation sdpa" in line
    assert "Traceback" not in err
    assert not run.exists()  # refused in set-up: the directory it created (configs only) is removed


def test_an_error_in_a_loader_worker_is_reported_in_one_line(tmp_path, capsys):
    """The data error budget trips in a DataLoader worker (num_workers > 0, every recipe's setting): torch
    re-raises it with the worker's traceback in the message, which `error:` printed whole."""
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--data.max_length", "6", "--data.min_samples", "4", workers=1)) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: data error budget exceeded") and "too_long" in line
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_a_validation_set_past_its_error_budget_keeps_the_steps_trained(tmp_path, capsys):
    """The sanity check reads one batch, so a messy data.val stops the run at its first real validation,
    before the step's checkpoint (which waits for that validation) was written: last.ckpt is saved first."""
    from mmlm.data.writer import ShardWriter

    val = tmp_path / "val"
    with ShardWriter(val, max_count=64) as w:
        for i in range(24):  # one sample in three has no image that decodes
            members = {"txt": "a red star", "png": _png()} if i % 3 else {"txt": "a red star", "png": b"not an image"}
            w.write_members(f"v{i:03d}", members)
    run = tmp_path / "run"
    rc = fit.main(fit_args(run, "--data.val", str(val), "--data.min_samples", "4", steps=4))
    err = capsys.readouterr().err
    assert rc == 1 and "data error budget exceeded" in err
    assert "data.val is past its error budget: saved" in err and "resume with --ckpt_path last" in err
    import torch

    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (24, 24), "red").save(buf, format="PNG")
    return buf.getvalue()


class DiskFullAt(pl.Callback):
    """Raises the OSError a full disk gives at the end of training batch 2."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/last.ckpt")


def test_a_write_error_during_the_run_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "full.yaml").write_text("trainer:\n  callbacks:\n    - class_path: test_fit_cli.DiskFullAt\n")
    assert fit.main(fit_args(tmp_path / "run", "--config", str(tmp_path / "full.yaml"), steps=4)) == 1
    err = capsys.readouterr().err
    assert "error: OSError: [Errno 28] No space left on device: '/ckpt/last.ckpt'" in err and "Traceback" not in err


def test_init_from_with_a_max_length_past_the_lm_s_positions_is_refused_before_set_up(run_dir, tmp_path, capsys):
    """Found with the arguments (it was found when the model was built: after a multi-process start)."""
    out = tmp_path / "stage2"
    assert fit.main(fit_args(out, "--model.init_from", str(run_dir / "model"), "--model.max_length", "100000",
                             steps=1)) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "max_length=100000 exceeds the LM's max_position_embeddings=" in line and not out.exists()
