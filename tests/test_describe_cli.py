"""`mmlm describe`: one image streams, folders/globs/shards batch to TSV or JSONL, unreadable images
are reported and counted, missing paths fail before anything is written, and --out resumes."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import mmlm.api
from _tiny import tiny_checkpoint
from mmlm import describe, load
from mmlm.cli.main import main
from mmlm.data.writer import ShardWriter
from mmlm.inference import StreamPrinter, discover_inputs

GEN = ["--max-new-tokens", "6", "--device", "cpu", "--no-progress"]


def noise(seed, size=(32, 32)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("describe")
    os.symlink(tiny_checkpoint(tmp_path_factory), root / "model")
    folder = root / "imgs"
    (folder / "sub" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    Image.new("RGB", (30, 40), "blue").save(folder / "blue.png")
    noise(1).save(folder / "sub" / "noise.jpg")
    noise(2, (20, 28)).save(folder / "sub" / "deeper" / "n2.webp")
    (folder / "notes.txt").write_text("not an image")
    pair = load(root / "model", device="cpu")
    return root, pair


def _images(root):
    folder = root / "imgs"
    return [str(folder / p) for p in ["blue.png", "red.png", "sub/deeper/n2.webp", "sub/noise.jpg"]]


def _expected(pair, paths, prompt=None):
    """One-by-one greedy texts through the public API."""
    return [describe([p], model=pair, prompt=prompt, batch_size=1, max_new_tokens=6)[0] for p in paths]


def _read(path):
    return [json.loads(line) for line in path.read_text().split("\n") if line]


@pytest.fixture
def count_generated(monkeypatch):
    """Counts the images the CLI sends to generation (it calls mmlm.api.generate_texts)."""
    calls = {"images": 0, "streamed": 0}
    real = mmlm.api.generate_texts

    def spy(vlm, processor, images, prompts, config, stop_strings=(), on_text=None, seed_keys=None):
        calls["images"] += len(images)
        if on_text is not None:
            def counting(row, delta):
                calls["streamed"] += 1
                on_text(row, delta)
            return real(vlm, processor, images, prompts, config, stop_strings, counting, seed_keys)
        return real(vlm, processor, images, prompts, config, stop_strings, seed_keys=seed_keys)

    monkeypatch.setattr(mmlm.api, "generate_texts", spy)
    return calls


def test_single_image_streams_the_describe_text(ckpt, capsys, count_generated):
    root, pair = ckpt
    image = _images(root)[0]
    assert main(["describe", image, "--model", str(root / "model"), *GEN]) == 0
    out = capsys.readouterr().out
    expected = _expected(pair, [image])[0]
    assert expected and out == expected + "\n"
    assert count_generated["streamed"] >= 1  # printed as generated (piece by piece: test_text_stream_*)

    assert main(["describe", image, "--model", str(root / "model"), *GEN, "--prompt", "what color is the star?"]) == 0
    assert capsys.readouterr().out == _expected(pair, [image], "what color is the star?")[0] + "\n"


def test_folder_is_searched_recursively_and_batches_equal_one_by_one(ckpt, tmp_path, capsys):
    root, pair = ckpt
    out = tmp_path / "res" / "captions.jsonl"
    assert main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--batch-size", "3",
                 "--out", str(out)]) == 0
    rows = _read(out)
    paths = _images(root)
    assert [r["path"] for r in rows] == paths  # sorted, recursive, notes.txt ignored
    assert all(r["prompt"] == pair[1].config.caption_prompt and "error" not in r for r in rows)
    texts = [r["text"] for r in rows]
    assert texts == _expected(pair, paths) and len(set(texts)) > 1


def test_compiled_decoding_writes_the_same_texts(ckpt, tmp_path, capsys):
    root, pair = ckpt
    out = tmp_path / "captions.jsonl"
    assert main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--batch-size", "3",
                 "--compile", "--out", str(out)]) == 0  # batches of 3 and 1: two compiled shapes
    assert [r["text"] for r in _read(out)] == _expected(pair, _images(root))
    capsys.readouterr()
    assert main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--compile",
                 "--num-beams", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not beam search" in err[0]


def test_sampled_texts_are_seeded_per_image_whatever_the_batching(ckpt, tmp_path, capsys):
    """--do-sample --seed: an image's text depends on the seed and its path only, not on --batch-size, the
    images around it, or whether it was described alone (streamed); the API seeds an image path as the CLI does
    (whatever its place in the list), an image without a path by its index."""
    root, pair = ckpt
    sample = ["--do-sample", "--temperature", "2", "--seed", "11"]
    texts = {}
    for bs in ("1", "3"):
        out = tmp_path / f"b{bs}.jsonl"
        assert main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, *sample,
                     "--batch-size", bs, "--out", str(out)]) == 0
        texts[bs] = {r["path"]: r["text"] for r in _read(out)}
    assert texts["1"] == texts["3"] and len(set(texts["1"].values())) == 4
    capsys.readouterr()
    one = _images(root)[2]
    assert main(["describe", one, "--model", str(root / "model"), *GEN, *sample]) == 0
    assert capsys.readouterr().out.strip() == texts["1"][one]
    paths = _images(root)
    api = [describe(paths, model=pair, batch_size=b, max_new_tokens=6, do_sample=True, temperature=2.0, seed=11)
           for b in (1, 4)]
    assert api[0] == api[1] == [texts["1"][p] for p in paths]  # the CLI's texts, path for path
    reordered = describe(paths[::-1], model=pair, max_new_tokens=6, do_sample=True, temperature=2.0, seed=11)
    assert reordered == api[0][::-1]


def test_glob_prints_path_tab_text(ckpt, capsys):
    root, pair = ckpt
    assert main(["describe", str(root / "imgs" / "*.png"), "--model", str(root / "model"), *GEN,
                 "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.split("\n")[:-1]  # splitlines() would also split at \x1c..\x1e
    paths = _images(root)[:2]
    escaped = [t.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
               for t in _expected(pair, paths)]
    assert lines == [f"{p}\t{t}" for p, t in zip(paths, escaped)]


def test_a_closed_stdout_pipe_stops_quietly(ckpt, monkeypatch, capsys):
    """`mmlm describe ... | head -1`: the reader went away; exit 141 (SIGPIPE) with no error message."""
    import sys

    root, _ = ckpt

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return sys.__stdout__.fileno()

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr(os, "dup2", lambda *a: None)  # (the real stdout stays open for pytest)
    assert main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--batch-size", "1"]) == 141
    assert "error" not in capsys.readouterr().err


def test_shards_describe_each_samples_first_image(ckpt, tmp_path, capsys):
    root, pair = ckpt

    def png(im):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    red, blue = Image.new("RGB", (40, 30), "red"), noise(3)
    with ShardWriter(tmp_path / "shards", max_count=2) as w:
        w.write_members("a", {"png": png(red), "txt": "a caption"})
        w.write_members("b", {"0.png": png(blue), "1.png": png(red), "txt": "two images"})
        w.write_members("c", {"txt": "no image at all"})
    shard0, shard1 = (str(tmp_path / "shards" / f"shard-00000{i}.tar") for i in (0, 1))
    out = tmp_path / "s.jsonl"
    spec = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    assert main(["describe", spec, "--model", str(root / "model"), *GEN, "--out", str(out)]) == 1
    rows = _read(out)
    assert [r["key"] for r in rows] == [f"{shard0}#a", f"{shard0}#b", f"{shard1}#c"]
    assert [r.get("text") for r in rows[:2]] == _expected(pair, [red, blue])
    assert "no image" in rows[2]["error"] and "text" not in rows[2]


def test_unreadable_image_is_reported_and_the_run_goes_on(ckpt, tmp_path, capsys):
    root, pair = ckpt
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (40, 30), "red").save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    noise(4).save(folder / "c.png")
    out = tmp_path / "mixed.jsonl"
    assert main(["describe", str(folder), "--model", str(root / "model"), *GEN, "--batch-size", "2",
                 "--out", str(out)]) == 1
    rows = _read(out)
    assert [r["path"] for r in rows] == [str(folder / n) for n in ["a.png", "b.jpg", "c.png"]]
    assert "error" in rows[1] and "text" not in rows[1] and "b.jpg" in capsys.readouterr().err
    assert [rows[0]["text"], rows[2]["text"]] == _expected(pair, [folder / "a.png", folder / "c.png"])

    # another image into the same --out keeps b.jpg's error line: only a run over b.jpg retries (and drops) it
    assert main(["describe", str(root / "imgs" / "red.png"), "--model", str(root / "model"), *GEN,
                 "--out", str(out)]) == 0
    assert [r["path"] for r in _read(out)] == [*(r["path"] for r in rows), str(root / "imgs" / "red.png")]
    assert "error" in _read(out)[1] and "dropped" not in capsys.readouterr().err
    assert main(["describe", str(folder / "b.jpg"), "--model", str(root / "model"), *GEN, "--out", str(out)]) == 1
    assert "dropped 1 error line(s) to retry" in capsys.readouterr().err
    after = _read(out)
    assert [r["path"] for r in after] == [str(folder / "a.png"), str(folder / "c.png"), str(root / "imgs" / "red.png"),
                                          str(folder / "b.jpg")] and "error" in after[-1]


def test_missing_path_is_one_line_error_and_writes_nothing(ckpt, tmp_path, capsys):
    root, _ = ckpt
    out = tmp_path / "never.jsonl"
    rc = main(["describe", str(root / "imgs"), str(tmp_path / "nope.jpg"), "--model", str(root / "model"),
               *GEN, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nope.jpg" in err and err.startswith("error:")
    assert not out.exists()
    assert main(["describe", str(tmp_path / "*.png"), "--model", str(root / "model"), *GEN]) == 2
    assert main(["describe", str(root / "imgs"), "--model", str(tmp_path / "no-model"), *GEN,
                 "--out", str(out)]) == 2
    assert main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--batch-size", "0"]) == 2
    assert not out.exists()


def test_resume_describes_only_missing_images(ckpt, tmp_path, count_generated):
    root, _ = ckpt
    out = tmp_path / "r.jsonl"
    args = ["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--batch-size", "2",
            "--out", str(out)]
    assert main(args) == 0
    full = out.read_text().split("\n")[:-1]
    assert len(full) == 4 and count_generated["images"] == 4

    # a killed run: two complete lines and half of the third
    out.write_text(full[0] + "\n" + full[1] + "\n" + full[2][: len(full[2]) // 2])
    count_generated["images"] = 0
    assert main(args) == 0
    assert count_generated["images"] == 2
    assert out.read_text().split("\n")[:-1] == full  # same lines, the truncated one rewritten

    count_generated["images"] = 0
    assert main(args) == 0 and count_generated["images"] == 0  # nothing left to do
    # another prompt is other work: the same images are described again, appended
    assert main(args + ["--prompt", "what color is the star?"]) == 0 and count_generated["images"] == 4
    assert len(_read(out)) == 8


def test_out_written_with_another_model_or_options_is_refused(ckpt, tmp_path, capsys, count_generated):
    """Skipping the images an --out already has would keep another run's texts (and mix two runs in one file)."""
    root, _ = ckpt
    out = tmp_path / "r.jsonl"
    args = ["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--out", str(out)]
    assert main(args) == 0 and count_generated["images"] == 4
    before = out.read_bytes()
    capsys.readouterr()
    rc = main(args + ["--num-beams", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "differs in: generation" in err and str(out) in err
    (root / "model" / "model.safetensors").touch()  # the weights rewritten (another epoch's export)
    rc = main(args)
    assert rc == 2 and "differs in: weights_mtime_ns" in capsys.readouterr().err
    assert out.read_bytes() == before and count_generated["images"] == 4
    (out.with_name(out.name + ".run.json")).unlink()  # a file of an older mmlm (no record): resumed as before
    assert main(args) == 0 and count_generated["images"] == 4 and out.read_bytes() == before


def test_a_prompt_with_several_image_placeholders_is_refused_before_anything_is_written(ckpt, tmp_path, capsys,
                                                                                        count_generated):
    root, _ = ckpt
    out = tmp_path / "r.jsonl"
    rc = main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--out", str(out),
               "--prompt", "<image> and <image>"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--prompt has 2 <image> placeholders" in err
    assert not out.exists() and not out.with_name(out.name + ".run.json").exists() and count_generated["images"] == 0


def test_out_that_mmlm_did_not_write_is_refused_and_left_intact(ckpt, tmp_path, capsys, count_generated):
    root, _ = ckpt
    labels = tmp_path / "labels.jsonl"  # a dataset's JSONL: ids, but no "text" or "error"
    notes = tmp_path / "notes.txt"  # one line of text and no newline: not a half-written result
    labels.write_text('{"path": "x.jpg", "caption": "hand-written label"}\n')
    notes.write_text("my notes")
    for out in (labels, notes):
        before = out.read_bytes()
        rc = main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1 and out.name in err
        assert out.read_bytes() == before
    assert count_generated["images"] == 0


def test_empty_stop_string_is_a_bad_argument(ckpt, capsys):
    root, _ = ckpt
    rc = main(["describe", str(root / "imgs"), "--model", str(root / "model"), *GEN, "--stop", ""])
    assert rc == 2 and "--stop" in capsys.readouterr().err  # not an empty reply for every image


def test_images_reach_the_model_as_training_decodes_them(ckpt, tmp_path, monkeypatch, capsys):
    """16-bit grayscale is scaled (not clipped to white), transparency composited on white."""
    from mmlm.data.decode import decode_image

    root, _ = ckpt
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(folder / "a16.png")
    clear_red = np.zeros((32, 32, 4), np.uint8)
    clear_red[..., 0] = 255
    Image.fromarray(clear_red, "RGBA").save(folder / "b_rgba.png")
    seen = []
    real = mmlm.api.generate_texts

    def spy(vlm, processor, images, *args, **kwargs):
        seen.extend(np.asarray(im) for im in images)
        return real(vlm, processor, images, *args, **kwargs)

    monkeypatch.setattr(mmlm.api, "generate_texts", spy)
    paths = [folder / "a16.png", folder / "b_rgba.png"]
    assert main(["describe", str(folder), "--model", str(root / "model"), *GEN]) == 0  # batched
    assert main(["describe", str(paths[0]), "--model", str(root / "model"), *GEN]) == 0  # one image, streamed
    expected = [np.asarray(decode_image(p.read_bytes())) for p in paths + paths[:1]]
    assert len(seen) == 3 and all(np.array_equal(a, b) for a, b in zip(seen, expected))


def test_python_api_opens_images_as_training_decodes_them_and_refuses_empty_stop_strings(ckpt, tmp_path):
    """``mmlm.api.open_image`` (``mmlm.describe``, ``mmlm chat``): paths, files and PIL images
    become the RGB pixels ``decode_image`` gives the training stream."""
    from mmlm.api import open_image
    from mmlm.data.decode import decode_image

    gray16 = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))
    clear_red = np.zeros((32, 32, 4), np.uint8)
    clear_red[..., 0] = 255
    for i, im in enumerate([gray16, Image.fromarray(clear_red, "RGBA")]):
        path = tmp_path / f"{i}.png"
        im.save(path)
        want = np.asarray(decode_image(path.read_bytes()))
        for source in (path, str(path), io.BytesIO(path.read_bytes()), Image.open(path)):
            got = open_image(source)
            assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)
    _, pair = ckpt
    assert len(describe([Image.new("RGB", (8, 8))], model=pair, stop_strings=["."], max_new_tokens=2)) == 1
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        describe([Image.new("RGB", (8, 8))], model=pair, stop_strings=[".", ""], max_new_tokens=2)


