"""Exact resume: N steps, SIGTERM (checkpoint + exit 143), `--ckpt_path last` for N more == 2N
uninterrupted: same samples (the data module's state, with DataLoader workers), same losses, learning
rates, RNG draws and final weights (optimizer, scheduler, step and RNG restored)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from _training_kit import fit_args, read_metrics, shards
from mmlm.cli import fit

STEPS = 6
PROBE = "trainer:\n  callbacks:\n    - class_path: _training_kit.RngProbe\n"
KILL = PROBE + "    - class_path: _training_kit.KillAt\n      init_args: {step: 3}\n"


def test_resume_after_sigterm_matches_an_uninterrupted_run(tmp_path):
    (tmp_path / "probe.yaml").write_text(PROBE)
    (tmp_path / "kill.yaml").write_text(KILL)
    args = dict(steps=STEPS, workers=2)

    full = tmp_path / "full"
    assert fit.main(fit_args(full, "--config", str(tmp_path / "probe.yaml"), **args)) == 0

    run = tmp_path / "resumed"
    assert fit.main(fit_args(run, "--config", str(tmp_path / "kill.yaml"), **args)) == 128 + 15  # SIGTERM
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "model").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and "mmlm" in ckpt and ckpt["mmlm"]["processor"]
    assert fit.main(fit_args(run, "--config", str(tmp_path / "probe.yaml"), "--ckpt_path", "last", **args)) == 0

    a, b = read_metrics(full), read_metrics(run)
    assert sorted(a["train/loss"]) == sorted(b["train/loss"]) == list(range(STEPS))
    for key in ("train/loss", "lr/lm", "probe/rng", "perf/real_token_frac"):
        for step in range(STEPS):
            assert abs(a[key][step] - b[key][step]) <= 1e-6 * max(1.0, abs(a[key][step])), (key, step)
    wa, wb = load_file(full / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)


def test_resume_from_a_file_or_last_keeps_the_options_given_and_names_the_changed_ones(tmp_path):
    """Lightning replaced the --model options with the checkpoint's hyperparameters for a checkpoint
    file but not for `last`: both now run with the options given, and a warning names each one that
    differs from the checkpoint's run (none when they agree)."""
    from mmlm.training.checks import hparam_changes

    run = tmp_path / "run"
    assert fit.main(fit_args(run, steps=2)) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    for where, old, new, steps in ((str(ckpt), 10, 3, 3), ("last", 3, 5, 4)):
        with pytest.warns(UserWarning, match=rf"max_nonfinite: {new} \(checkpoint: {old}\)") as caught:
            assert fit.main(fit_args(run, "--ckpt_path", where, "--model.max_nonfinite", str(new), steps=steps)) == 0
        assert sum("other than the checkpoint's run" in str(w.message) for w in caught) == 1
        # a longer run redraws the schedule: said, with the jump it makes
        assert sum(f"schedule now spans {steps} steps where the checkpoint's run had {steps - 1}" in str(w.message)
                   for w in caught) == 1
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert saved["global_step"] == steps and saved["hyper_parameters"]["max_nonfinite"] == new  # as given
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fit.main(fit_args(run, "--ckpt_path", "last", "--model.max_nonfinite", "5", steps=5)) == 0
    assert not [w for w in caught if "other than the checkpoint's run" in str(w.message)]  # the same: silent
    assert hparam_changes({"lr": 1e-3, "betas": [0.9, 0.98], "_instantiator": "x"},
                          {"lr": 1e-3, "betas": (0.9, 0.98)}) == []
    assert hparam_changes({"lr": 1e-3}, {"lr": 1e-4}) == ["lr: 0.0001 (checkpoint: 0.001)"]


def test_schedule_change_says_what_a_longer_run_does_to_the_learning_rate():
    from mmlm.training.module import schedule_change

    assert schedule_change(6, 6, 6, 2, 0.1) is None
    msg = schedule_change(6, 6, 12, 2, 0.1)  # the end of a 6-step cosine (0.1x) -> 40% into the cosine of a 12-step one
    assert "spans 12 steps where the checkpoint's run had 6" in msg and "from 0.1x to 0.689x of its peak" in msg


def test_a_longer_resumed_run_trains_its_first_step_at_the_redrawn_schedule_s_rate(tmp_path):
    """The restored optimizer holds the old schedule's rate for the resumed step; the new one's is used."""
    from mmlm.training.optim import resolve_warmup, warmup_cosine

    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--model.warmup", "2", steps=4)) == 0
    assert fit.main(fit_args(run, "--model.warmup", "2", "--ckpt_path", "last", steps=8)) == 0
    lrs = read_metrics(run)["lr/lm"]
    for step in range(4, 8):  # tiny-cpu: lr 5e-4, min_lr_ratio 0.1
        want = 5e-4 * warmup_cosine(8, resolve_warmup(2, 8), 0.1)(step)
        assert abs(lrs[step] - want) <= 1e-6 * want, (step, lrs[step], want)


