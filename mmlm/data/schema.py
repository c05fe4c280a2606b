"""The shard sample schema: one place that says what a sample in a tar shard is.

Contract (see DESIGN.md, "Shard schema"; img2dataset compatible):

* A sample is the run of consecutive tar members that share a *key*: the member path up to the
  first dot of its basename (``dir/abc.0.jpg`` -> key ``dir/abc``, extension ``0.jpg``). Keys
  have no dots. Extensions are compared lower-case.
* Images: ``KEY.jpg|jpeg|png|webp`` for one image, or ``KEY.0.jpg``, ``KEY.1.png``, ... for
  several (indices contiguous from 0, each index once). Mixing the two forms is an error.
  Image members are kept as the raw encoded bytes; this module never decodes them.
* ``KEY.txt``: a caption (UTF-8; surrounding whitespace stripped).
* ``KEY.json``: a JSON object with any of

  - ``"caption"``: str (used when there is no ``KEY.txt``; ``KEY.txt`` wins if both exist),
  - ``"captions"``: list[str] (reference captions for evaluation),
  - ``"question"``: str and ``"answers"``: list[str] (the human answers; VQAv2-style
    ``{"answer": str, ...}`` dicts are accepted and reduced to their ``"answer"``),
  - ``"conversations"``: ``[{"from": "human"|"gpt", "value": str}, ...]`` (LLaVA style),
  - anything else (``image_id``, ``question_id``, ``question_type``, ``answer_type``, ``id``,
    img2dataset's ``url``/``status``/...) is kept verbatim in :attr:`Record.meta`.

* Every other member (``.cls``, ``.pth``, ``.pickle``, ``.npy``, ...) is ignored and its bytes
  are never interpreted: nothing here unpickles or ``torch.load``-s data from a shard.

Image placeholders in conversations: a turn refers to an image with the literal ``<image>``
(:data:`IMAGE_PLACEHOLDER`), one per image, in image order. A sample that has images but no
``<image>`` anywhere in its conversation means its images (normally one) come before the text of
the first human turn, as if that turn began with ``"<image>\\n"`` per image. This rule is applied by
the processor at tokenisation time; the data is never rewritten. A conversation with placeholders
must have exactly as many as the sample has images (:func:`check_record`).

Errors: anything malformed raises :class:`SchemaError` whose message starts with the sample key.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "IMAGE_EXTS",
    "UNREAD_IMAGE_EXTS",
    "IMAGE_PLACEHOLDER",
    "KINDS",
    "ROLES",
    "SchemaError",
    "Record",
    "split_member",
    "is_image_ext",
    "record_from_members",
    "parse_conversations",
    "record_to_members",
    "check_record",
    "iter_tar_records",
    "iter_tar_samples",
    "expand_shards",
]

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
UNREAD_IMAGE_EXTS: tuple[str, ...] = ("bmp", "gif", "tif", "tiff", "jfif", "jpe", "heic", "heif", "avif",
                                       "ppm", "pgm", "pbm", "ico", "jp2")
"""Image formats a shard may carry but mmlm does not decode: such a member makes its sample a schema
error (never a caption trained without its image); the builders in ``data_pipelines`` convert them."""
IMAGE_PLACEHOLDER = "<image>"
KINDS: tuple[str, ...] = ("conversation", "vqa", "caption")
ROLES: tuple[str, ...] = ("human", "gpt")
# json fields that map onto Record attributes; everything else goes to Record.meta
_RESERVED = ("caption", "captions", "question", "answers", "conversations")
_INDEXED_IMAGE = re.compile(r"^(\d+)\.([a-z0-9]+)$")

PathLike = Union[str, "os.PathLike[str]"]


class SchemaError(ValueError):
    """A sample that breaks the shard schema; the message names the sample key."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def split_member(name: str) -> tuple[str, str]:
    """Split a tar member name into ``(key, extension)``.

    ``"dir/abc.0.jpg" -> ("dir/abc", "0.jpg")``. The key is the path up to the first dot of the
    basename; the extension is the rest, lower-cased. A basename without a dot gives ``(name, "")``.
    """
    head, sep, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return head + sep + stem, ext.lower() if dot else ""