def test_python_api_takes_several_images_for_one_prompt(ckpt):
    """An entry that is a list holds one prompt's images (placed by its <image>s): the same texts batched
    or one by one, and as the low-level path gives them; a placeholder count that differs is refused."""
    from mmlm.api import generate_texts, open_image
    from mmlm.generation import GenerationConfig

    root, pair = ckpt
    red, blue = _images(root)[1], _images(root)[0]
    prompts = ["<image> and <image>: which one is red?", None]
    texts = describe([[red, blue], red], model=pair, prompt=prompts, batch_size=2, max_new_tokens=6)
    assert texts == [describe([entry], model=pair, prompt=[p], batch_size=1, max_new_tokens=6)[0]
                     for entry, p in zip([(red, blue), red], prompts)]
    vlm, proc = pair
    assert generate_texts(vlm, proc, [[open_image(red), open_image(blue)]], prompts[:1],
                          GenerationConfig(max_new_tokens=6)) == texts[:1]
    assert describe([[red, blue]], model=pair, prompt=prompts[:1], config=GenerationConfig(max_new_tokens=6)) == texts[:1]
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) in the text but 2 image\(s\)"):
        describe([[red, blue]], model=pair, prompt="<image> which one is red?", max_new_tokens=2)


def test_help_explains_with_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["describe", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ["--prompt", "--out", "--batch-size", "--stop", "--dtype", "--cache", "re-running", "example"]:
        assert word in text


def test_discover_inputs_dedupes_and_expands_braces(ckpt):
    root, _ = ckpt
    folder = root / "imgs"
    got = discover_inputs([str(folder / "{red,blue}.png"), str(folder / "red.png"), str(folder)])
    assert [s.path for s in got][:2] == [str(folder / "red.png"), str(folder / "blue.png")]
    assert len(got) == 4 and not any(s.shard for s in got)


def test_discover_inputs_searches_symlinked_folders_once(ckpt, tmp_path):
    root, _ = ckpt
    top = tmp_path / "top"
    top.mkdir()
    Image.new("RGB", (8, 8), "red").save(top / "a.png")
    os.symlink(root / "imgs" / "sub", top / "linked")  # a dataset folder linked in
    os.symlink(top, top / "loop")  # a link back up: no endless walk, no image twice
    got = [os.path.relpath(s.path, top) for s in discover_inputs([str(top)])]
    assert got == ["a.png", "linked/deeper/n2.webp", "linked/noise.jpg"]


def test_stream_printer_prints_exactly_the_final_text():
    out = io.StringIO()
    printer = StreamPrinter(out, stop_strings=["END"])
    for piece in ["  a c", "at. ", "E", "N", "D more"]:
        printer(0, piece)
        assert "E" not in out.getvalue()  # a possible stop string is held back
    assert out.getvalue() == "a cat."
    printer.finish("a cat.")
    assert out.getvalue() == "a cat.\n"


def test_a_training_checkpoint_file_as_model_says_how_to_write_its_model(tmp_path, capsys):
    """describe / eval given a .ckpt: not "not found" (the file exists) but how to write its model directory."""
    from mmlm.cli import eval as eval_cli

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    assert main(["describe", str(img), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "is a training checkpoint, not a model directory" in err and "export_model(m, DIR)" in err
    assert eval_cli.main(["vqa", "--benchmark", "shards", "--shards", str(tmp_path / "x.tar"), "--model", str(ckpt),
                          "--out", str(tmp_path / "out")]) == 2
    assert "is a training checkpoint, not a model directory" in capsys.readouterr().err
