"""benchmarks/: argument guards, fairness of the side-by-side timings, atomic result files, gpu.sh.

Fast checks of the benchmark scripts' own logic (nothing here times the library: speed is measured by
the scripts themselves, never asserted in tests)."""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script by name, with benchmarks/ on sys.path (the scripts import ``_common``)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


# ------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("script, argv, needle", [
    ("train_throughput", ["--batch-size", "0"], "--batch-size"),
    ("train_throughput", ["--repeats", "0"], "--repeats"),
    ("train_throughput", ["--preset", "nope"], "unknown preset"),
    ("train_throughput", ["--num-workers", "-1"], "--num-workers"),
    ("train_throughput", ["--threads", "-1"], "--threads"),
    ("train_throughput", ["--device", "tpu"], "--device"),
    ("padding", ["--batches", "0"], "--batches"),
    ("padding", ["--preset", "nope"], "unknown preset"),
    ("loader", ["--size", "abc"], "--size"),
    ("loader", ["--batches", "0"], "--batches"),
    ("resume", ["--at", "0"], "--at"),
    ("resume", ["--size", "10x10"], "--size"),
    ("generate", ["--new-tokens", "1"], "--new-tokens"),
    ("generate", ["--dtype", "float64x"], "--dtype"),
    ("generate", ["--batch", "0"], "--batch"),
    ("mfu", ["--steps", "0"], "--steps"),
    ("feature_cache", ["--batch-size", "0"], "--batch-size"),
    ("memory_estimate", ["--cases", "huge"], "--cases"),
    ("memory_estimate", ["--device", "cpu", "--precision", "bf16-mixed"], "--precision bf16-mixed needs"),
])
def test_bad_argument_is_a_one_line_error(bench, capsys, script, argv, needle):
    with pytest.raises(SystemExit) as exc:
        bench(script).main(argv + ["--no-save"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and ": error: " in err[-1] and needle in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_memory_estimate_runs_a_case_in_its_own_process(bench, capsys):
    """The child trains the case and reports its peak next to the estimate of the same model and batch."""
    pytest.importorskip("peft")
    bench("memory_estimate").main(["--cases", "tiny-lora", "--batch-size", "2", "--seq-len", "48", "--vocab", "512",
                                   "--steps", "1", "--device", "cpu", "--no-save"])
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("tiny-lora"))
    estimate, measured, ratio = (float(v) for v in row[1:4])
    assert estimate > 0 and measured > 0 and abs(measured / estimate - ratio) < 0.02 * ratio


def test_train_precision_is_one_the_plain_loops_reproduce(bench, capsys):
    """Lightning's 16-mixed or bf16-true against the plain loops' fp32 would compare two precisions."""
    tt = bench("train_throughput")
    for bad in ("16-mixed", "bf16-true", "16-foo"):
        with pytest.raises(SystemExit) as exc:
            tt.main(["--precision", bad, "--no-save"])
        assert exc.value.code == 2
        assert "--precision" in capsys.readouterr().err
    assert tt.make_parser().parse_args(["--precision", "bf16-mixed"]).precision == "bf16-mixed"


def test_quickstart_from_missing_results_is_a_clear_error(bench, capsys, tmp_path):
    assert bench("quickstart").main(["--from-results", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


# ------------------------------------------------------------------------------------------ fairness
def test_train_rounds_rotate_which_mode_runs_first(bench, monkeypatch, tmp_path):
    """Costs of the first run in a process that the warm-up steps miss must not always fall on the
    baseline (which ran first in every round)."""
    tt = bench("train_throughput")
    order = []

    class FakeVLM:
        def num_parameters(self):
            return 1

    class FakeSetup:
        def __init__(self, args):
            args.precision = args.precision or "32-true"
            self.device, self.vlm, self.shards, self.base_attn = "cpu", FakeVLM(), tmp_path, "sdpa"
            self.pack_rows, self.pack_length, self.mean_length = 2, 256, 50.0

    def fake_run(setup, mode, steps, on_step=None):
        order.append(mode)
        return {"samples_per_s": 10.0, "real_tokens_per_s": 100.0, "step_ms": 1.0, "data_wait_ms": 0.0,
                "samples_per_step": 16.0, "real_fraction": 0.9}

    monkeypatch.setattr(tt.T, "Setup", FakeSetup)
    monkeypatch.setattr(tt.T, "run_mode", fake_run)
    monkeypatch.setattr(tt, "quiet_lightning", lambda: None)
    assert tt.main(["--repeats", "3", "--no-memory", "--out", str(tmp_path / "r.json")]) == 0
    rounds = [order[i:i + 3] for i in range(0, 9, 3)]
    assert [r[0] for r in rounds] == ["plain_pad", "plain_packed", "mmlm"]
    assert all(sorted(r) == sorted(tt.MODES) for r in rounds)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["config"]["round_orders"] == rounds
    assert doc["system"]["versions"]["torch"] and doc["system"]["device"]


def test_loader_times_whole_rounds_of_workers(bench):
    """Workers start together and hand over their first batches together: counting from the first
    batch alone credited the other workers' first batches, made before the clock started, to the
    timed window (8 workers, 15 batches: ~1.9x the real rate)."""
    loader = bench("loader")
    workers, per_batch, round_s = 8, 16, 0.5
    now = [0.0]

    def batches(workers):  # every worker makes one batch per round_s; a round's batches arrive together
        i = 0
        while True:
            if i % max(1, workers) == 0:
                now[0] += round_s
            i += 1
            yield {"pixel_values": types.SimpleNamespace(shape=(per_batch, 3, 8, 8))}

    out = loader.timed_batches(batches(workers), num_workers=workers, batches=15, clock=lambda: now[0])
    assert out["batches"] == 16 and out["warmup_batches"] == workers
    assert out["images_per_s"] == pytest.approx(workers * per_batch / round_s)
    # in-process: one batch of warm-up, then exactly the batches asked for
    now[0] = 0.0
    one = loader.timed_batches(batches(0), num_workers=0, batches=5, clock=lambda: now[0])
    assert one["batches"] == 5 and one["warmup_batches"] == 1
    assert one["images_per_s"] == pytest.approx(per_batch / round_s)


def test_mfu_reports_the_datasheet_peak_the_references_use(bench):
    """The reference MFU figures (33-48% for LLM trainers on H100) are over the datasheet peak, not
    over the ~20% lower matmul peak measured in the run."""
    mfu = bench("mfu")
    assert mfu.datasheet_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert mfu.datasheet_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert mfu.datasheet_peak("NVIDIA H200") == pytest.approx(989.4e12)
    assert mfu.datasheet_peak("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert mfu.datasheet_peak("AMD EPYC") is None and mfu.datasheet_peak(None) is None


# ------------------------------------------------------------------------------------------ result files
def test_quickstart_result_file_is_written_atomically(bench, monkeypatch, tmp_path):
    qs = bench("quickstart")
    results = tmp_path / "run" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"vqa_accuracy": 0.96, "caption_exact_match": 0.9, "total_seconds": 500.0}))
    monkeypatch.setattr(qs, "git_commit", lambda: None)
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(qs.os, "replace", spy)
    out = tmp_path / "out" / "qs.json"
    assert qs.main(["--from-results", str(results), "--out", str(out)]) == 0
    assert replaced and replaced[-1][1] == out and replaced[-1][0].parent == out.parent
    assert json.loads(out.read_text())["all_ok"] is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["qs.json"]


# ------------------------------------------------------------------------------------------ gpu.sh
def _fake_python(tmp_path) -> Path:
    """A ``python3`` that says webdataset imports, logs every run and prints two kinds of warning."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "python3"
    exe.write_text("#!/bin/sh\n"
                   'if [ "$1" = "-c" ]; then exit 0; fi\n'
                   f'echo "$@" >> {tmp_path}/ran\n'
                   'echo "warning: mmlm and transformers produced different tokens"\n'
                   'echo "/x/y.py:3: UserWarning: something from a library"\n'
                   'echo "    warnings.warn("\n')
    exe.chmod(0o755)
    return bin_dir


def _gpu_sh(tmp_path, *jobs):
    env = {**os.environ, "PATH": f"{_fake_python(tmp_path)}:{os.environ['PATH']}"}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(BENCH / "gpu.sh"), *jobs], capture_output=True, text=True, env=env,
                          timeout=60)


def test_gpu_sh_checks_every_job_name_before_running_any(tmp_path):
    proc = _gpu_sh(tmp_path, "mfu", "nope")
    assert proc.returncode == 2 and "unknown job nope" in proc.stderr
    assert not (tmp_path / "ran").exists()  # mfu did not run first


def test_gpu_sh_keeps_the_benchmarks_own_warnings(tmp_path):
    proc = _gpu_sh(tmp_path, "mfu")
    assert proc.returncode == 0, proc.stderr
    assert "benchmarks/mfu.py" in (tmp_path / "ran").read_text()
    assert "warning: mmlm and transformers produced different tokens" in proc.stdout
    assert "UserWarning" not in proc.stdout and "warnings.warn" not in proc.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_gpu_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0
