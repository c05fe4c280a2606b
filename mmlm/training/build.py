"""Build the (VLM, Processor) pair a training run starts from.

Three ways in:

1. a from-scratch preset (its LM has no hub ``name``, e.g. ``tiny``): a byte-level BPE tokenizer
   is trained (:func:`mmlm.train_bpe_tokenizer`) on the texts of the training shards (a bounded
   number of records read as the training stream reads them, any shard spec: captions, questions,
   answers, conversation turns) plus the caption prompt, the system prompt and the chat
   template's role tokens; then ``VLM.from_preset(name, image_token_id=..., text={"hf_config":
   {"vocab_size": len(tokenizer)}})`` and ``Processor.for_model``;
2. a preset with a pretrained LM (``small``, ``base``, ``llava-1.5-7b``): the LM's tokenizer (hub
   name or local path; ``tokenizer=`` overrides) through :func:`mmlm.interop.build_from_pretrained`:
   ``<image>`` added, the LM's chat template when it has ``{% generation %}`` marks, else the named
   template it matches (``chat_template=`` chooses one), the embeddings grown when needed;
3. ``init_from``: an mmlm checkpoint directory (``save_pretrained`` output, e.g. the ``model/``
   of an ``align`` run) to continue with another stage; model and processor come from it.

:func:`processor_files` / :func:`processor_from_files` turn a processor into ``{name: bytes}``
and back: that is how a processor travels inside a Lightning checkpoint (and from rank 0 to the
other ranks), so a resumed run never re-trains its tokenizer.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmlm.config import VLMConfig
from mmlm.processing import DEFAULT_CAPTION_PROMPT, DEFAULT_SPECIAL_TOKENS, IMAGE_TOKEN, Processor

DEFAULT_MAX_LENGTH_SCRATCH = 512
DEFAULT_MAX_LENGTH_PRETRAINED = 2048


# ---------------------------------------------------------------------------------- shards -> texts
def train_sources(train: Any, *, allow_pipes: bool = False, allow_remote: bool = False) -> list:
    """The :class:`mmlm.data.sources.Source` s of a data module's ``train`` argument: any shard spec
    ``VLMDataModule`` takes (a path, directory, brace pattern, ``file:``/``pipe:``/remote URL, a
    list of them, a ``{shards, weight}`` mapping or a list of mappings), or already resolved
    sources (returned as they are). ``None`` or empty: ``[]``."""
    from mmlm.data.sources import Source, resolve_sources

    if train is None or (isinstance(train, (list, tuple)) and not train):
        return []
    if isinstance(train, (list, tuple)) and all(isinstance(s, Source) for s in train):
        return list(train)
    return resolve_sources(train, allow_pipes=allow_pipes, allow_remote=allow_remote)


def record_texts(record) -> list[str]:
    """The texts of one shard record (placeholders removed)."""
    texts: list[str] = []
    if record.caption:
        texts.append(record.caption)
    texts += [c for c in record.captions if c]
    if record.question:
        texts.append(record.question)
    texts += [a for a in record.answers if a]
    for turn in record.conversations:
        value = str(turn.get("value", turn.get("content", "")))
        value = value.replace(IMAGE_TOKEN, " ").strip()
        if value:
            texts.append(value)
    return texts


def _source_records(source, *, allow_pipes: bool, allow_remote: bool):
    """The good records of a source's shards, in order, read as the training stream reads them
    (``open_shard``: local, ``pipe:`` and remote shards); bad samples and shards are skipped."""
    import tarfile

    from mmlm.data.schema import SchemaError, check_record, record_from_members
    from mmlm.data.sources import open_shard
    from mmlm.data.stages import iter_tar_groups

    for url in source.shards:
        try:
            with open_shard(url, allow_pipes=allow_pipes, allow_remote=allow_remote) as stream:
                for item in iter_tar_groups(stream, url):
                    if item.error is not None:
                        continue
                    try:
                        rec = record_from_members(item.key, item.members)
                        check_record(rec)
                    except SchemaError:
                        continue
                    yield rec
        except (tarfile.TarError, OSError, EOFError):
            continue


def corpus_from_shards(train: Any, max_records: int = 20000, *, allow_pipes: bool = False,
                       allow_remote: bool = False) -> tuple[list[str], int]:
    """Texts of at most ``max_records`` records, taken round-robin over the sources of ``train``
    (:func:`train_sources`) so that every source of a mixture is seen; bad samples are skipped.
    Returns ``(texts, records_read)``."""
    iters = [_source_records(src, allow_pipes=allow_pipes, allow_remote=allow_remote)
             for src in train_sources(train, allow_pipes=allow_pipes, allow_remote=allow_remote)]
    texts: list[str] = []
    n = 0
    while iters and n < max_records:
        alive = []
        for it in iters:
            rec = next(it, None)
            if rec is None:
                continue
            alive.append(it)
            texts += record_texts(rec)
            n += 1
            if n >= max_records:
                break
        iters = alive
    return texts, n


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, prompts: Iterable[str] = (), records: int = 0):
    """A byte-level BPE tokenizer for a from-scratch model. ``prompts`` (the caption prompt,
    the system prompt, a VQA suffix) count once per record (as often as a sample may use them)."""
    from mmlm.processing import train_bpe_tokenizer

    texts = list(texts)
    if not texts:
        raise ValueError("no training text to build a tokenizer from: the training shards hold no caption, "
                         "question, answer or conversation")
    reps = max(2, records or len(texts) // 4)
    extra = [p for p in prompts if p] * reps
    roles = " ".join(DEFAULT_SPECIAL_TOKENS)  # the chat template's role/end tokens (special tokens)
    return train_bpe_tokenizer(texts + extra + [roles], vocab_size=vocab_size, min_frequency=2)


# ---------------------------------------------------------------------------------- processor <-> bytes
def _saved_files(save) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="mmlm-files-") as tmp:
        root = Path(tmp) / "d"
        save(root)
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load_files(files: dict[str, bytes], load):
    with tempfile.TemporaryDirectory(prefix="mmlm-files-") as tmp:
        root = Path(tmp).resolve()
        for name, data in files.items():
            target = (root / name).resolve()
            if root not in target.parents:
                raise ValueError(f"bad file name {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return load(root)


def processor_files(processor: Processor) -> dict[str, bytes]:
    """The files ``processor.save_pretrained`` writes, as ``{name: bytes}``."""
    return _saved_files(processor.save_pretrained)


def processor_from_files(files: dict[str, bytes]) -> Processor:
    """The inverse of :func:`processor_files`."""
    return _load_files(files, Processor.from_pretrained)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """A tokenizer's saved files as ``{name: bytes}`` (to send it to other ranks)."""
    return _saved_files(lambda d: tokenizer.save_pretrained(str(d)))


