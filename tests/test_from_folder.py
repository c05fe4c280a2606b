"""data_pipelines.from_folder: a folder of images with .txt / .json sidecars, on tiny inputs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from _builders_kit import OPTS, read_samples, skipped_lines
from data_pipelines import from_folder
from data_pipelines import inspect as inspect_cli

CONV = [{"from": "human", "value": "<image>\nwhat is here?"}, {"from": "gpt", "value": "a chat"}]


def _image(path: Path, fmt: str = "PNG", color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), color).save(path, format=fmt)
    return path


def _skipped(out: Path) -> dict[str, tuple[str, str]]:
    return {d["key"]: (d["reason"], d["detail"]) for d in skipped_lines(out)}


@pytest.fixture()
def photos(tmp_path) -> Path:
    """8 images (nested; 3 of them skipped) plus files that are no sample at all."""
    d = tmp_path / "photos"
    _image(d / "anim.gif", "GIF", (0, 0, 255))
    (d / "anim.txt").write_text("a blue gif")
    _image(d / "both.jpg", "JPEG")
    (d / "both.txt").write_text("from the txt\n")
    (d / "both.json").write_text(json.dumps({"caption": "from the json", "url": "http://x/both.jpg"}))
    _image(d / "cat.jpg", "JPEG")
    (d / "cat.txt").write_bytes("\ufeff  a cat, on a mat \n\n".encode())  # a BOM, surrounding blanks
    _image(d / "dog.png")
    (d / "dog.json").write_text(json.dumps({"question": "which animal?", "answers": ["dog", "dog"], "question_id": 7}))
    _image(d / "latin.png")
    (d / "latin.txt").write_bytes("café".encode("latin-1"))  # not UTF-8
    _image(d / "sub" / "blank.png")
    (d / "sub" / "blank.txt").write_text(" \n")
    _image(d / "sub" / "deep" / "chat.png")
    (d / "sub" / "deep" / "chat.json").write_text(json.dumps({"conversations": CONV, "id": "c1"}))
    _image(d / "sub" / "lonely.jpg", "JPEG")  # no sidecar
    (d / "notes.md").write_text("not a sample")
    (d / "README.txt").write_text("a sidecar of no image: ignored")
    _image(d / ".cache" / "hidden.png")
    (d / ".cache" / "hidden.txt").write_text("hidden folders are left out")
    return d


def test_captions_vqa_and_conversations_from_nested_sidecars(tmp_path, photos, capsys):
    out = tmp_path / "out"
    argv = ["--images", str(photos), "--out", str(out), "--no-progress", "--shard-size", "2"]
    assert from_folder.main([*argv, "--workers", "2"]) == 0
    recs = read_samples(out)
    assert sorted(recs) == ["000000001", "000000002", "000000003", "000000004", "000000007"]
    anim, both, cat, dog, chat = (recs[k] for k in sorted(recs))
    assert anim.caption == "a blue gif" and anim.image_exts == ["png"]  # gif re-encoded
    assert Image.open(io.BytesIO(anim.images[0])).convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert both.caption == "from the txt" and both.meta == {"url": "http://x/both.jpg", "image_file": "both.jpg"}
    assert cat.caption == "a cat, on a mat" and cat.images == [(photos / "cat.jpg").read_bytes()]
    assert dog.kind() == "vqa" and dog.answers == ["dog", "dog"]
    assert dog.meta == {"question_id": 7, "image_file": "dog.png"}
    assert chat.kind() == "conversation" and chat.meta == {"id": "c1", "image_file": "sub/deep/chat.png"}
    skipped = _skipped(out)
    assert {k: reason for k, (reason, _) in skipped.items()} == {
        "000000005": "bad sidecar", "000000006": "empty caption", "000000008": "no text"}
    assert "latin.txt" in skipped["000000005"][1] and "UTF-8" in skipped["000000005"][1]
    assert "sub/lonely.txt or .json" in skipped["000000008"][1]
    assert "wrote 5 samples" in capsys.readouterr().out
    inspect = [sys.executable, "-m", "data_pipelines.inspect", str(out), "--no-progress", "--samples", "0"]
    result = subprocess.run(inspect, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
    # the same command again resumes: nothing new is written
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert from_folder.main([*argv, *OPTS]) == 0
    summary = capsys.readouterr().out
    assert "wrote 0 samples" in summary and "resumed: 5 samples were already present" in summary
    assert sorted(p.name for p in out.glob("*.tar")) == shards and read_samples(out) == recs


def test_a_changed_folder_into_the_same_out_is_refused(tmp_path, photos, capsys):
    out = tmp_path / "out"
    argv = ["--images", str(photos), "--out", str(out), *OPTS]
    assert from_folder.main(argv) == 0
    manifest = json.loads((out / "shard.manifest.json").read_text())
    assert manifest["builder"] == "from_folder" and manifest["inputs"]["--images"] == {"path": str(photos.resolve())}
    assert manifest["inputs"]["--images content"].startswith("8 images, sha256 ")
    capsys.readouterr()
    _image(photos / "a" / "new.png")  # sorts first: every key would now name another image
    (photos / "a" / "new.txt").write_text("new")
    assert from_folder.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--images content" in err and "--overwrite" in err
    (photos / "cat.txt").write_text("a cat")  # a caption edited (its size changed): refused as well
    (photos / "a" / "new.png").unlink()
    (photos / "a" / "new.txt").unlink()
    assert from_folder.main(argv) == 2 and "--images content" in capsys.readouterr().err
    assert from_folder.main([*argv, "--overwrite"]) == 0
    assert read_samples(out)["000000003"].caption == "a cat"
    assert from_folder.main(argv) == 0 and "resumed: 5 samples" in capsys.readouterr().out


def test_sidecar_edge_cases(tmp_path):
    d = tmp_path / "imgs"
    for stem in "abcde":
        _image(d / f"{stem}.png")
    (d / "a.txt").write_text("fine")
    (d / "b.json").write_text('{"caption": "x", "image": "other.png"}')
    (d / "c.json").write_text("[1, 2]")
    (d / "d.json").write_text('{"caption": ""}')
    _image(d / "e.jpg", "JPEG")  # two images of stem "e" share e.txt
    (d / "e.txt").write_text("which one?")
    _image(d / "f.webp", "WEBP")
    (d / "f.json").write_text(json.dumps({"captions": ["one", "two"]}))
    (d / "f.txt").write_text("   ")  # a blank .txt next to json text: the json's text is the sample
    if sys.platform.startswith("linux"):  # a file name that is not UTF-8
        bad = os.fsencode(d) + b"/g\xff.png"
        with open(bad, "wb") as f:
            f.write((d / "a.png").read_bytes())
        with open(bad[:-3] + b"txt", "wb") as f:
            f.write(b"a caption")
    out = tmp_path / "out"
    assert from_folder.main(["--images", str(d), "--out", str(out), *OPTS, "--max-skip-fraction", "0.9"]) == 0
    recs = read_samples(out)
    assert [r.caption for r in recs.values()] == ["fine", None]
    assert recs["000000007"].captions == ["one", "two"] and recs["000000007"].image_exts == ["webp"]
    reasons = {k: reason for k, (reason, _) in _skipped(out).items()}
    expected = {"000000002": "bad sidecar", "000000003": "bad sidecar", "000000004": "empty caption",
                "000000005": "ambiguous sidecar", "000000006": "ambiguous sidecar"}
    if sys.platform.startswith("linux"):
        expected["000000008"] = "bad file name"
    assert reasons == expected


def test_help_and_unusable_folders_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        from_folder.main(["--help"])
    assert e.value.code == 0 and "cat.txt" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    _image(tmp_path / "no_text" / "x.png")
    (tmp_path / "not_images").mkdir()
    (tmp_path / "not_images" / "x.txt").write_text("a caption of no image")
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "out"
    for folder, message in (("missing", "is not a directory"), ("a_file", "is not a directory"),
                            ("empty", "holds no image"), ("not_images", "holds no image"),
                            ("no_text", "none of its 1 images has a sidecar")):
        assert from_folder.main(["--images", str(tmp_path / folder), "--out", str(out), *OPTS]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (folder, err)
        assert not out.exists(), folder


def test_inspect_reports_ok(tmp_path, photos, capsys):
    out = tmp_path / "out"
    assert from_folder.main(["--images", str(photos), "--out", str(out), *OPTS]) == 0
    capsys.readouterr()
    assert inspect_cli.main([str(out), "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and Counter(report["kinds"]) == Counter({"caption": 3, "vqa": 1, "conversation": 1})