def _unread_image_ext(ext: str) -> bool:
    ext = ext.lower()
    m = _INDEXED_IMAGE.match(ext)
    return (m.group(2) if m else ext) in UNREAD_IMAGE_EXTS


def is_image_ext(ext: str) -> bool:
    """True for ``jpg``/``png``/... and indexed ``0.jpg``/``12.webp`` member extensions."""
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return True
    m = _INDEXED_IMAGE.match(ext)
    return bool(m and m.group(2) in IMAGE_EXTS)


@dataclass
class Record:
    """One decoded sample (images stay encoded bytes)."""

    key: str
    images: list[bytes] = field(default_factory=list)
    image_exts: list[str] = field(default_factory=list)
    caption: str | None = None
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def kind(self) -> str:
        """``"conversation"`` | ``"vqa"`` | ``"caption"`` (priority in that order).

        ``vqa`` needs a question; ``caption`` needs ``caption`` or ``captions``.
        Raises :class:`SchemaError` when the sample carries none of them.
        """
        if self.conversations:
            return "conversation"
        if self.question is not None:
            return "vqa"
        if self.caption is not None or self.captions:
            return "caption"
        raise SchemaError(self.key, "no caption, captions, question or conversations")

    @property
    def num_images(self) -> int:
        return len(self.images)

    def placeholder_count(self) -> int:
        """Number of ``<image>`` placeholders over all conversation turns."""
        return sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in self.conversations)


# ----------------------------------------------------------------------------- members -> Record


def _image_members(key: str, members: Mapping[str, bytes]) -> tuple[list[bytes], list[str]]:
    single: list[str] = []
    indexed: dict[int, str] = {}
    for ext in members:
        low = ext.lower()
        if low in IMAGE_EXTS:
            single.append(ext)
            continue
        m = _INDEXED_IMAGE.match(low)
        if m and m.group(2) in IMAGE_EXTS:
            idx = int(m.group(1))
            if idx in indexed:
                raise SchemaError(key, f"two images with index {idx} ({indexed[idx]}, {ext})")
            indexed[idx] = ext
    if single and indexed:
        raise SchemaError(key, "mixes an un-indexed image with indexed images (KEY.jpg and KEY.0.jpg)")
    if len(single) > 1:
        raise SchemaError(key, f"several un-indexed images {sorted(single)}; use KEY.0.ext, KEY.1.ext, ...")
    if single:
        names = single
    else:
        order = sorted(indexed)
        if order != list(range(len(order))):
            raise SchemaError(key, f"image indices must be 0..{len(order) - 1}, got {order}")
        names = [indexed[i] for i in order]
    images = []
    for name in names:
        data = members[name]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SchemaError(key, f"image member {name!r} is {type(data).__name__}, expected bytes")
        images.append(bytes(data))
    return images, [n.lower().rsplit(".", 1)[-1] for n in names]