def tokenizer_from_files(files: dict[str, bytes]):
    from transformers import AutoTokenizer

    return _load_files(files, lambda d: AutoTokenizer.from_pretrained(str(d), trust_remote_code=False))


# ---------------------------------------------------------------------------------- models
def _processor_options(processor_cfg: dict, max_length, caption_prompt, system_prompt, image_placement=None) -> dict:
    out = dict(processor_cfg)
    if max_length is not None:
        out["max_length"] = int(max_length)
    if caption_prompt is not None:
        out["caption_prompt"] = caption_prompt
    if system_prompt is not None:
        out["system_prompt"] = system_prompt or None
    if image_placement is not None:
        out["image_placement"] = image_placement
    return out


def check_positions(cfg: VLMConfig, max_length: int, from_scratch: bool) -> VLMConfig:
    """``cfg`` with room for ``max_length`` tokens: a from-scratch LM's position table grows to it; a trained
    LM's (pretrained or an mmlm checkpoint's) cannot, so a longer ``max_length`` raises ``ValueError``."""
    hf = cfg.text.hf_config
    key = next((k for k in ("max_position_embeddings", "n_positions") if k in hf), None)
    if key and max_length > int(hf[key]):
        if from_scratch:
            return cfg.updated(text={"hf_config": {key: int(max_length)}})
        raise ValueError(f"max_length={max_length} exceeds the LM's {key}={hf[key]}; lower max_length")
    return cfg