def test_ckpt_path_last_without_a_checkpoint_starts_fresh(tmp_path, capsys):
    run = tmp_path / "fresh"
    assert fit.main(fit_args(run, "--ckpt_path", "last", steps=1)) == 0
    assert "starting a fresh run" in capsys.readouterr().err
    assert (run / "model" / "model.safetensors").is_file()


def test_resume_from_a_checkpoint_saved_at_a_validation_s_end(tmp_path):
    """A step's checkpoint waits for the validation right after it (``val_check_interval`` ==
    ``every_n_train_steps``): it must hold the training RNG stream, not what validation left of it."""
    (tmp_path / "probe.yaml").write_text(PROBE)
    full = tmp_path / "full"
    args = ("--config", str(tmp_path / "probe.yaml"), "--checkpoint.save_top_k", "-1")
    assert fit.main(fit_args(full, *args, steps=4)) == 0
    at_2 = full / "checkpoints" / "best-step=2.ckpt"  # saved at the end of step 2's validation
    assert torch.load(at_2, map_location="cpu", weights_only=True)["global_step"] == 2

    run = tmp_path / "resumed"
    assert fit.main(fit_args(run, *args, "--ckpt_path", str(at_2), steps=4)) == 0
    a, b = read_metrics(full), read_metrics(run)
    assert sorted(b["train/loss"]) == [2, 3]
    for key in ("probe/rng", "train/loss", "val/loss"):
        for step in b[key]:
            assert abs(a[key][step] - b[key][step]) <= 1e-6 * max(1.0, abs(a[key][step])), (key, step)


def test_sigterm_before_the_first_periodic_checkpoint_then_resume_keeps_one_last_ckpt(tmp_path):
    """The signal's last.ckpt is the checkpoint callback's last checkpoint: the resumed run overwrites it
    (it used to write last-v1.ckpt and leave a stale last.ckpt beside it)."""
    (tmp_path / "kill.yaml").write_text("trainer:\n  callbacks:\n    - class_path: _training_kit.KillAt\n"
                                        "      init_args: {step: 1}\n")
    run = tmp_path / "run"
    args = ("--checkpoint.every_n_train_steps", "100")
    assert fit.main(fit_args(run, "--config", str(tmp_path / "kill.yaml"), *args, steps=3)) == 128 + 15
    assert fit.main(fit_args(run, "--ckpt_path", "last", *args, steps=3)) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3


def test_sigterm_at_a_step_with_a_validation_due_runs_it_before_stopping(tmp_path):
    """SIGTERM at step 2 (val_check_interval 2): the validation due there runs, last.ckpt is written at its end
    (after the checkpoint callback ranked best-step=2), and the resumed run validates at step 4 only. Stopping
    before it lost step 2's validation for good: Lightning does not run it when resuming from that step."""
    (tmp_path / "probe.yaml").write_text(PROBE)
    (tmp_path / "kill.yaml").write_text(KILL.replace("{step: 3}", "{step: 2}"))
    full = tmp_path / "full"
    assert fit.main(fit_args(full, "--config", str(tmp_path / "probe.yaml"), steps=4)) == 0

    run = tmp_path / "resumed"
    assert fit.main(fit_args(run, "--config", str(tmp_path / "kill.yaml"), steps=4)) == 128 + 15
    assert sorted(read_metrics(run)["val/loss"]) == [1]  # the validation after step 2 (logged at step 1)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert state["best_model_path"].endswith("best-step=2.ckpt")  # saved after the checkpoint callback's ranking

    assert fit.main(fit_args(run, "--config", str(tmp_path / "probe.yaml"), "--ckpt_path", "last", steps=4)) == 0
    a, b = read_metrics(full), read_metrics(run)
    assert sorted(a["val/loss"]) == sorted(b["val/loss"]) == [1, 3] and sorted(b["train/loss"]) == [0, 1, 2, 3]
    for key in ("train/loss", "val/loss", "probe/rng"):
        for step in a[key]:
            assert abs(a[key][step] - b[key][step]) <= 1e-6 * max(1.0, abs(a[key][step])), (key, step)
    versions = sorted(run.glob("logs/version_*/metrics.csv"))
    assert len(versions) == 2 and "val/loss" in versions[1].read_text()  # step 4's, in the resumed run's log


