"""`mmlm quickstart` end to end at toy scale: data, training, evaluation, examples, results.json."""

import importlib.util
import json
from pathlib import Path

import pytest

from mmlm.cli.main import main
from mmlm.data.schema import iter_tar_records
from mmlm.quickstart import caption_exact_match, normalize_caption


def test_caption_exact_match_normalizes_case_space_and_period():
    assert normalize_caption("  A small red star  on the left. ") == "a small red star on the left"
    refs = {"1": ["a small red star"], "2": ["a large blue square"]}
    assert caption_exact_match({"1": "A small red star.", "2": "a large red square"}, refs) == 0.5


def test_quickstart_toy_scale(tmp_path, capsys):
    work = tmp_path / "qs"
    code = main(["quickstart", "--workdir", str(work), "--train-images", "64", "--test-images", "4",
                 "--max-steps", "2", "--seed", "3", "--no-progress"])
    assert code == 0
    results = json.loads((work / "results.json").read_text())
    for key in ("vqa_accuracy", "caption_exact_match", "cider", "train_seconds", "device", "learning_curve"):
        assert key in results, key
    assert 0.0 <= results["vqa_accuracy"] <= 1.0 and len(results["examples"]) == 4
    assert (work / "model" / "model.safetensors").is_file()
    # the stages, each from the previous one's model; the last one's run directory is the workdir
    stages = ["tiny-cpu", "tiny-cpu-vqa", "tiny-cpu-color", "tiny-cpu-where", "tiny-cpu-review"]
    assert list(results["train_seconds_per_stage"]) == stages == list(results["learning_curve"])
    for stage in stages[:-1]:
        assert (work / stage / "model" / "model.safetensors").is_file()
    # --seed reaches every stage (its saved run config) and the results
    assert results["seed"] == 3
    for run_dir in [work / s for s in stages[:-1]] + [work]:
        assert "seed_everything: 3\n" in (run_dir / "config.yaml").read_text(), run_dir
    assert set(results["vqa_per_question_type"]) == {"color", "shape", "size", "count", "position", "exists"}
    out = capsys.readouterr().out
    assert "VQA accuracy" in out and "truth:" in out
    # the benchmark's per-answer breakdown of the same run agrees with the per-type scores
    spec = importlib.util.spec_from_file_location("bench_qs", Path(__file__).parent.parent / "benchmarks/quickstart.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    by_answer = bench.per_answer(work)
    assert set(by_answer) == {"count", "exists", "size", "position"} and set(by_answer["exists"]) <= {"yes", "no"}
    for qtype, answers in by_answer.items():
        n = sum(k for _, k in answers.values())
        mean = sum(acc * k for acc, k in answers.values()) / n
        assert n == 4 and abs(mean - results["vqa_per_question_type"][qtype]) < 0.1, (qtype, answers)
    # ... and so does the breakdown by the number of objects in the image (read from the test captions;
    # checked against the objects the test shards list)
    by_objects = bench.per_scene_size(work)
    shards = sorted(str(p) for p in (work / "data" / "test").glob("*.tar"))
    sizes = sorted(str(len(r.meta["objects"])) for r in iter_tar_records(shards) if r.captions)
    assert len(sizes) == 4
    assert set(by_objects) == set(results["vqa_per_question_type"])
    for qtype, groups in by_objects.items():
        assert sorted(k for k, (_, n) in groups.items() for _ in range(n)) == sizes and set(groups) <= {"1", "2", "3"}
        mean = sum(acc * n for acc, n in groups.values()) / len(sizes)
        assert abs(mean - results["vqa_per_question_type"][qtype]) < 0.1, (qtype, groups)


def test_a_missing_recipe_fails_at_once_with_one_line(tmp_path, capsys):
    work = tmp_path / "qs"
    recipes = Path(__file__).parent.parent / "configs"
    assert main(["quickstart", "--workdir", str(work), "--recipes", str(recipes / "tiny-cpu.yaml"),
                 str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--recipes" in err and "no such recipe file" in err and len(err.splitlines()) == 1
    assert not work.exists()  # no data built, no first stage trained
    assert main(["quickstart", "--workdir", str(work), "--seed", "-1"]) == 2  # Lightning would draw a random seed
    err = capsys.readouterr().err.strip()
    assert "--seed" in err and len(err.splitlines()) == 1 and not work.exists()
    # two stages of the same name would share a run directory
    assert main(["quickstart", "--workdir", str(work), "--recipes", str(recipes / "tiny-cpu.yaml"),
                 str(recipes / "tiny-cpu.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "distinct file names" in err and len(err.splitlines()) == 1
    assert not work.exists()


def test_the_benchmark_runs_one_quickstart_per_seed(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_qs", Path(__file__).parent.parent / "benchmarks/quickstart.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "qs.json"
    code = bench.main(["--workdir", str(tmp_path / "w"), "--out", str(out), "--seeds", "4", "5", "--",
                       "--train-images", "32", "--test-images", "2", "--max-steps", "1", "--no-progress"])
    assert code == 1  # toy runs miss the targets
    summary = json.loads(out.read_text())
    assert [r["seed"] for r in summary["runs"]] == [4, 5] and summary["all_ok"] is False
    for seed in (4, 5):
        assert json.loads((tmp_path / "w" / f"seed-{seed}" / "results.json").read_text())["seed"] == seed
        assert (tmp_path / f"qs-seed{seed}.json").is_file()
    assert "worst" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a seed twice
        bench.main(["--seeds", "1", "1"])


def test_a_stopped_or_failed_training_is_one_line_and_its_exit_code(tmp_path, capsys, monkeypatch):
    """SIGTERM stops `mmlm fit` with 143 after saving last.ckpt: the quickstart says a re-run resumes (it raised
    a traceback); a failure points at the log above."""
    import mmlm.cli.fit

    work = tmp_path / "qs"
    for code, said in ((143, "training stopped by signal 15; re-run the same command to resume"),
                       (1, "error: training failed (mmlm fit exit code 1); its log is above")):
        monkeypatch.setattr(mmlm.cli.fit, "main", lambda argv, code=code: code)
        assert main(["quickstart", "--workdir", str(work), "--train-images", "8", "--test-images", "4",
                     "--no-progress"]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(said) and not any("Traceback" in line for line in err)