def build_from_checkpoint(path: str | os.PathLike, *, model_overrides: dict | None = None, max_length=None,
                          caption_prompt=None, system_prompt=None, image_placement=None):
    """``(VLM, Processor)`` from an mmlm checkpoint directory (weights loaded strictly); a ``max_length``
    beyond the LM's positions raises ``ValueError`` (as a pretrained LM's does)."""
    from safetensors.torch import load_model

    from mmlm.checkpoint import read_config, weights_file
    from mmlm.modeling.vlm import VLM

    path = Path(path)
    cfg = read_config(path).updated(**(model_overrides or {}))
    cfg = cfg.updated(vision={"pretrained": False, "checkpoint_path": None}, text={"pretrained": False})
    if max_length is not None:  # a longer max_length than the LM's positions (GPT-2's learned ones fail mid-run)
        cfg = check_positions(cfg, int(max_length), from_scratch=False)
    vlm = VLM(cfg)
    try:
        missing, unexpected = load_model(vlm, str(weights_file(path)), strict=False)
    except RuntimeError as e:  # a size mismatch (torch's message spans lines: its first one names the tensor)
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ValueError(f"{path}: weights do not match the config (model_overrides must not change shapes): "
                         f"{detail}") from e
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (model_overrides must not change shapes): "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    processor = Processor.from_pretrained(path)
    opts = _processor_options({}, max_length, caption_prompt, system_prompt, image_placement)
    if opts:
        processor = Processor(processor.tokenizer, replace(processor.config, **opts))  # checks the new options
    return vlm, processor


def trains_tokenizer(*, preset: str = "tiny", init_from=None, model_overrides: dict | None = None,
                     tokenizer: str | None = None) -> bool:
    """Whether :func:`build_model_and_processor` trains a BPE tokenizer (a from-scratch LM)."""
    from mmlm.presets import get_preset

    if init_from or tokenizer:
        return False
    return not get_preset(preset).updated(**(model_overrides or {})).text.name


def tokenizer_from_shards(train_shards: Any, vocab_size: int, *, max_records: int = 20000,
                          prompts: Iterable[str] = (), log=print, allow_pipes: bool = False,
                          allow_remote: bool = False):
    """The BPE tokenizer of a from-scratch model, trained on the texts of ``train_shards`` (a shard
    spec or resolved sources: :func:`train_sources`). ``pipe:`` and remote specs are read as the data
    module reads them: allowed by the flags, or by having been resolved already (checked then)."""
    from mmlm.data.sources import Source

    resolved = isinstance(train_shards, (list, tuple)) and bool(train_shards) \
        and all(isinstance(x, Source) for x in train_shards)
    allow = dict(allow_pipes=allow_pipes or resolved, allow_remote=allow_remote or resolved)
    sources = train_sources(train_shards, **allow)
    if not sources:
        raise ValueError("a from-scratch model trains its tokenizer on the training texts: it needs the training "
                         "shards (data.train)")
    texts, n = corpus_from_shards(sources, max_records, **allow)
    log(f"training a {vocab_size}-token BPE tokenizer on {len(texts)} texts from {n} records")
    return train_tokenizer(texts, vocab_size, prompts=prompts, records=n)


def check_local_paths(cfg: VLMConfig, tokenizer: str | None = None) -> None:
    """A ``ValueError`` naming the option when a part is named by a local path that does not exist (transformers
    would answer "Repo id must be in the form ...", timm with an empty FileNotFoundError)."""
    vision = cfg.vision.name or ""
    named = [("model_overrides.text.name", cfg.text.name or ""), ("model.tokenizer", tokenizer or ""),
             ("model_overrides.vision.name", vision.removeprefix("local-dir:"))]
    for option, name in named:
        local = name.startswith(("/", "./", "../", "~")) or (option.endswith("vision.name") and vision != name)
        if local and not os.path.exists(os.path.expanduser(name)):
            raise ValueError(f"{option}: no such file or directory: {name}")
    path = cfg.vision.checkpoint_path
    if path and "://" not in str(path) and not os.path.isfile(os.path.expanduser(str(path))):
        raise ValueError(f"model_overrides.vision.checkpoint_path: no such file: {path}")


