"""The streaming pipeline: shard specs, bad samples skipped and counted, exactly-once eval passes,
deterministic training streams, sample modes, pipes refused, pickle members never read.

Also holds the small shard-writing helpers the other data tests import (``write_tar``, ``png``,
``make_processor``, ...)."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from _tiny import tiny_tokenizer
from mmlm.config import ImageTransformConfig
from mmlm.data.collate import PackCollate, PadCollate
from mmlm.data.errors import DataErrorBudgetExceeded
from mmlm.data.schema import Record
from mmlm.data.sources import parse_sources, resolve_sources
from mmlm.data.stream import StreamConfig, VLMStream, record_to_conversation, vqa_answer
from mmlm.processing import Processor, ProcessorConfig

COLORS = ["red", "blue", "green", "white", "cyan", "orange"]


# ------------------------------------------------------------------------------ helpers (shared)
def png(color: str = "red", size: tuple[int, int] = (20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jpeg(color: str = "red", size: tuple[int, int] = (24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path, samples) -> Path:
    """``samples``: [(key, {ext: bytes | str}), ...] -> a tar at ``path`` (members in the given order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def caption_sample(key: str, i: int = 0, words: int = 0) -> tuple[str, dict]:
    text = "a small red star" + " on the left" * (i % 4 + words)
    return key, {"png": png(COLORS[i % len(COLORS)]), "txt": text}


def write_caption_shards(root, n_shards: int, per_shard: int, prefix: str = "s", words=None) -> list[str]:
    keys = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{prefix}{s}_{i:03d}"
            keys.append(key)
            samples.append(caption_sample(key, i, 0 if words is None else words(s, i)))
        write_tar(Path(root) / f"{prefix}-{s:06d}.tar", samples)
    return keys


def make_processor(max_length: int = 128) -> Processor:
    cfg = ProcessorConfig(image_transform=ImageTransformConfig(size=32), num_image_tokens=16, max_length=max_length,
                          on_overflow="drop")
    return Processor(tiny_tokenizer(), cfg)


def loader(stream, num_workers: int = 0) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=lambda x: x)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def total_skipped(batches) -> Counter:
    out: Counter = Counter()
    for b in batches:
        out.update(b["skipped"])
    return out


@pytest.fixture(scope="module")
def proc():
    return make_processor()


