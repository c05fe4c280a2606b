"""The builders from line and array inputs, on tiny inputs: from_jsonl (captions, VQA and conversations
mixed), from_csv (a table through from_jsonl's line builder), from_llava (a streamed JSON array) and
the JSON-array reader behind it (``data_pipelines._common.iter_json_array``).

What every builder shares (resume, crash, skip budget, manifest, one-line errors, image checks) and
inspect are in ``test_builders_shared.py``; from_coco and from_vqav2 in ``test_builders_coco_vqa.py``."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from _builders_kit import images  # noqa: F401 - a fixture
from _builders_kit import OPTS, inspect_ok, mixed_jsonl, read_samples, skip_reasons
from data_pipelines import _common, from_csv, from_jsonl, from_llava
from data_pipelines import inspect as inspect_cli


# ----------------------------------------------------------------------------- from_jsonl


def test_from_jsonl(tmp_path, images, capsys):
    out = tmp_path / "out"
    src = mixed_jsonl(tmp_path)
    argv = ["--jsonl", str(src), "--image-root", str(images), "--out", str(out), "--shard-size", "2"]
    assert from_jsonl.main(argv + ["--workers", "2"]) == 2  # 7 of 12 lines skipped: over --max-skip-fraction 0.5
    assert "7 of 12 inputs skipped" in capsys.readouterr().err and len(read_samples(out)) == 5  # the good ones kept
    assert from_jsonl.main(argv + ["--workers", "2", "--overwrite", "--max-skip-fraction", "0.6"]) == 0
    recs = read_samples(out)
    assert sorted(recs) == ["000000001", "000000002", "000000003", "000000004", "000000005"]
    assert recs["000000001"].caption == "a red image" and recs["000000001"].meta == {"id": "r1", "image_file": "red.png"}
    assert recs["000000003"].meta == {"image_file": ["red.png", "sub/green.jpg"]} and recs["000000004"].meta == {}
    assert recs["000000001"].images == [(images / "red.png").read_bytes()]  # original bytes, no re-encode
    assert recs["000000002"].answers == ["green", "green"] and recs["000000002"].image_exts == ["jpg"]
    assert recs["000000002"].images == [(images / "sub" / "green.jpg").read_bytes()]
    assert len(recs["000000003"].images) == 2 and recs["000000003"].kind() == "conversation"
    assert recs["000000004"].images == [] and recs["000000004"].conversations[1]["value"] == "hello"
    assert recs["000000005"].image_exts == ["png"]  # gif re-encoded to PNG
    assert Image.open(io.BytesIO(recs["000000005"].images[0])).convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert skip_reasons(out) == {
        "undecodable image": 2,
        "missing image": 1,
        "schema error": 2,
        "no image": 1,
        "bad line": 1,
    }
    summary = capsys.readouterr().out
    assert "wrote 5 samples" in summary and "missing image" in summary
    inspect_ok(out)


def test_from_jsonl_bom_and_lines_that_are_not_utf8(tmp_path, images):
    src = tmp_path / "d.jsonl"
    line = json.dumps({"image": "red.png", "caption": "café"}, ensure_ascii=False).encode()
    latin1 = json.dumps({"image": "red.png", "caption": "café"}, ensure_ascii=False).encode("latin-1")
    src.write_bytes(b"\xef\xbb\xbf" + line + b"\r\n" + latin1 + b"\r\n" + line + b"\r\n")
    out = tmp_path / "out"
    assert from_jsonl.main(["--jsonl", str(src), "--image-root", str(images), "--out", str(out), *OPTS]) == 0
    recs = read_samples(out)  # the BOM does not cost line 1; line 2 is skipped, not stored as "caf\ufffd"
    assert {k: r.caption for k, r in recs.items()} == {"000000001": "café", "000000003": "café"}
    assert skip_reasons(out) == {"bad line": 1}


def test_questions_without_answers_are_kept_and_noted_by_the_builder_and_inspect(tmp_path, images, capsys):
    """A test split ships questions only: kept, but the build and inspect say that nothing trains or scores them."""
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in (
        {"image": "red.png", "question": "what color?", "answers": []},
        {"image": "red.png", "question": "which shape?"},
        {"image": "red.png", "question": "what color?", "answers": ["red"]})))
    out = tmp_path / "out"
    assert from_jsonl.main(["--jsonl", str(src), "--image-root", str(images), "--out", str(out), *OPTS]) == 0
    assert "note: 2 question(s) have no answers" in capsys.readouterr().out
    assert sorted(len(r.answers) for r in read_samples(out).values()) == [0, 0, 1]
    assert inspect_cli.main([str(out), "--no-progress", "--samples", "0"]) == 0  # a note, not a failure
    assert "note: 2 question(s) have no answers" in capsys.readouterr().out


def test_from_jsonl_takes_images_as_the_list_of_image_paths(tmp_path, images):
    """``"images": [...]`` (other tools' spelling) was kept as metadata: the sample had 0 images for its 2
    placeholders and was skipped as a schema error."""
    conv = [{"from": "human", "value": "<image>\n<image>\nsame colour?"}, {"from": "gpt", "value": "no"}]
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"images": ["red.png", "sub/green.jpg"], "conversations": conv}) + "\n"
                   + json.dumps({"image": "red.png", "images": ["red.png"], "caption": "r"}) + "\n")
    out = tmp_path / "out"
    assert from_jsonl.main(["--jsonl", str(src), "--image-root", str(images), "--out", str(out), *OPTS]) == 0
    recs = read_samples(out)
    assert list(recs) == ["000000001"] and len(recs["000000001"].images) == 2
    assert skip_reasons(out) == {"bad line": 1}


def test_from_jsonl_resize_max(tmp_path, images):
    src = tmp_path / "d.jsonl"
    src.write_text(
        json.dumps({"image": "big.png", "caption": "big"}) + "\n" + json.dumps({"image": "red.png", "caption": "r"})
    )
    out = tmp_path / "out"
    assert (
        from_jsonl.main(
            ["--jsonl", str(src), "--image-root", str(images), "--out", str(out), "--resize-max", "50", *OPTS]
        )
        == 0
    )
    recs = read_samples(out)
    assert Image.open(io.BytesIO(recs["000000001"].images[0])).size == (50, 25)
    assert recs["000000002"].images == [(images / "red.png").read_bytes()]  # small enough: untouched


def test_nul_byte_in_an_image_path_is_an_unreadable_image(tmp_path, images):
    src = tmp_path / "d.jsonl"
    src.write_text(
        json.dumps({"image": "a\u0000b.jpg", "caption": "x"}) + "\n" + json.dumps({"image": "red.png", "caption": "r"})
    )
    out = tmp_path / "out"
    assert from_jsonl.main(["--jsonl", str(src), "--image-root", str(images), "--out", str(out), "--workers", "2",
                            "--no-progress"]) == 0
    assert sorted(read_samples(out)) == ["000000002"] and skip_reasons(out) == {"unreadable image": 1}
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}]
    lj = tmp_path / "l.json"
    lj.write_text(json.dumps([{"image": "a\u0000b.jpg", "conversations": conv},
                              {"image": "red.png", "conversations": conv}]))
    lout = tmp_path / "lout"
    assert from_llava.main(["--json", str(lj), "--images", str(images), "--out", str(lout), *OPTS]) == 0
    assert sorted(read_samples(lout)) == ["000000001"] and skip_reasons(lout) == {"unreadable image": 1}


def test_empty_input_is_a_one_line_error_and_leaves_nothing(tmp_path, images, capsys):
    cases = {
        "jsonl": (from_jsonl, ["--jsonl"], "\n\n", ["--image-root", str(images)]),
        "llava": (from_llava, ["--json"], " [ ] ", ["--images", str(images)]),
    }
    for name, (mod, flag, text, extra) in cases.items():
        src = tmp_path / f"empty.{name}"
        src.write_text(text)
        out = tmp_path / f"out_{name}"
        assert mod.main([*flag, str(src), *extra, "--out", str(out), *OPTS]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "empty." in err, (name, err)
        assert not out.exists(), name


# ----------------------------------------------------------------------------- from_csv


def test_from_csv_captions_and_a_tsv_of_questions(tmp_path, images, capsys):
    """The two commonest custom tables: image,caption (quoted commas, a BOM, extra columns kept) and a TSV of
    questions with several answers; bad rows skipped with their reason; resume and the manifest as from_jsonl."""
    src = tmp_path / "captions.csv"
    src.write_text('\ufeffimage,caption,image_id\n'
                   'red.png,"a red image, square",42\n'
                   'sub/green.jpg,a green one,7\n'
                   '\n'
                   'missing.png,not there,8\n'
                   'red.png,,9\n'
                   'red.png,too,many,fields\n', encoding="utf-8")
    out = tmp_path / "caps"
    argv = ["--csv", str(src), "--image-root", str(images), "--out", str(out), *OPTS, "--max-skip-fraction", "0.7"]
    assert from_csv.main(argv) == 0
    recs = read_samples(out)
    assert sorted(recs) == ["000000001", "000000002"]
    assert recs["000000001"].caption == "a red image, square"
    assert recs["000000001"].meta == {"image_id": 42, "image_file": "red.png"}
    assert recs["000000001"].images == [(images / "red.png").read_bytes()]
    assert skip_reasons(out) == {"missing image": 1, "bad line": 2}  # the empty caption and the row of 4 fields
    assert from_csv.main(argv) == 0 and read_samples(out) == recs  # a re-run resumes: nothing to add
    inspect_ok(out)

    tsv = tmp_path / "vqa.tsv"
    tsv.write_text("image\tquestion\tanswers\nred.png\twhat color?\tred|red| crimson\n"
                   "sub/green.jpg\tshape?\t\n")
    out2 = tmp_path / "vqa"
    assert from_csv.main(["--csv", str(tsv), "--image-root", str(images), "--out", str(out2), *OPTS]) == 0
    recs = read_samples(out2)
    assert recs["000000001"].question == "what color?" and recs["000000001"].answers == ["red", "red", "crimson"]
    assert recs["000000002"].answers == []  # a test split: questions without answers
    capsys.readouterr()
    # tables mmlm cannot build from: one line, exit 2, nothing written
    for text, message in (("path,caption\nred.png,x\n", "no 'image' column"),
                          ("image,label\nred.png,x\n", "no 'caption' or 'question' column"),
                          ("image;caption\nred.png;x\n", "set --delimiter"),
                          ("image,caption\n", "has no data row")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        assert from_csv.main(["--csv", str(bad), "--image-root", str(images), "--out", str(tmp_path / "x"), *OPTS]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (text, err)
        assert not (tmp_path / "x").exists()
    assert from_csv.main(["--csv", str(tmp_path / "semi.csv"), "--image-root", str(images), "--out",
                          str(tmp_path / "x"), *OPTS]) == 2


# ----------------------------------------------------------------------------- from_llava


def test_from_llava(tmp_path, images):
    data = [
        {
            "id": "000000033471",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."}],
        },
        {"id": "text.only", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {
            "id": "multi",
            "image": ["red.png", "sub/green.jpg"],
            "conversations": [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "different"}],
        },
        {
            "id": "noph",
            "image": "sub/green.jpg",
            "conversations": [{"from": "human", "value": "describe"}, {"from": "gpt", "value": "green"}],
        },
        {
            "id": "gone",
            "image": "missing.jpg",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}],
        },
        {"id": "sys", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {
            "id": "mismatch",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "y"}],
        },
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(data, indent=1))
    out = tmp_path / "out"
    argv = ["--json", str(src), "--images", str(images), "--out", str(out), "--shard-size", "2"]
    assert from_llava.main(argv + ["--workers", "2", "--no-progress"]) == 0
    recs = read_samples(out)
    assert sorted(recs) == ["000000000", "000000001", "000000002", "000000003"]
    assert (
        recs["000000000"].meta["id"] == "000000033471" and recs["000000000"].conversations == data[0]["conversations"]
    )
    assert recs["000000000"].meta["image_file"] == "red.png"
    assert recs["000000001"].images == [] and recs["000000001"].meta["id"] == "text.only"
    assert len(recs["000000002"].images) == 2
    assert skip_reasons(out) == {"missing image": 1, "schema error": 2}
    inspect_ok(out)


def test_iter_json_array_streams(tmp_path):
    items = [{"a": i, "s": "x" * (i * 37 % 200)} for i in range(300)] + [1, "two", [3], None, 4.5]
    p = tmp_path / "arr.json"
    p.write_text(json.dumps(items, indent=2))
    assert list(_common.iter_json_array(p, "x", chunk_chars=64)) == items
    p.write_text("[]")
    assert list(_common.iter_json_array(p, "x")) == []
    p.write_text('{"not": "an array"}')
    with pytest.raises(_common.BuildError, match="not a JSON array"):
        list(_common.iter_json_array(p, "x"))
    p.write_text('[{"a": 1}, {"b": ')
    with pytest.raises(_common.BuildError):
        list(_common.iter_json_array(p, "x", chunk_chars=4))


def test_iter_json_array_numbers_across_chunks_bom_and_bad_utf8(tmp_path):
    p = tmp_path / "arr.json"
    items = [-2.5e10, 0.125, 12345678, 1e-7, {"x": 1.5}]
    p.write_text(json.dumps(items))
    for chunk in (1, 2, 3, 5, 7):  # a chunk that ends after "-2." or "1e" must not end the number
        assert list(_common.iter_json_array(p, "x", chunk_chars=chunk)) == items
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(items).encode())  # a BOM, as load_json accepts it
    assert list(_common.iter_json_array(p, "x", chunk_chars=4)) == items
    p.write_bytes(b'[{"a": "caf\xe9"}]')  # latin-1: a one-line error, not a traceback
    with pytest.raises(_common.BuildError, match="not UTF-8"):
        list(_common.iter_json_array(p, "x"))