def _text(key: str, member: str, data: Any) -> str:
    if isinstance(data, str):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(key, f"{member} member is {type(data).__name__}, expected bytes")
    try:
        return bytes(data).decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise SchemaError(key, f"{member} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _str_list(key: str, name: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise SchemaError(key, f'json "{name}" must be a list of strings, got {type(value).__name__}')
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise SchemaError(key, f'json "{name}"[{i}] must be a string, got {type(v).__name__}')
    return list(value)


def _answers(key: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise SchemaError(key, f'json "answers" must be a list, got {type(value).__name__}')
    out = []
    for i, v in enumerate(value):
        if isinstance(v, dict) and isinstance(v.get("answer"), str):  # VQAv2 annotation form
            v = v["answer"]
        if not isinstance(v, str):
            raise SchemaError(key, f'json "answers"[{i}] must be a string or {{"answer": str}}, got {v!r:.60}')
        out.append(v)
    return out


def parse_conversations(key: str, value: Any) -> list[dict]:
    """Validate a LLaVA conversation list (roles human|gpt, string values); SchemaError naming key."""
    if not isinstance(value, list):
        raise SchemaError(key, f'json "conversations" must be a list, got {type(value).__name__}')
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise SchemaError(key, f"conversations[{i}] must be an object, got {type(turn).__name__}")
        role, text = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise SchemaError(key, f'conversations[{i}]["from"] must be "human" or "gpt", got {role!r:.40}')
        if not isinstance(text, str):
            raise SchemaError(key, f'conversations[{i}]["value"] must be a string, got {type(text).__name__}')
        out.append(dict(turn))
    return out


def _parse_json(key: str, data: Any) -> dict:
    text = _text(key, "json", data)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaError(key, f"bad json ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise SchemaError(key, f"json must be an object, got {type(obj).__name__}")
    return obj


def record_from_members(key: str, members: Mapping[str, bytes]) -> Record:
    """Build a :class:`Record` from ``{extension: bytes}`` (extensions as in :func:`split_member`).

    Only image, ``txt`` and ``json`` members are looked at; every other member (pickle, pth, npy,
    cls, ...) and webdataset's ``__key__``/``__url__`` entries are ignored without being decoded.
    Raises :class:`SchemaError` (naming ``key``) on bad JSON, wrong field types or bad image naming.
    Does not validate the combination of fields; see :func:`check_record` / :meth:`Record.kind`.
    """
    lowered = {str(k).lower(): k for k in members if not str(k).startswith("__")}
    images, exts = _image_members(key, {orig: members[orig] for orig in lowered.values()})
    rec = Record(key=key, images=images, image_exts=exts)
    if "txt" in lowered:
        rec.caption = _text(key, "txt", members[lowered["txt"]]).strip()
    if "json" in lowered:
        obj = _parse_json(key, members[lowered["json"]])
        cap = obj.get("caption")
        if cap is not None:
            if not isinstance(cap, str):
                raise SchemaError(key, f'json "caption" must be a string, got {type(cap).__name__}')
            if rec.caption is None:
                rec.caption = cap
        if obj.get("captions") is not None:
            rec.captions = _str_list(key, "captions", obj["captions"])
        q = obj.get("question")
        if q is not None:
            if not isinstance(q, str):
                raise SchemaError(key, f'json "question" must be a string, got {type(q).__name__}')
            rec.question = q
        if obj.get("answers") is not None:
            rec.answers = _answers(key, obj["answers"])
        if obj.get("conversations") is not None:
            rec.conversations = parse_conversations(key, obj["conversations"])
        rec.meta = {k: v for k, v in obj.items() if k not in _RESERVED}
    return rec


# ----------------------------------------------------------------------------- Record -> members


def record_to_members(rec: Record) -> dict[str, bytes]:
    """The inverse of :func:`record_from_members`.

    Images become ``ext`` (one image) or ``0.ext``, ``1.ext``, ... (several); ``caption`` goes to
    ``txt``; captions/question/answers/conversations and ``meta`` go to ``json`` (omitted when
    empty). Member order is deterministic: images, txt, json. JSON keys are written in a fixed
    order with ``ensure_ascii=False``.
    """
    if len(rec.images) != len(rec.image_exts):
        raise SchemaError(rec.key, f"{len(rec.images)} images but {len(rec.image_exts)} image_exts")
    if "." in rec.key.rpartition("/")[2]:
        raise SchemaError(rec.key, "keys must not contain dots")
    clash = sorted(set(rec.meta) & set(_RESERVED))
    if clash:
        raise SchemaError(rec.key, f"meta must not contain reserved fields {clash}")
    out: dict[str, bytes] = {}
    for i, (data, ext) in enumerate(zip(rec.images, rec.image_exts)):
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise SchemaError(rec.key, f"image extension {ext!r} is not one of {IMAGE_EXTS}")
        out[ext if len(rec.images) == 1 else f"{i}.{ext}"] = bytes(data)
    if rec.caption is not None:
        out["txt"] = rec.caption.encode("utf-8")
    obj: dict[str, Any] = {}
    if rec.captions:
        obj["captions"] = list(rec.captions)
    if rec.question is not None:
        obj["question"] = rec.question
    if rec.answers:
        obj["answers"] = list(rec.answers)
    if rec.conversations:
        obj["conversations"] = [dict(t) for t in rec.conversations]
    obj.update(rec.meta)
    if obj:
        out["json"] = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return out


def check_record(rec: Record) -> str:
    """Validate a record beyond field types; return its kind or raise :class:`SchemaError`.

    Checks: it has a kind; a caption or VQA sample has an image (a conversation may be text only);
    caption text is not empty when the sample is a caption sample;
    a VQA question is not empty (answers may be missing: test splits); a conversation has a
    human and a gpt turn, non-empty gpt values, ``<image>`` placeholders in human turns only (the
    processor refuses an image in the model's own reply), and either none (images, if any, go before
    the first human turn) or exactly one per image.
    """
    kind = rec.kind()
    key = rec.key
    if kind != "conversation" and not rec.images:
        raise SchemaError(key, f"a {kind} sample without an image")
    if kind == "caption":
        texts = ([rec.caption] if rec.caption is not None else []) + list(rec.captions)
        if not any(t.strip() for t in texts):
            raise SchemaError(key, "empty caption")
    elif kind == "vqa":
        if not rec.question.strip():
            raise SchemaError(key, "empty question")
        # no answers is allowed: test splits (VQAv2 test-dev) ship questions only
    else:
        roles = {t["from"] for t in rec.conversations}
        if roles != set(ROLES):
            raise SchemaError(key, "a conversation needs at least one human and one gpt turn")
        n = rec.placeholder_count()
        if n and n != len(rec.images):
            raise SchemaError(key, f"{n} {IMAGE_PLACEHOLDER} placeholders but {len(rec.images)} images")
        for i, t in enumerate(rec.conversations):
            if t["from"] == "gpt" and not t["value"].strip():
                raise SchemaError(key, f"conversations[{i}] (gpt) is empty")
            if t["from"] == "gpt" and IMAGE_PLACEHOLDER in t["value"]:
                raise SchemaError(key, f"conversations[{i}] (gpt) holds {IMAGE_PLACEHOLDER}: images go in human turns")
    return kind


# ----------------------------------------------------------------------------- reading tar shards


def expand_shards(spec: PathLike | Sequence[PathLike]) -> list[str]:
    """Expand shard specs: files, directories (their ``*.tar``, sorted) and brace patterns
    (``data/shard-{000000..000009}.tar``). Raises ``FileNotFoundError`` for a path that is missing and
    ``ValueError`` for a file that is no tar archive (a ``.tar``/``.tgz``/``.tar.gz`` name is taken at
    its word; any other file is opened and checked)."""
    from braceexpand import braceexpand  # ships with webdataset

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for s in specs:
        for p in braceexpand(os.fspath(s)):
            if os.path.isdir(p):
                out.extend(
                    sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".tar") and not f.startswith("."))
                )
            elif os.path.isfile(p):
                if not p.lower().endswith((".tar", ".tgz", ".tar.gz")) and not tarfile.is_tarfile(p):
                    raise ValueError(f"{p} is not a tar shard (build shards from images and JSON lines, COCO or "
                                     "LLaVA files with python -m data_pipelines.from_jsonl, from_coco, from_llava)")
                out.append(p)
            else:
                raise FileNotFoundError(f"no such shard or directory: {p}")
    return out


def group_tar_members(
    tar: tarfile.TarFile, *, wanted: Callable[[str], bool] | None = None, max_member_size: int | None = None
) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Yield ``(key, {ext: bytes}, problem)`` for each run of consecutive file members of an open
    (stream-mode) ``tar`` sharing a key; non-file members are skipped. ``problem`` is a one-line
    reason when a member of the sample has no extension, is duplicated, is larger than
    ``max_member_size`` or is an image mmlm does not decode (:data:`UNREAD_IMAGE_EXTS`; such a
    member is not read; the rest of the sample is skipped), else ``None``. Members whose extension
    ``wanted`` rejects are skipped unread."""
    key: str | None = None
    members: dict[str, bytes] = {}
    problem: str | None = None
    for info in tar:
        if not info.isfile():
            continue
        k, ext = split_member(info.name)
        if k != key:
            if key is not None:
                yield key, members, problem
            key, members, problem = k, {}, None
        if problem is not None:
            continue
        if not ext:
            problem = f"member {info.name!r} has no extension"
        elif _unread_image_ext(ext):
            problem = (f"image member {info.name!r} is in a format mmlm does not read; convert it to one of "
                       f"{'/'.join(IMAGE_EXTS)} (the data_pipelines builders do)")
        elif wanted is not None and not wanted(ext):
            continue  # never read
        elif max_member_size is not None and info.size > max_member_size:
            problem = f"member {info.name!r} is {info.size} bytes (> {max_member_size})"
        elif ext in members:
            problem = f"duplicate member {info.name!r} (same key twice in a row?)"
        else:
            f = tar.extractfile(info)
            members[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, members, problem


def iter_tar_samples(
    path: PathLike, *, max_member_size: int | None = None
) -> Iterator[tuple[str, dict[str, bytes], SchemaError | None]]:
    """Yield ``(key, {ext: bytes}, error)`` for each run of consecutive members sharing a key.

    Streams the tar (``tarfile`` stream mode; gzip/bz2/xz-compressed tars too); non-file members
    are skipped. ``error`` is a :class:`SchemaError` when a member of the sample has no extension,
    is duplicated, or is larger than ``max_member_size`` (such a member is not read), else ``None``
    (see :func:`group_tar_members`). A truncated or unreadable tar raises ``tarfile.TarError``/``OSError``
    from the iteration (a tar cut at a member boundary is detected by its missing end-of-archive
    block; the last sample is then not yielded).
    """
    with tarfile.open(os.fspath(path), mode="r|*") as tar:
        for group in complete_tar_groups(tar, os.fspath(path), max_member_size=max_member_size):
            yield _with_schema_error(*group)


def complete_tar_groups(
    tar: tarfile.TarFile, name: str, *, wanted: Callable[[str], bool] | None = None,
    max_member_size: int | None = None,
) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """:func:`group_tar_members` of a stream-mode ``tar``, with the last group held back until the
    end-of-archive check: ``tarfile`` ends quietly when a file stops exactly at a header boundary
    (what an interrupted copy or download leaves), so a tar without its end-of-archive zero block
    raises ``tarfile.ReadError`` naming ``name`` instead of passing for whole (its last group may lack
    members). A tar error inside a later sample propagates after the groups before it."""
    last = None
    try:
        for group in group_tar_members(tar, wanted=wanted, max_member_size=max_member_size):
            if last is not None:
                yield last
            last = group
    except (tarfile.TarError, OSError, EOFError):
        if last is not None:  # complete: the next sample's key was read before the error
            yield last
        raise
    end = tar.offset
    read = tar.fileobj.tell()  # bytes of the (decompressed) tar stream read so far: .tar.gz too
    if read < end + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"{name} is truncated (no end-of-archive marker)")
    if last is not None:
        yield last


def _with_schema_error(key: str, members: dict[str, bytes], problem: str | None):
    return key, members, (SchemaError(key, problem) if problem else None)


def iter_tar_records(
    path_or_paths: PathLike | Iterable[PathLike],
    *,
    on_error: Callable[[str, Exception], None] | None = None,
    check: bool = True,
    max_member_size: int | None = None,
) -> Iterator[Record]:
    """Stream :class:`Record` s from tar shards, sequentially, one sample in memory at a time.

    ``path_or_paths``: a path, a directory, a brace pattern or a list of them (see
    :func:`expand_shards`). Each record is validated with :func:`check_record` unless
    ``check=False``. ``on_error(key, exc)`` is called for a bad sample, which is then skipped;
    for an unreadable or truncated shard it is called with the shard path as key and the rest of
    that shard is skipped. With ``on_error=None`` (default) errors are raised.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths = expand_shards(path_or_paths)
    else:
        paths = expand_shards(list(path_or_paths))
    for path in paths:
        try:
            for key, members, error in iter_tar_samples(path, max_member_size=max_member_size):
                try:
                    if error is not None:
                        raise error
                    rec = record_from_members(key, members)
                    if check:
                        check_record(rec)
                except SchemaError as e:
                    if on_error is None:
                        raise
                    on_error(key, e)
                    continue
                yield rec
        except (tarfile.TarError, OSError, EOFError) as e:  # the shard itself is broken
            if on_error is None:
                raise
            on_error(os.fspath(path), e)
