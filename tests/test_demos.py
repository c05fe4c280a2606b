"""The demos run as scripts against a tiny checkpoint and agree with the public API."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from _tiny import tiny_checkpoint
from mmlm import describe, load

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    os.symlink(tiny_checkpoint(tmp_path_factory), root / "model")
    (root / "photos" / "more").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(root / "photos" / "red.png")
    Image.new("RGB", (30, 40), "blue").save(root / "photos" / "more" / "blue.jpg")
    return root


def test_demos_run(ckpt, tmp_path):
    root = ckpt
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}  # tiny model: threads only contend with the test process
    common = dict(cwd=REPO, env=env, capture_output=True, text=True)
    out = tmp_path / "captions.jsonl"
    red, blue = root / "photos" / "red.png", root / "photos" / "more" / "blue.jpg"
    questions = ["what color is the star?", "how many shapes are there?"]
    # one fresh interpreter runs both scripts as __main__ with their command lines (importing torch
    # twice would double the test's time)
    runs = [
        ["demos/describe_folder.py", str(root / "photos"), "--model", str(root / "model"), "--out", str(out),
         "--max-new-tokens", "6", "--device", "cpu"],
        ["demos/vqa_demo.py", "--model", str(root / "model"), str(red), str(blue), "--question", questions[0],
         "--question", questions[1], "--max-new-tokens", "6", "--device", "cpu"],
    ]
    driver = (
        "import json, runpy, sys\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    sys.argv = argv\n"
        "    print('=== ' + argv[0], flush=True)\n"
        "    try:\n"
        "        runpy.run_path(argv[0], run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        if e.code: raise\n"
    )
    proc = subprocess.run([sys.executable, "-c", driver, json.dumps(runs)], timeout=180, **common)
    assert proc.returncode == 0, proc.stderr
    v_out = proc.stdout.split("=== demos/vqa_demo.py\n")[1]

    pair = load(root / "model", device="cpu")
    rows = [json.loads(line) for line in out.read_text().split("\n") if line]
    assert [r["path"] for r in rows] == [str(blue), str(red)]  # recursive, sorted
    assert [r["text"] for r in rows] == describe([blue, red], model=pair, max_new_tokens=6)

    lines = v_out.rstrip("\n").split("\n")
    assert [c.strip() for c in lines[0].split("|")[1:4]] == ["image", "question", "answer"] and len(lines) == 2 + 4
    for q in questions:
        assert sum(q in line for line in lines) == 2
    assert lines[2].startswith("| red.png ") and lines[3].startswith("| blue.jpg")


@pytest.mark.parametrize("demo", ["describe_folder.py", "vqa_demo.py"])
def test_demos_say_how_to_run_them(demo):
    source = (REPO / "demos" / demo).read_text()
    doc = source.split('"""')[1]
    assert f"python demos/{demo}" in doc and "--model" in doc
    assert "import mmlm\n" in source and "from mmlm." not in source  # the public API only