class KillInValidation(pl.Callback):
    """Sends SIGTERM to this process during the first validation's first batch."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        import os
        import signal

        if not trainer.sanity_checking and trainer.global_step == 2 and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_a_validation_saves_at_its_end(tmp_path):
    (tmp_path / "kill.yaml").write_text("trainer:\n  callbacks:\n    - class_path: test_resume.KillInValidation\n")
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--config", str(tmp_path / "kill.yaml"), steps=4)) == 128 + 15
    assert sorted(read_metrics(run)["val/loss"]) == [1] and sorted(read_metrics(run)["train/loss"]) == [0, 1]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    assert fit.main(fit_args(run, "--ckpt_path", "last", steps=4)) == 0
    assert sorted(read_metrics(run)["train/loss"]) == [0, 1, 2, 3] and sorted(read_metrics(run)["val/loss"]) == [1, 3]


class CrashOnBatch(pl.Callback):
    """Raises (a crash, no checkpoint) at the start of this run's ``n``-th training batch."""

    def __init__(self, n: int = 2):
        self.n, self.seen = n, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += 1
        if self.seen == self.n:
            raise RuntimeError("simulated crash")


def test_a_resumed_accumulating_run_saves_no_checkpoint_inside_an_accumulation_window(tmp_path):
    """Resumed at a checkpointed step with gradient accumulation, the first micro-batch does not step the
    optimizer: a checkpoint there would hold its data position but not its gradient."""
    run = tmp_path / "run"
    acc = ("--trainer.accumulate_grad_batches", "2", "--data.val", "null")
    assert fit.main(fit_args(run, *acc, steps=2)) == 0
    (tmp_path / "crash.yaml").write_text("trainer:\n  callbacks:\n    - class_path: test_resume.CrashOnBatch\n"
                                         "      init_args: {n: 2}\n")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit.main(fit_args(run, *acc, "--config", str(tmp_path / "crash.yaml"), "--ckpt_path", "last", steps=4))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["VLMDataModule"]["ranks"]["0"]["batches"] == 4


class SignalAtBatch(pl.Callback):
    """Sends ``sig`` to this process (``group``: to its process group, DataLoader workers included, as Ctrl-C in a
    terminal does) at the end of training batch ``n`` (1-based, micro-batches counted)."""

    def __init__(self, n: int = 3, sig: str = "SIGTERM", group: bool = False):
        self.n, self.seen, self.sig, self.group = n, 0, sig, group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        self.seen += 1
        if self.seen == self.n:
            if self.group:
                os.killpg(os.getpgid(0), getattr(signal, self.sig))
            else:
                os.kill(os.getpid(), getattr(signal, self.sig))


def test_sigterm_inside_an_accumulation_window_saves_at_the_window_s_end(tmp_path):
    """A signal after the first micro-batch of a window: the save waits for the window's optimizer step (it
    saved at once, with the micro-batch's data consumed and its gradient lost: an inexact resume)."""
    run = tmp_path / "run"
    acc = ("--trainer.accumulate_grad_batches", "2", "--data.val", "null")
    (tmp_path / "sig.yaml").write_text("trainer:\n  callbacks:\n    - class_path: test_resume.SignalAtBatch\n"
                                       "      init_args: {n: 3}\n")
    assert fit.main(fit_args(run, *acc, "--config", str(tmp_path / "sig.yaml"), steps=4)) == 128 + 15
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["VLMDataModule"]["ranks"]["0"]["batches"] == 4


class SignalJobAt(pl.Callback):
    """After global step ``step``, another process sends SIGTERM to this process and to its DataLoader
    workers: what a cluster does when it stops a job (SLURM signals every process of the job step). (A
    SIGTERM from the training process itself is one torch's workers take as a request to exit cleanly.)"""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import multiprocessing
            import os
            import subprocess
            import sys

            workers = [str(p.pid) for p in multiprocessing.active_children()]
            assert workers, "the run has no DataLoader workers to signal"
            subprocess.run([sys.executable, "-c", "import os, signal, sys\n"
                            "for pid in sys.argv[1:]: os.kill(int(pid), signal.SIGTERM)", *workers, str(os.getpid())],
                           check=True)


def test_sigterm_to_every_process_of_the_job_saves_and_resumes(tmp_path):
    """The workers ignore the signal and the training process saves last.ckpt and exits 143 (a worker killed
    by it used to make the run fail with "DataLoader worker ... is killed by signal", with no checkpoint)."""
    (tmp_path / "kill.yaml").write_text("trainer:\n  callbacks:\n    - class_path: test_resume.SignalJobAt\n"
                                        "      init_args: {step: 2}\n")
    run = tmp_path / "run"
    assert fit.main(fit_args(run, "--config", str(tmp_path / "kill.yaml"), steps=4, workers=2)) == 128 + 15
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] in (2, 3)
    assert fit.main(fit_args(run, "--ckpt_path", "last", steps=4, workers=2)) == 0


