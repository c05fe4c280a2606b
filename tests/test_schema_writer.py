"""mmlm.data.schema and mmlm.data.writer: round trips, safety, atomic and resumable shards."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import pytest

from mmlm.data.schema import (
    IMAGE_PLACEHOLDER,
    Record,
    SchemaError,
    check_record,
    expand_shards,
    iter_tar_records,
    record_from_members,
    record_to_members,
    split_member,
)
from mmlm.data.writer import ShardWriter, resume_state, shard_name, tmp_name


def _full_record(key: str = "s1", n_images: int = 2) -> Record:
    return Record(
        key=key,
        images=[bytes([i]) * 10 for i in range(n_images)],
        image_exts=["png", "jpg", "webp"][:n_images],
        caption="a small red star on the left",
        captions=["ref one", "ref two"],
        question="what color is the star?",
        answers=["red"] * 10,
        conversations=[
            {"from": "human", "value": "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(n_images)) + "what is it?"},
            {"from": "gpt", "value": "a star"},
        ],
        meta={"image_id": 7, "question_id": 70, "question_type": "color", "answer_type": "other", "ünï": "cödé"},
    )


class _Evil:
    """Unpickling this creates a directory: proof that a pickle was (wrongly) loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "name,expected",
    [
        ("dir/abc.0.jpg", ("dir/abc", "0.jpg")),
        ("abc.jpg", ("abc", "jpg")),
        ("a/b/c.JSON", ("a/b/c", "json")),
        ("x.tar.gz", ("x", "tar.gz")),
        ("noext", ("noext", "")),
        ("d.x/k.txt", ("d.x/k", "txt")),
    ],
)
def test_split_member(name, expected):
    assert split_member(name) == expected


@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
def test_round_trip(n_images):
    rec = _full_record(n_images=n_images)
    if n_images == 0:
        rec.conversations[0]["value"] = "hello"
    members = record_to_members(rec)
    if n_images == 1:
        assert "png" in members
    elif n_images > 1:
        assert [m for m in members if m[0].isdigit()] == [f"{i}.{e}" for i, e in enumerate(rec.image_exts)]
    assert members["txt"] == rec.caption.encode()
    back = record_from_members(rec.key, members)
    assert back == rec
    assert back.kind() == "conversation"
    assert check_record(back) == "conversation"


def test_member_kinds_and_kind_priority():
    img = b"\x89PNG fake"
    r = record_from_members("k", {"jpeg": img, "txt": b"  a caption \n"})
    assert r.images == [img] and r.image_exts == ["jpeg"] and r.caption == "a caption" and r.kind() == "caption"
    r = record_from_members("k", {"webp": img, "json": b'{"captions": ["x", "y"], "image_id": 3}'})
    assert r.caption is None and r.captions == ["x", "y"] and r.meta == {"image_id": 3} and r.kind() == "caption"
    r = record_from_members("k", {"json": b'{"caption": "from json"}'})
    assert r.caption == "from json"
    r = record_from_members("k", {"txt": b"from txt", "json": b'{"caption": "from json"}'})
    assert r.caption == "from txt"  # txt wins
    r = record_from_members("k", {"png": img, "txt": b"c", "json": b'{"question": "q?", "answers": ["a"]}'})
    assert r.kind() == "vqa"
    vqa_dicts = b'{"question": "q?", "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}]}'
    assert record_from_members("k", {"png": img, "json": vqa_dicts}).answers == ["yes"]
    r = record_from_members("k", {"2.png": b"c", "0.jpg": b"a", "1.webp": b"b", "__key__": "k", "__url__": "u"})
    assert r.images == [b"a", b"b", b"c"] and r.image_exts == ["jpg", "webp", "png"]
    with pytest.raises(SchemaError, match="^k: "):
        Record("k").kind()