# ------------------------------------------------------------------------------ shard specs
def test_specs_expand_patterns_directories_lists_and_mixtures(tmp_path):
    write_caption_shards(tmp_path / "a", 3, 1)
    write_caption_shards(tmp_path / "b", 2, 1, prefix="t")
    a = sorted(str(p) for p in (tmp_path / "a").glob("*.tar"))
    assert resolve_sources(str(tmp_path / "a"))[0].shards == tuple(a)  # a directory: sorted *.tar
    pattern = str(tmp_path / "a" / "s-{000000..000001}.tar")
    assert resolve_sources(pattern)[0].shards == tuple(a[:2])
    assert resolve_sources("file:" + a[0])[0].shards == (a[0],)
    assert resolve_sources([a[2], a[0]])[0].shards == (a[2], a[0])  # a list: one source, in order
    mix = resolve_sources([{"shards": pattern, "weight": 0.7}, {"shards": str(tmp_path / "b"), "weight": 0.3}])
    assert [s.weight for s in mix] == [0.7, 0.3] and len(mix[1].shards) == 2
    with pytest.raises(FileNotFoundError):
        resolve_sources(str(tmp_path / "missing-{0..1}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="matches no .tar"):
        resolve_sources(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="weight"):
        parse_sources([{"shards": pattern, "weight": -1}])
    with pytest.raises(ValueError, match="unknown key"):
        parse_sources({"shards": pattern, "wieght": 1})


def test_pipes_and_urls_are_refused_unless_allowed(tmp_path, proc):
    write_caption_shards(tmp_path, 1, 3)
    shard = str(tmp_path / "s-000000.tar")
    for spec in (f"pipe:cat {shard}", [{"shards": f"pipe:cat {shard}", "weight": 1}]):
        with pytest.raises(ValueError, match="allow_pipes=True") as e:
            parse_sources(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="allow_remote=True"):
        parse_sources("https://example.com/shard-{0..3}.tar")
    # allowed: a pipe is read like a file
    sources = resolve_sources(f"pipe:cat {shard}", allow_pipes=True)
    stream = VLMStream(sources, proc, PadCollate(proc), StreamConfig(split="eval", batch_size=8, allow_pipes=True),
                       rank=0, world_size=1)
    assert keys_of(loader(stream)) == ["s0_000", "s0_001", "s0_002"]
    # a stream built without allow_pipes refuses to open it
    stream = VLMStream(sources, proc, PadCollate(proc), StreamConfig(split="eval", batch_size=8), rank=0, world_size=1)
    with pytest.raises(ValueError, match="allow_pipes=True"):
        list(loader(stream))


# ------------------------------------------------------------------------------ bad samples
def _bad_samples(tmp_path) -> tuple[list[str], dict[str, int]]:
    good = [caption_sample(f"good{i}", i) for i in range(8)]
    full = png("red")
    buf = io.BytesIO()
    Image.effect_noise((40, 40), 60).convert("RGB").save(buf, "JPEG")
    noisy_jpeg = buf.getvalue()
    long_human = "what color is the star? " * 60 + "<image>"  # the image span falls past max_length
    bad = [
        ("corrupt", {"png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "txt": "a red star"}),
        ("truncated", {"jpg": noisy_jpeg[: len(noisy_jpeg) // 2], "txt": "a red star"}),
        ("undecodable", {"jpg": b"not an image at all", "txt": "a red star"}),
        ("huge", {"png": png("red", (60, 60)), "txt": "a red star"}),  # 3600 px > max_pixels=2000
        ("badjson", {"png": full, "json": "{not json"}),
        ("emptycap", {"png": full, "txt": "   "}),
        ("overflow", {"png": full, "json": json.dumps({"conversations": [
            {"from": "human", "value": long_human}, {"from": "gpt", "value": "red"}]})}),
        ("noanswer", {"png": full, "json": json.dumps({"question": "what color is the star?"})}),
        ("nothing", {"png": full}),
    ]
    samples = good[:4] + bad + good[4:]
    write_tar(tmp_path / "mixed-000000.tar", samples)
    # a shard cut in the middle of its second sample: the first is kept, the rest reported once
    data = (write_tar(tmp_path / "tmp.tar", [caption_sample("cut0", 0), caption_sample("cut1", 1)])).read_bytes()
    (tmp_path / "tmp.tar").unlink()
    (tmp_path / "mixed-000001.tar").write_bytes(data[:2600])
    expected = {"corrupt_image": 2, "truncated_image": 1, "huge_image": 1, "schema_error": 2, "empty_caption": 1,
                "too_long": 1, "no_answer": 1, "bad_shard": 1}
    return [k for k, _ in good] + ["cut0"], expected


def test_every_bad_input_kind_is_skipped_and_counted(tmp_path, proc, caplog):
    good, expected = _bad_samples(tmp_path)
    sources = resolve_sources(str(tmp_path))
    cfg = StreamConfig(split="eval", batch_size=3, max_pixels=2000, max_bad_fraction=None)
    stream = VLMStream(sources, proc, PadCollate(proc), cfg, rank=0, world_size=1)
    with caplog.at_level("WARNING", logger="mmlm.data"):
        batches = list(loader(stream))
    assert sorted(keys_of(batches)) == sorted(good)
    assert dict(total_skipped(batches)) == expected
    logged = " ".join(r.getMessage() for r in caplog.records)
    for key in ("corrupt", "truncated", "huge", "badjson", "emptycap", "overflow", "noanswer", "nothing"):
        assert f"'{key}'" in logged
    assert "truncated_image" in logged and "huge_image" in logged


def test_error_budget_stops_the_stream_with_a_clear_message(tmp_path, proc):
    write_tar(tmp_path / "bad-000000.tar", [(f"b{i}", {"png": b"junk", "txt": "x"}) for i in range(30)]
              + [caption_sample(f"g{i}", i) for i in range(5)])
    sources = resolve_sources(str(tmp_path))
    cfg = StreamConfig(split="eval", batch_size=2, max_bad=10)
    with pytest.raises(DataErrorBudgetExceeded, match=r"11 bad samples > max_bad=10.*corrupt_image=11"):
        list(loader(VLMStream(sources, proc, PadCollate(proc), cfg, rank=0, world_size=1)))
    cfg = StreamConfig(split="eval", batch_size=2, max_bad_fraction=0.2, min_samples=20)
    with pytest.raises(DataErrorBudgetExceeded, match="max_bad_fraction=0.2"):
        list(loader(VLMStream(sources, proc, PadCollate(proc), cfg, rank=0, world_size=1)))


class _Touch:
    """Unpickling this creates a file (what a malicious pickle member would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_members_are_never_unpickled(tmp_path, proc):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Touch(str(marker)))
    pickle.loads(payload)  # the payload does what it says ...
    assert marker.exists()
    marker.unlink()
    samples = []
    for i in range(6):
        key, members = caption_sample(f"p{i}", i)
        members.update({"pickle": payload, "pyd": payload, "pth": payload, "npy": payload})
        samples.append((key, members))
    write_tar(tmp_path / "shards" / "p-000000.tar", samples)
    sources = resolve_sources(str(tmp_path / "shards"))
    for split in ("eval", "train"):
        stream = VLMStream(sources, proc, PadCollate(proc), StreamConfig(split=split, batch_size=2, shuffle_buffer=3),
                           rank=0, world_size=1)
        it = iter(loader(stream))
        batches = [next(it) for _ in range(3)]
        assert len(keys_of(batches)) == 6 and not total_skipped(batches)
    assert not marker.exists()  # ... and iterating never ran it


# ------------------------------------------------------------------------------ exactly once
@pytest.mark.parametrize("n_shards,per_shard", [(6, 5), (2, 9)])  # shard-level split / sample-level split
def test_eval_pass_yields_every_sample_exactly_once_over_2_ranks_x_2_workers(tmp_path, proc, n_shards, per_shard):
    keys = write_caption_shards(tmp_path, n_shards, per_shard)
    sources = resolve_sources(str(tmp_path))
    seen = []
    for rank in (0, 1):
        stream = VLMStream(sources, proc, PadCollate(proc), StreamConfig(split="eval", batch_size=4),
                           rank=rank, world_size=2)
        seen += keys_of(loader(stream, num_workers=2))
    assert sorted(seen) == sorted(keys)
    assert len(seen) == len(set(seen))


# ------------------------------------------------------------------------------ training stream
def _train_keys(sources, proc, n_batches, **cfg) -> list[list[str]]:
    stream = VLMStream(sources, proc, PadCollate(proc), StreamConfig(split="train", batch_size=3, **cfg),
                       rank=0, world_size=1)
    it = iter(loader(stream))
    return [next(it)["keys"] for _ in range(n_batches)]


def test_training_stream_is_endless_deterministic_and_seeded(tmp_path, proc):
    write_caption_shards(tmp_path, 2, 4)
    sources = resolve_sources(str(tmp_path))
    a = _train_keys(sources, proc, 8, seed=1, shuffle_buffer=5)  # 24 samples from 8 in the shards: endless
    assert a == _train_keys(sources, proc, 8, seed=1, shuffle_buffer=5)
    assert a != _train_keys(sources, proc, 8, seed=2, shuffle_buffer=5)
    # rank and worker get different streams
    s1 = VLMStream(sources, proc, PadCollate(proc), StreamConfig(split="train", batch_size=3, seed=1), rank=1,
                   world_size=2)
    it = iter(loader(s1))
    assert [next(it)["keys"] for _ in range(8)] != a


def test_mixture_weights_set_the_source_proportions(tmp_path, proc):
    write_caption_shards(tmp_path / "a", 4, 2, prefix="a")
    write_caption_shards(tmp_path / "b", 4, 2, prefix="b")
    sources = resolve_sources([{"shards": str(tmp_path / "a"), "weight": 0.8},
                               {"shards": str(tmp_path / "b"), "weight": 0.2}])
    keys = [k for ks in _train_keys(sources, proc, 80, shuffle_buffer=0) for k in ks]
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.65 < frac_a < 0.92


def test_stream_pickles_for_workers(tmp_path, proc):
    write_caption_shards(tmp_path, 1, 4)
    stream = VLMStream(resolve_sources(str(tmp_path)), proc, PackCollate(proc, 128), StreamConfig(split="eval"),
                       rank=0, world_size=1)
    clone = pickle.loads(pickle.dumps(stream))
    assert keys_of(loader(clone)) == keys_of(loader(stream))


# ------------------------------------------------------------------------------ sample modes
def _caption_conv(caption):
    return [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": caption}]


def _conv(rec, mode, seed=0, suffix=""):
    return record_to_conversation(rec, mode, random.Random(seed), caption_conversation=_caption_conv,
                                  vqa_suffix=suffix)


def test_sample_modes():
    from mmlm.data.errors import BadSample

    conv = [{"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": "red"}]
    both = Record(key="k", images=[b"x"], image_exts=["png"], caption="a red star", conversations=conv)
    assert _conv(both, "auto") == conv
    assert _conv(both, "conversation") == conv
    assert _conv(both, "caption") == _caption_conv("a red star")
    picked = {json.dumps(_conv(both, "mixed", seed)) for seed in range(20)}
    assert picked == {json.dumps(conv), json.dumps(_caption_conv("a red star"))}
    weighted = [record_to_conversation(both, "mixed", random.Random(seed), caption_conversation=_caption_conv,
                                       mixed_weights={"caption": 1, "conversation": 3})
                for seed in range(400)]
    assert 0.65 < sum(c == conv for c in weighted) / 400 < 0.85  # 3:1 -> 0.75
    assert all(record_to_conversation(both, "mixed", random.Random(s), caption_conversation=_caption_conv,
                                      mixed_weights={"conversation": 0}) == _caption_conv("a red star")
               for s in range(20))
    with pytest.raises(ValueError, match="mixed_weights"):
        StreamConfig(mixed_weights={"captions": 1.0})

    vqa = Record(key="q", images=[b"x"], image_exts=["png"], question="what color?",
                 answers=["blue", "red", "red", "blue", "red"])
    assert vqa_answer(vqa) == "red"
    assert _conv(vqa, "auto", suffix=" One word.") == [{"role": "user", "content": "what color?\nOne word."},
                                                        {"role": "assistant", "content": "red"}]  # as eval asks
    vqa.meta["multiple_choice_answer"] = "blue"
    assert _conv(vqa, "vqa")[1]["content"] == "blue"

    with pytest.raises(BadSample) as e:
        _conv(Record(key="c", caption=" "), "auto")
    assert e.value.reason == "empty_caption"
    with pytest.raises(BadSample) as e:
        _conv(vqa, "conversation")
    assert e.value.reason == "no_target"
    with pytest.raises(BadSample) as e:
        _conv(Record(key="q2", question="why?"), "auto")
    assert e.value.reason == "no_answer"
    with pytest.raises(BadSample) as e:
        _conv(Record(key="e"), "mixed")
    assert e.value.reason == "schema_error"


def test_mixed_mode_in_the_stream_uses_both_kinds(tmp_path, proc):
    conv = json.dumps({"conversations": [{"from": "human", "value": "<image>\nwhat color is the star?"},
                                         {"from": "gpt", "value": "red"}]})
    write_tar(tmp_path / "m-000000.tar", [(f"m{i}", {"png": png(), "txt": "a small red star", "json": conv})
                                           for i in range(16)])
    stream = VLMStream(resolve_sources(str(tmp_path)), proc, PadCollate(proc),
                       StreamConfig(split="eval", batch_size=16, sample_mode="mixed"), rank=0, world_size=1)
    (b,) = list(loader(stream))
    texts = [proc.tokenizer.decode(row[row != -100]) for row in b["labels"]]
    assert {"red<|end|>", "a small red star<|end|>"} == set(texts)


def test_caption_first_samples_trains_captions_then_the_sample_mode(tmp_path, proc):
    conv = json.dumps({"conversations": [{"from": "human", "value": "<image>\nwhat color is the star?"},
                                         {"from": "gpt", "value": "red"}]})
    write_tar(tmp_path / "m-000000.tar", [(f"m{i}", {"png": png(), "txt": "a small red star", "json": conv})
                                           for i in range(8)])
    cfg = StreamConfig(split="train", batch_size=4, sample_mode="conversation", caption_first_samples=10,
                       shuffle_buffer=0)
    texts = []
    for b in itertools.islice(loader(VLMStream(resolve_sources(str(tmp_path)), proc, PadCollate(proc), cfg,
                                               rank=0, world_size=2), num_workers=2), 8):
        texts += [proc.tokenizer.decode(row[row != -100]) for row in b["labels"]]
    # 2 ranks x 2 workers share the first 10 samples: each worker's first ceil(10 / 4) = 3 are captions
    per_worker = [texts[0:4] + texts[8:12] + texts[16:20] + texts[24:28], texts[4:8] + texts[12:16] + texts[20:24] + texts[28:32]]
    for seq in per_worker:
        assert seq == ["a small red star<|end|>"] * 3 + ["red<|end|>"] * 13
    with pytest.raises(ValueError, match="caption_first_samples"):
        StreamConfig(caption_first_samples=-1)


def test_truncated_answers_are_too_long_but_unlabelled_templates_pass(tmp_path):
    long_question = json.dumps({"conversations": [
        {"from": "human", "value": "<image>\n" + "what color is the star? " * 20}, {"from": "gpt", "value": "red"}]})
    write_tar(tmp_path / "t-000000.tar", [("short", {"png": png(), "txt": "a red star"}),
                                          ("long", {"png": png(), "json": long_question})])
    sources = resolve_sources(str(tmp_path))
    proc = make_processor(max_length=64)  # the long question pushes its answer past the cut
    (b,) = list(loader(VLMStream(sources, proc, PadCollate(proc), StreamConfig(split="eval", max_bad_fraction=None),
                                 rank=0, world_size=1)))
    assert b["keys"] == ["short"] and b["skipped"] == {"too_long": 1}
    # a template that labels nothing: the processor refuses each sample, naming the template (encode_error; the
    # trainer's preflight stops such a run before it reads data)
    from mmlm.processing import DEFAULT_CHAT_TEMPLATE

    masking = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}",
                                            "{% generation %}{% endgeneration %}{{ message['content'] + '<|end|>' }}")
    proc = Processor(tiny_tokenizer(), make_processor(max_length=256).config, chat_template=masking)
    with pytest.raises(DataErrorBudgetExceeded, match=r"encode_error=2; last: 'long'.*masks every label"):
        list(loader(VLMStream(sources, proc, PadCollate(proc), StreamConfig(split="eval", max_bad=1), rank=0,
                              world_size=1)))


def test_question_pattern_keeps_the_matching_questions_and_the_images():
    import re

    from mmlm.data.errors import BadSample
    from mmlm.data.targets import compile_question_pattern, filter_turns

    conv = [{"from": "system", "value": "be brief"},
            {"from": "human", "value": "<image>\nwhat color is the star?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "where is the star?"}, {"from": "gpt", "value": "left"},
            {"from": "human", "value": "where is the cross?"}, {"from": "gpt", "value": "top"}]
    where = re.compile("^where ")
    assert filter_turns(conv, where) == [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image>\nwhere is the star?"}, {"from": "gpt", "value": "left"},
        {"from": "human", "value": "where is the cross?"}, {"from": "gpt", "value": "top"}]
    # the pattern sees the question without its placeholder; every placeholder moves to the first kept question
    two = [{"role": "user", "content": "<image>\n<image>\nwhat color is the star?"}, {"role": "assistant", "content": "red"},
           {"role": "user", "content": "what shape?"}, {"role": "assistant", "content": "star"}]
    assert filter_turns(two, re.compile("^what color")) == two[:2]
    assert filter_turns(two, re.compile("shape")) == [{"role": "user", "content": "<image>\n<image>\nwhat shape?"},
                                                      {"role": "assistant", "content": "star"}]
    assert conv[1]["value"].startswith("<image>")  # the input is not modified
    with pytest.raises(BadSample) as e:
        filter_turns(conv, re.compile("^how many"), key="k7")
    assert e.value.reason == "no_target" and "k7" in str(e.value)

    rec = Record(key="r", images=[b"x"], image_exts=["png"], caption="a red star", conversations=conv)
    picked = record_to_conversation(rec, "conversation", random.Random(0), caption_conversation=_caption_conv,
                                    question_pattern=where)
    assert [t["value"] for t in picked if t["from"] == "gpt"] == ["left", "top"]
    assert record_to_conversation(rec, "caption", random.Random(0), caption_conversation=_caption_conv,
                                  question_pattern=where) == _caption_conv("a red star")  # captions: not filtered
    assert compile_question_pattern(None) is None
    for bad in ("(", ""):
        with pytest.raises(ValueError, match="question_pattern"):
            StreamConfig(question_pattern=bad)


def test_question_pattern_in_the_stream_skips_records_without_a_match(tmp_path, proc):
    def record(i):
        turns = [{"from": "human", "value": "<image>\nwhat color is the star?"}, {"from": "gpt", "value": "red"}]
        if i % 2:
            turns += [{"from": "human", "value": "where is the star?"}, {"from": "gpt", "value": "left"}]
        return f"m{i}", {"png": png(), "json": json.dumps({"conversations": turns})}

    write_tar(tmp_path / "m-000000.tar", [record(i) for i in range(16)])
    stream = VLMStream(resolve_sources(str(tmp_path)), proc, PadCollate(proc),
                       StreamConfig(split="eval", batch_size=16, sample_mode="conversation",
                                    question_pattern="^where "), rank=0, world_size=1)
    batches = list(loader(stream))
    assert sorted(keys_of(batches)) == sorted(f"m{i}" for i in range(1, 16, 2))
    assert total_skipped(batches) == Counter({"no_target": 8})
    for b in batches:
        for ids, row in zip(b["input_ids"], b["labels"]):
            assert proc.tokenizer.decode(row[row != -100]) == "left<|end|>"
            assert (ids == proc.image_token_id).sum() == proc.config.num_image_tokens  # the image stayed


def test_training_stream_with_nothing_the_sample_mode_selects_stops_instead_of_searching_forever(tmp_path, proc,
                                                                                             monkeypatch):
    """Every record is filtered (no_target: caption shards, sample_mode vqa, or a question_pattern that matches
    nothing): the endless training stream used to read on forever without a batch or a word."""
    import mmlm.data.stages as stages

    write_caption_shards(tmp_path, 1, 8)
    monkeypatch.setattr(stages, "MAX_FILTERED_IN_A_ROW", 200)
    stream = VLMStream(resolve_sources(str(tmp_path)), proc, PadCollate(proc),
                       StreamConfig(split="train", batch_size=2, sample_mode="vqa"), rank=0, world_size=1)
    with pytest.raises(DataErrorBudgetExceeded, match=r"no training sample .* in 200 records in a row: every one "
                                                       r"was skipped as no_target .*sample_mode='vqa'"):
        next(iter(loader(stream)))
    # a filter that lets one record in 8 through trains as before
    write_tar(tmp_path / "q-000000.tar", [(f"q{i}", {"png": png(), "json": json.dumps(
        {"question": "what is it?", "answers": ["a star"]})}) for i in range(1)])
    stream = VLMStream(resolve_sources(str(tmp_path)), proc, PadCollate(proc),
                       StreamConfig(split="train", batch_size=2, sample_mode="vqa"), rank=0, world_size=1)
    batches = list(itertools.islice(iter(loader(stream)), 3))
    assert all(k.startswith("q") for k in keys_of(batches)) and total_skipped(batches)["no_target"] > 0


def test_training_stream_whose_shards_all_fail_stops_even_without_a_budget(tmp_path, proc, monkeypatch):
    """max_bad_fraction None (no limit) and every shard unreadable (expired credentials behind pipe:): the endless
    stream retried them forever, silently after ten warnings."""
    import mmlm.data.stages as stages

    monkeypatch.setattr(stages, "MAX_BAD_SHARDS_IN_A_ROW", 20)
    (tmp_path / "cut-000000.tar").write_bytes(b"\0" * 10 + b"not a tar archive at all" * 40)
    stream = VLMStream(resolve_sources(str(tmp_path)), proc, PadCollate(proc),
                       StreamConfig(split="train", batch_size=2, max_bad_fraction=None), rank=0, world_size=1)
    with pytest.raises(DataErrorBudgetExceeded, match=r"no training sample.*: 20 shards in a row could not be read"):
        next(iter(loader(stream)))