def named_vision_geometry(cfg: VLMConfig, model_overrides: dict | None) -> VLMConfig:
    """``cfg`` with the image and patch size of the timm model ``model_overrides`` names (``vision.name``)
    when they give neither: the preset's sizes are its from-scratch encoder's, and the named model keeps its
    own (``TimmViTEncoder`` would replace them with a warning). ``vision.timm_kwargs.img_size`` is the image
    size where given. Unknown names, transformers towers and explicit sizes are left as they are."""
    vision = (model_overrides or {}).get("vision")
    if not isinstance(vision, dict) or not vision.get("name") or cfg.vision.backend != "timm" \
            or "image_size" in vision or "patch_size" in vision:
        return cfg
    from mmlm.interop.pretrained import timm_geometry
    from mmlm.modeling.vision import timm_source

    size, patch = timm_geometry(timm_source(cfg.vision.name))
    own = cfg.vision.timm_kwargs.get("img_size")
    if own:
        size = own[-1] if isinstance(own, (list, tuple)) else own
    return cfg.updated(vision={"image_size": int(size), "patch_size": int(patch)})


def build_model_and_processor(
    *,
    preset: str = "tiny",
    init_from: str | os.PathLike | None = None,
    model_overrides: dict | None = None,
    train_shards: Any = (),
    tokenizer: str | None = None,
    tokenizer_vocab_size: int = 512,
    tokenizer_max_records: int = 20000,
    extra_texts: Sequence[str] = (),
    max_length: int | None = None,
    caption_prompt: str | None = None,
    system_prompt: str | None = None,
    image_placement: str | None = None,
    prebuilt_tokenizer=None,
    chat_template: str | None = None,
    log=print,
):
    """``(VLM, Processor)`` for a training run; see the module docstring for the three ways in.
    ``prebuilt_tokenizer`` replaces the tokenizer training of a from-scratch model (multi-process
    runs train it once and share it)."""
    from mmlm.modeling.vlm import VLM
    from mmlm.presets import get_preset

    if init_from:
        ignored = [f"model.{k}" for k, v in (("tokenizer", tokenizer), ("chat_template", chat_template)) if v]
        if ignored:
            warnings.warn(f"{' and '.join(ignored)} ignored: a model initialised from {init_from} keeps its "
                          "checkpoint's tokenizer and chat template (its embeddings were trained with them)",
                          stacklevel=2)
        return build_from_checkpoint(init_from, model_overrides=model_overrides, max_length=max_length,
                                     caption_prompt=caption_prompt, system_prompt=system_prompt,
                                     image_placement=image_placement)
    cfg = named_vision_geometry(get_preset(preset).updated(**(model_overrides or {})), model_overrides)
    check_local_paths(cfg, tokenizer)
    from_scratch = not cfg.text.name and tokenizer is None
    opts = _processor_options({}, max_length, caption_prompt, system_prompt, image_placement)
    opts.setdefault("max_length", DEFAULT_MAX_LENGTH_SCRATCH if from_scratch else DEFAULT_MAX_LENGTH_PRETRAINED)
    cfg = check_positions(cfg, opts["max_length"], from_scratch)
    if from_scratch:
        tok = prebuilt_tokenizer
        if tok is None:
            prompts = [opts.get("caption_prompt", DEFAULT_CAPTION_PROMPT), opts.get("system_prompt"), *extra_texts]
            tok = tokenizer_from_shards(train_shards, tokenizer_vocab_size, max_records=tokenizer_max_records,
                                        prompts=prompts, log=log)
        cfg = cfg.updated(text={"hf_config": {"vocab_size": len(tok)}})
        vlm = VLM(cfg.updated(image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN)))
    else:  # a pretrained LM: its tokenizer and (a generation-marked version of) its chat template
        from transformers import AutoTokenizer

        from mmlm.interop import build_from_pretrained

        tok = AutoTokenizer.from_pretrained(tokenizer or cfg.text.name, trust_remote_code=False)
        return build_from_pretrained(cfg.vision, cfg.text, cfg.projector, chat_template=chat_template,
                                     tokenizer=tok, **opts)
    processor = Processor.for_model(vlm, tok, **opts)
    return vlm, processor


def build_from_config(config: dict, processor: Processor):
    """A VLM with random weights from a saved ``VLMConfig`` dict (pretrained flags off; the
    weights come from a checkpoint afterwards)."""
    from mmlm.modeling.vlm import VLM

    cfg = VLMConfig.from_dict(config).updated(vision={"pretrained": False, "checkpoint_path": None},
                                              text={"pretrained": False})
    vlm = VLM(cfg)
    if vlm.num_image_tokens != processor.config.num_image_tokens:
        raise ValueError("the checkpoint's processor does not match its model (image tokens per image)")
    return vlm