def test_untrusted_members_are_never_decoded(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))

    def boom(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    members = {
        "png": b"img",
        "txt": b"cap",
        "pickle": payload,
        "pth": payload,
        "pyd": payload,
        "npy": payload,
        "cls": b"3",
    }
    rec = record_from_members("k", members)
    assert rec.caption == "cap" and rec.images == [b"img"]
    # and through a tar shard too
    with ShardWriter(tmp_path / "out") as w:
        w.write_members("k", members)
    recs = list(iter_tar_records(tmp_path / "out"))
    assert [r.key for r in recs] == ["k"] and recs[0].meta == {}
    assert not marker.exists()


@pytest.mark.parametrize(
    "members,match",
    [
        ({"json": b"{not json"}, "bad json"),
        ({"json": b"[1, 2]"}, "must be an object"),
        ({"json": b'{"captions": "x"}'}, "captions"),
        ({"json": b'{"captions": ["x", 3]}'}, "captions"),
        ({"json": b'{"answers": [1]}'}, "answers"),
        ({"json": b'{"question": 5}'}, "question"),
        ({"json": b'{"caption": ["x"]}'}, "caption"),
        ({"json": b'{"conversations": [{"from": "system", "value": "x"}]}'}, "human"),
        ({"json": b'{"conversations": [{"from": "human", "value": 1}]}'}, "value"),
        ({"json": b'{"conversations": {"from": "human"}}'}, "conversations"),
        ({"txt": b"\xff\xfe bad utf8"}, "UTF-8"),
        ({"jpg": b"a", "0.jpg": b"b"}, "mixes"),
        ({"jpg": b"a", "png": b"b"}, "several"),
        ({"0.jpg": b"a", "2.jpg": b"b"}, "indices"),
        ({"0.jpg": b"a", "0.png": b"b"}, "index 0"),
    ],
)
def test_bad_samples_raise_schema_error_naming_the_key(members, match):
    with pytest.raises(SchemaError, match=match) as ei:
        record_from_members("sample-042", members)
    assert str(ei.value).startswith("sample-042: ")
    assert ei.value.key == "sample-042"


def test_check_record():
    conv = [{"from": "human", "value": "<image>\n<image> compare"}, {"from": "gpt", "value": "same"}]
    assert check_record(Record("k", [b"a", b"b"], ["png", "png"], conversations=conv)) == "conversation"
    with pytest.raises(SchemaError, match="2 <image> placeholders but 1 images"):
        check_record(Record("k", [b"a"], ["png"], conversations=conv))
    # no placeholder: the image goes before the first human turn (not an error)
    plain = [{"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "a star"}]
    assert check_record(Record("k", [b"a"], ["png"], conversations=plain)) == "conversation"
    with pytest.raises(SchemaError, match="human and one gpt"):
        check_record(Record("k", conversations=plain[:1]))
    with pytest.raises(SchemaError, match="empty caption"):
        check_record(Record("k", [b"a"], ["png"], caption="  "))
    assert check_record(Record("k", [b"a"], ["png"], question="q?")) == "vqa"  # test splits: no answers
    # an image in the model's reply: the processor refuses it, so builders and inspect must too
    in_reply = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>\nthere"}]
    with pytest.raises(SchemaError, match=r"conversations\[1\] \(gpt\) holds <image>"):
        check_record(Record("k", [b"a"], ["png"], conversations=in_reply))


def test_record_to_members_rejects_bad_records():
    with pytest.raises(SchemaError, match="dots"):
        record_to_members(Record("a.b", caption="x"))
    with pytest.raises(SchemaError, match="reserved"):
        record_to_members(Record("a", caption="x", meta={"captions": []}))
    with pytest.raises(SchemaError, match="image_exts"):
        record_to_members(Record("a", images=[b"x"], image_exts=[]))
    with pytest.raises(SchemaError, match="extension"):
        record_to_members(Record("a", images=[b"x"], image_exts=["gif"]))


def test_iter_tar_records_reports_bad_samples_and_truncated_shards(tmp_path):
    out = tmp_path / "out"
    with ShardWriter(out, max_count=3) as w:
        w.write(Record("good1", [b"i"], ["png"], caption="one"))
        w.write_members("badjson", {"png": b"i", "json": b"{nope"})
        w.write_members("nokind", {"png": b"i"})
        w.write(Record("good2", [b"i"], ["png"], caption="two"))
    errors = []
    recs = list(iter_tar_records(out, on_error=lambda k, e: errors.append((k, str(e)))))
    assert [r.key for r in recs] == ["good1", "good2"]
    assert [k for k, _ in errors] == ["badjson", "nokind"]
    with pytest.raises(SchemaError, match="^badjson: bad json"):
        list(iter_tar_records(out))
    # a truncated shard: the error names the shard
    shard = out / shard_name("shard", 0)
    data = shard.read_bytes()
    for cut in (2048 + 700, 2048):  # inside a member, and exactly at a member boundary
        shard.write_bytes(data[:cut])
        errors.clear()
        list(iter_tar_records([shard], on_error=lambda k, e: errors.append(k)))
        assert errors and errors[-1] == str(shard)
    # a member with no extension is reported, the rest of the shard still read
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w") as tar:
        for name, data in [("a.png", b"i"), ("a.txt", b"x"), ("b", b"?"), ("c.png", b"i"), ("c.txt", b"y")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    errors.clear()
    assert [r.key for r in iter_tar_records(odd, on_error=lambda k, e: errors.append(k))] == ["a", "c"]
    assert errors == ["b"]


def test_compressed_shards_are_read_whole_and_truncation_still_found(tmp_path):
    import gzip

    out = tmp_path / "out"
    with ShardWriter(out) as w:
        for i in range(3):
            w.write(Record(f"s{i}", [b"i"], ["png"], caption=f"caption {i}"))
    data = (out / shard_name("shard", 0)).read_bytes()
    gz = tmp_path / "shard.tar.gz"
    gz.write_bytes(gzip.compress(data))  # far smaller than the tar it holds
    errors = []
    recs = list(iter_tar_records(gz, on_error=lambda k, e: errors.append((k, str(e)))))
    assert [r.key for r in recs] == ["s0", "s1", "s2"] and errors == []
    gz.write_bytes(gzip.compress(data[:2048]))  # cut at a member boundary, then compressed
    list(iter_tar_records(gz, on_error=lambda k, e: errors.append((k, str(e)))))
    assert errors and errors[-1][0] == str(gz) and "truncated" in errors[-1][1]


def test_expand_shards(tmp_path):
    for i in range(3):
        (tmp_path / shard_name("shard", i)).write_bytes(b"")
    (tmp_path / tmp_name("shard", 3)).write_bytes(b"")
    assert [os.path.basename(p) for p in expand_shards(tmp_path)] == [shard_name("shard", i) for i in range(3)]
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    assert len(expand_shards(pattern)) == 2
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "missing.tar"))


# ----------------------------------------------------------------------------- writer


def _records(n: int, start: int = 0) -> list[Record]:
    return [
        Record(f"k{i:04d}", [bytes([i % 256]) * 50], ["png"], caption=f"caption {i}") for i in range(start, start + n)
    ]


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "out"
    w = ShardWriter(out, max_count=2)
    w.write(_records(1)[0])
    assert sorted(p.name for p in out.iterdir()) == [tmp_name("shard", 0)]  # nothing a reader would list yet
    assert expand_shards(out) == []
    for r in _records(2, start=1):
        w.write(r)
    assert {p.name for p in out.iterdir()} == {shard_name("shard", 0), tmp_name("shard", 1)}
    w.close()
    assert sorted(p.name for p in out.iterdir()) == [shard_name("shard", 0), shard_name("shard", 1)]
    assert [p.name for p in w.shards] == [shard_name("shard", 0), shard_name("shard", 1)]
    assert [r.key for r in iter_tar_records(out)] == ["k0000", "k0001", "k0002"]


def test_the_writer_refuses_a_record_that_breaks_the_schema(tmp_path):
    """Caught when written, not skipped when read (a caption sample without its image)."""
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        w.write(_records(1)[0])
        with pytest.raises(SchemaError, match="a caption sample without an image"):
            w.write(Record(key="noimage", caption="a red star"))
    assert [r.key for r in iter_tar_records(out)] == ["k0000"]


def test_writer_drops_the_unfinished_shard_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, max_count=2) as w:
            for r in _records(3):
                w.write(r)
            raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == [shard_name("shard", 0)]


def test_writer_limits_and_no_overwrite(tmp_path):
    out = tmp_path / "out"
    with ShardWriter(out, max_count=1000, max_size=5000) as w:
        for r in _records(5):
            w.write(r)
    assert len(w.shards) == 3  # 2 KiB of tar blocks per sample: 2 per shard
    with pytest.raises(FileExistsError):
        with ShardWriter(out) as w2:
            w2.write(_records(1)[0])
    with ShardWriter(out, prefix="other", start_index=7) as w3:
        w3.write(_records(1)[0])
    assert w3.shards[0].name == "other-000007.tar"


def test_writer_is_deterministic(tmp_path):
    for d in ("a", "b"):
        with ShardWriter(tmp_path / d, max_count=3) as w:
            for r in _records(7):
                w.write(r)
    for i in range(3):
        a = (tmp_path / "a" / shard_name("shard", i)).read_bytes()
        assert a == (tmp_path / "b" / shard_name("shard", i)).read_bytes()
    with tarfile.open(tmp_path / "a" / shard_name("shard", 0)) as tar:
        infos = tar.getmembers()
    assert {i.mtime for i in infos} == {0} and {i.uname for i in infos} == {""}
    assert [i.name for i in infos[:2]] == ["k0000.png", "k0000.txt"]


def test_resume_state(tmp_path):
    out = tmp_path / "out"
    assert resume_state(out).next_index == 0 and resume_state(out).keys == set()
    with ShardWriter(out, max_count=3) as w:
        for r in _records(7):
            w.write(r)
    (out / tmp_name("shard", 3)).write_bytes(b"half a shard")
    (out / shard_name("shard", 1)).unlink()  # lose the middle shard
    state = resume_state(out)
    assert state.removed_tmp and not (out / tmp_name("shard", 3)).exists()
    assert state.next_index == 3
    assert state.keys == {"k0000", "k0001", "k0002", "k0006"}
    # continue: write the missing samples only, no duplicates, nothing lost
    with ShardWriter(out, max_count=3, start_index=state.next_index) as w:
        for r in _records(7):
            if r.key not in state.keys:
                w.write(r)
    keys = [r.key for r in iter_tar_records(out)]
    assert sorted(keys) == [f"k{i:04d}" for i in range(7)] and len(keys) == len(set(keys))
    (out / shard_name("shard", 9)).write_bytes(b"garbage that is not a tar" * 30)
    assert [p.name for p in resume_state(out).broken] == [shard_name("shard", 9)]


def test_json_member_is_compact_utf8(tmp_path):
    rec = _full_record(n_images=1)
    obj = json.loads(record_to_members(rec)["json"].decode("utf-8"))
    assert obj["ünï"] == "cödé" and "caption" not in obj and obj["image_id"] == 7
