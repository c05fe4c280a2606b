"""Data that must never train silently wrong: shards cut short, empty shards, image formats mmlm
does not read, captions without their image, placeholders in answers, byte-order marks, repeated
references, zero mixture weights, and the tokenizer corpus of every shard spec the stream takes."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter

import pytest

from mmlm.data.errors import DataErrorBudgetExceeded
from mmlm.data.schema import Record, SchemaError, check_record, record_from_members
from mmlm.data.sources import resolve_sources
from mmlm.data.stream import StreamConfig, VLMStream, record_to_conversation
from mmlm.data.collate import PadCollate
from mmlm.data.targets import check_mixed_weights
from mmlm.training.build import corpus_from_shards
from test_data_stream import caption_sample, keys_of, loader, make_processor, png, total_skipped, write_tar


@pytest.fixture(scope="module")
def proc():
    return make_processor()


def _eval(root, proc):
    cfg = StreamConfig(split="eval", batch_size=4, max_bad_fraction=None)
    return list(loader(VLMStream(resolve_sources(str(root)), proc, PadCollate(proc), cfg, rank=0, world_size=1)))


def _caption(text):
    return [{"role": "user", "content": "describe"}, {"role": "assistant", "content": text}]


def test_a_shard_cut_at_a_member_boundary_is_a_counted_bad_shard(tmp_path, proc):
    shard = write_tar(tmp_path / "full" / "a-000000.tar", [caption_sample(f"k{i}", i) for i in range(6)])
    with tarfile.open(shard) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "a-000000.tar").write_bytes(shard.read_bytes()[:offsets[6]])  # the header of k3's first member
    batches = _eval(cut, proc)
    # k0, k1 read; k2 (the last group before the cut: it might lack members) held back; the cut counted
    assert keys_of(batches) == ["k0", "k1"]
    assert dict(total_skipped(batches)) == {"bad_shard": 1}
    assert keys_of(_eval(tmp_path / "full", proc)) == [f"k{i}" for i in range(6)]


def test_training_on_empty_shards_stops_with_a_message_instead_of_spinning(tmp_path, proc):
    for i in range(3):
        tarfile.open(tmp_path / f"e-{i:06d}.tar", "w").close()
    stream = VLMStream(resolve_sources(str(tmp_path)), proc, PadCollate(proc), StreamConfig(split="train", batch_size=2),
                       rank=0, world_size=1)
    with pytest.raises(DataErrorBudgetExceeded, match=r"hold no sample: all 3 shard\(s\) of rank 0 .* empty tars"):
        next(iter(stream))
    # some empty shards among good ones train
    write_tar(tmp_path / "g-000000.tar", [caption_sample(f"g{i}", i) for i in range(4)])
    stream = VLMStream(resolve_sources(str(tmp_path)), proc, PadCollate(proc), StreamConfig(split="train", batch_size=2),
                       rank=0, world_size=1)
    it = iter(stream)
    assert all(len(next(it)["keys"]) == 2 for _ in range(5))


def test_unread_image_formats_and_captions_without_an_image_are_counted_not_trained(tmp_path, proc):
    qa = json.dumps({"question": "what color?", "answers": ["red"]})
    talk = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    write_tar(tmp_path / "m-000000.tar", [
        caption_sample("good", 0),
        ("bmp", {"bmp": b"BM" + b"\0" * 60, "txt": "a red star"}),
        ("gif2", {"0.png": png(), "1.gif": b"GIF89a", "txt": "two images"}),
        ("noimage", {"txt": "a red star"}),
        ("vqanoimage", {"json": qa}),
        ("textonly", {"json": talk}),  # a text-only conversation is allowed
        ("quote", {"png": png(), "txt": "a sign that reads <image> here"}),
    ])
    batches = _eval(tmp_path, proc)
    assert keys_of(batches) == ["good", "textonly"]
    assert dict(total_skipped(batches)) == {"schema_error": 4, "encode_error": 1}
    with pytest.raises(SchemaError, match="a caption sample without an image"):
        check_record(record_from_members("x", {"txt": b"a red star"}))
    with pytest.raises(SchemaError, match="a vqa sample without an image"):
        check_record(record_from_members("x", {"json": qa.encode()}))
    assert check_record(record_from_members("x", {"json": talk.encode()})) == "conversation"


def test_placeholders_in_an_assistant_turn_are_refused(proc):
    with pytest.raises(ValueError, match=r"<image> in a assistant turn: images go in user turns"):
        proc.encode(_caption("reads <image> here"), [])


def test_a_byte_order_mark_is_not_text():
    bom = "\ufeff".encode()
    rec = record_from_members("k", {"png": png(), "txt": bom + "a red star".encode(),
                                    "json": bom + json.dumps({"question": "what?", "answers": ["red"]}).encode()})
    assert rec.caption == "a red star" and rec.question == "what?"


def test_a_txt_caption_repeated_in_captions_is_drawn_as_often_as_the_others():
    rec = Record("k", [png()], ["png"], caption="c0", captions=["c0", "c1", "c2", "c3"])
    drawn = Counter(record_to_conversation(rec, "caption", random.Random(i), caption_conversation=_caption)[1]["content"]
                    for i in range(4000))
    assert set(drawn) == {"c0", "c1", "c2", "c3"}
    assert max(drawn.values()) / min(drawn.values()) < 1.3  # 2x for c0 before


def test_a_zero_mixed_weight_switches_a_kind_off():
    rec = Record("k", [png()], ["png"], caption="a star", question="what?", answers=["red"])
    turns = {record_to_conversation(rec, "mixed", random.Random(i), caption_conversation=_caption,
                                    mixed_weights={"caption": 0})[1]["content"] for i in range(50)}
    assert turns == {"red"}
    only_caption = Record("c", [png()], ["png"], caption="a star")
    with pytest.raises(Exception, match="weight 0") as e:
        record_to_conversation(only_caption, "mixed", random.Random(0), caption_conversation=_caption,
                               mixed_weights={"caption": 0})
    assert e.value.reason == "no_target"
    with pytest.raises(ValueError, match="every kind weight 0"):
        check_mixed_weights({"caption": 0, "vqa": 0, "conversation": 0})
    check_mixed_weights({"caption": 0})


@pytest.mark.parametrize("spec", ["file:{d}", "{{shards: {d}}}", "[{{shards: file:{d}, weight: 2}}]", "pipe:cat {d}/s-000000.tar"])
def test_the_tokenizer_corpus_reads_every_shard_spec_the_stream_takes(tmp_path, spec):
    import yaml

    write_tar(tmp_path / "s-000000.tar", [caption_sample(f"k{i}", i) for i in range(3)])
    text = spec.format(d=tmp_path)
    parsed = yaml.safe_load(text) if text.startswith(("{", "[")) else text
    texts, n = corpus_from_shards(parsed, allow_pipes=True)
    assert n == 3 and all(t.startswith("a small red star") for t in texts)


def test_bad_mixed_weights_are_refused_when_the_data_module_is_made():
    from mmlm.data import VLMDataModule

    with pytest.raises(ValueError, match="mixed_weights must map"):
        VLMDataModule(train="data/train", sample_mode="mixed", mixed_weights={"captions": 1})
