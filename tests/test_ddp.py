"""Two processes (DDP, gloo, CPU) through the same `mmlm fit` command line: the ranks read different
data (disjoint shares of the training shards, resampled per rank; disjoint validation shares that
cover the validation set together) and end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _training_kit import REPO, TESTS_DIR, fit_args

RECORDER = "trainer:\n  callbacks:\n    - class_path: _training_kit.SampleRecorder\n"


def run_ddp(tmp_path, steps: int, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    (tmp_path / "recorder.yaml").write_text(RECORDER)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmlm.cli.main", "fit",
           *fit_args(run, "--config", str(tmp_path / "recorder.yaml"), "--trainer.strategy", "ddp",
                     "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "1.0",
                     *extra, steps=steps, workers=0)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check(tmp_path, proc, steps: int, batch_size: int = 4, resumed_from: int = 0):
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    r0 = json.loads((run / "probe-rank0.json").read_text())
    r1 = json.loads((run / "probe-rank1.json").read_text())
    assert r0["step"] == r1["step"] == steps
    assert len(r0["train"]) == len(r1["train"]) == steps - resumed_from
    assert all(len(b) == batch_size for b in r0["train"] + r1["train"])
    # each rank resamples its own share of the training shards: the ranks train on disjoint samples
    seen0 = {k for b in r0["train"] for k in b}
    seen1 = {k for b in r1["train"] for k in b}
    assert seen0 and seen1 and not seen0 & seen1
    # a validation pass splits the validation set: disjoint shares that cover all of it (4 images x 7 samples)
    assert r0["val"] and r1["val"] and not set(r0["val"]) & set(r1["val"])
    assert len(set(r0["val"]) | set(r1["val"])) == len(r0["val"]) + len(r1["val"]) == 28
    assert r0["weights"] == r1["weights"], "the ranks ended with different weights"
    assert (run / "model" / "model.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_ddp_two_cpu_processes(tmp_path):
    check(tmp_path, run_ddp(tmp_path, 2), 2)


@pytest.mark.slow
def test_ddp_two_cpu_processes_longer_with_validation_and_resume(tmp_path):
    proc = run_ddp(tmp_path, 6)
    check(tmp_path, proc, 6)
    proc = run_ddp(tmp_path, 8, "--ckpt_path", "last")
    check(tmp_path, proc, 8, resumed_from=6)


@pytest.mark.slow
def test_ddp_sigterm_to_one_rank_at_a_validation_step_saves_after_it_and_resumes(tmp_path):
    """SIGTERM to rank 1 only, after step 2 with a validation due: both ranks run it, the checkpoint is written
    at its end, the job exits 143, and the resumed run trains steps 3-4 on both ranks."""
    import torch

    (tmp_path / "kill.yaml").write_text(RECORDER + "    - class_path: _training_kit.KillAt\n"
                                        "      init_args: {step: 2, rank: 1}\n")
    proc = run_ddp(tmp_path, 4, "--config", str(tmp_path / "kill.yaml"))
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    assert "interrupted by SIGTERM" in proc.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert state["best_model_path"].endswith("best-step=2.ckpt")  # the validation ran before the save
    check(tmp_path, run_ddp(tmp_path, 4, "--ckpt_path", "last"), 4, resumed_from=2)


def test_a_rank_whose_validation_share_is_all_skipped_does_not_hang_the_run(tmp_path):
    """Two val samples, the second corrupt: rank 1's share is all skipped, so it has no validation batch. DDP's
    buffer broadcast in the first validation forward and the val/loss sync left rank 0 waiting for it forever;
    val/loss is now reduced by one collective every rank makes."""
    import csv
    import io
    import tarfile

    from PIL import Image

    img = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(img, "PNG")
    val = tmp_path / "val"
    val.mkdir()
    with tarfile.open(val / "val-000000.tar", "w") as tar:
        for name, data in (("a.png", img.getvalue()), ("a.txt", b"a red square"), ("b.png", b"junk"),
                           ("b.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    proc = run_ddp(tmp_path, 2, "--data.val", str(val), "--data.max_bad_fraction", "null", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")))
    assert [r["val/loss"] for r in rows if r.get("val/loss")], "no val/loss logged"
