"""Exact resume: N steps, SIGTERM (checkpoint + exit 143), `--ckpt_path last` for N more == 2N
uninterrupted: same samples (the data module's state, with DataLoader workers), same losses, learning
rates, RNG draws and final weights (optimizer, scheduler, step and RNG restored)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from _training_kit import fit_args, read_metrics
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


def test_ckpt_path_last_without_a_checkpoint_starts_fresh(tmp_path, capsys):
    run = tmp_path / "fresh"
    assert fit.main(fit_args(run, "--ckpt_path", "last", steps=1)) == 0
    assert "starting a fresh run" in capsys.readouterr().err
    assert (run / "model" / "model.safetensors").is_file()