def test_last_is_the_checkpoint_at_the_highest_step_not_the_newest_file(tmp_path):
    import os

    from mmlm.cli.fit_checks import find_last_checkpoint

    for name, step in (("last-v1.ckpt", 70), ("last.ckpt", 60)):
        torch.save({"global_step": step, "state_dict": {}}, tmp_path / name)
    (tmp_path / "last-v2.ckpt").write_bytes(b"torn")  # unreadable: ranks last
    os.utime(tmp_path / "last-v1.ckpt", (1, 1))  # a copy's times: the older step's file is newer
    assert find_last_checkpoint(tmp_path) == str(tmp_path / "last-v1.ckpt")
    assert find_last_checkpoint(tmp_path / "none") is None


def test_a_run_resumed_in_a_copied_directory_keeps_writing_last_ckpt(tmp_path):
    import shutil

    first = tmp_path / "a"
    assert fit.main(fit_args(first, "--data.val", "null", steps=2)) == 0
    copy = tmp_path / "b"
    shutil.copytree(first, copy)
    shutil.rmtree(copy / "model")
    assert fit.main(fit_args(copy, "--data.val", "null", "--ckpt_path", "last", steps=4)) == 0
    names = sorted(p.name for p in (copy / "checkpoints").glob("last*.ckpt"))
    assert names == ["last.ckpt"], names  # Lightning's own wrote last-v1.ckpt next to the old last.ckpt
    ckpt = torch.load(copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4


def test_a_torn_last_ckpt_is_a_one_line_error_naming_the_others(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit.main(fit_args(run, steps=2)) == 0
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    capsys.readouterr()
    assert fit.main(fit_args(run, "--ckpt_path", "last", steps=4)) == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last:" in err and "is not a checkpoint mmlm can read" in err and "best-step=" in err, err
    assert "Traceback" not in err


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, capsys):
    """Ctrl-C (SIGINT to the process group, loader workers included) stops after the step with last.ckpt, like
    SIGTERM (Lightning's own handling exited 1 without one); the run resumes."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    run = tmp_path / "run"
    (tmp_path / "int.yaml").write_text("trainer:\n  callbacks:\n    - class_path: test_resume.SignalAtBatch\n"
                                       "      init_args: {n: 2, sig: SIGINT, group: true}\n")
    # in a process group of its own, so that the SIGINT to the group reaches only the run and its workers
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {[str(p) for p in sys.path if p]!r}
        import _training_kit
        from pathlib import Path
        _training_kit._SHARDS = Path({str(shards())!r})  # this process's shards: the resume below reads them
        from _training_kit import fit_args
        from mmlm.cli import fit
        sys.exit(fit.main(fit_args({str(run)!r}, "--config", {str(tmp_path / "int.yaml")!r}, steps=4, workers=2)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          start_new_session=True, cwd=os.getcwd())
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "Ctrl-C: stopping after this step" in proc.stderr and "interrupted by SIGINT" in proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert fit.main(fit_args(run, "--ckpt_path", "last", steps=4, workers=2)) == 0


def test_a_refused_resume_keeps_the_run_s_config_yaml(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit.main(fit_args(run, steps=2)) == 0
    before = (run / "config.yaml").read_text()
    assert fit.main(fit_args(run, "--data.shuffle_buffer", "3", "--ckpt_path", "last", steps=4)) == 2
    assert "the training data options changed" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before  # it held the refused run's options


def test_resuming_a_lora_run_with_other_lora_settings_is_one_line(tmp_path, capsys):
    """It warned that training continues from the checkpoint, then died in Lightning's weight load (size
    mismatch of the adapters, a traceback, exit 1)."""
    pytest.importorskip("peft")
    run = tmp_path / "run"
    lora = ("--model.stage", "instruct", "--data.val", "null")
    assert fit.main(fit_args(run, *lora, "--model.lora", "{r: 4, lora_alpha: 8}", steps=2)) == 0
    capsys.readouterr()
    assert fit.main(fit_args(run, *lora, "--model.lora", "{r: 2, lora_alpha: 8}", "--ckpt_path", "last",
                             steps=4)) == 2
    err = capsys.readouterr().err
    assert "a resume needs the same LoRA settings" in err and "Traceback" not in err and "size mismatch" not in err
