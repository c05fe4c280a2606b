"""Tokenizer + image transform (``mmlm.image_transform``) + chat template -> model inputs, with training labels.

Contract:
- Conversations are lists of ``{"role": "system"|"user"|"assistant", "content": str}``;
  LLaVA's ``{"from": "human"|"gpt", "value": ...}`` is accepted and converted.
- ``<image>`` in a message marks where an image goes. A conversation with images but no
  placeholder gets them before the first user turn's text; any other count mismatch raises.
  With ``image_placement="after_text"`` each user turn's images move to the end of that turn,
  after its text (``place_images``).
- The chat template (Jinja, saved with the model) marks assistant text with
  ``{% generation %}``; labels cover exactly those tokens (answer + end-of-turn), all
  others are -100. A sample with assistant text none of whose tokens the template marks raises
  (the template masks every label), naming the sample. A caption is the assistant's answer to
  ``caption_prompt``.
- Each ``<image>`` token is expanded to exactly ``num_image_tokens`` copies, the count the
  model produces. A sample longer than ``max_length`` is truncated on the right, but never
  inside (or before the end of) an image span, nor where it would remove every answer token: then it
  raises ``ImageSpanTruncated`` or ``AnswerTruncated`` (both ``SampleTooLong``) or, with
  ``on_overflow="drop"``, ``encode`` returns None. The error names the sample. Generation prompts
  (``add_generation_prompt``) are never cut: a cut removes the assistant's header, and the model
  would continue the question instead of answering it (``mmlm chat`` drops old turns instead).
- Batches are right-padded for training and left-padded for generation.
- ``pixel_values`` are float32, normalised as the image transform says; ``encode(...,
  pixel_dtype="uint8")`` gives the fitted RGB images as uint8 instead, which the model normalises
  on its device with the same formula (``mmlm.pixels``; the training stream's default).

From-scratch models get a byte-level BPE tokenizer trained with ``tokenizers``
(``train_bpe_tokenizer``). Saving writes the tokenizer files (the chat template travels
in them) and ``processor_config.json``; loading never runs remote code, and a directory without its
chat template is refused rather than prompted with the default one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmlm.config import ImageTransformConfig
from mmlm.image_transform import ImageTransform
from mmlm.io import atomic_dir
from mmlm.pixels import cat_pixel_values, check_pixel_dtype

IMAGE_TOKEN = "<image>"
PROCESSOR_CONFIG = "processor_config.json"
DEFAULT_CAPTION_PROMPT = "Describe the image briefly."
DEFAULT_VQA_SUFFIX = "Answer the question using a single word or phrase."
"""LLaVA's short-answer instruction: what ``mmlm eval vqa`` appends to questions for a checkpoint that
records no suffix of its own (:attr:`ProcessorConfig.vqa_suffix`)."""


def vqa_prompt(question: str, suffix: str | None) -> str:
    """The user text of a VQA question, in training and in evaluation alike: the question and, on a
    new line, ``suffix`` (none when empty or None); both stripped."""
    question = question.strip()
    suffix = (suffix or "").strip()
    return f"{question}\n{suffix}" if suffix else question

# The default template of from-scratch models. ``{% generation %}`` marks what the loss covers.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>' + message['content'] + '<|end|>\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>' + message['content'] + '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
DEFAULT_SPECIAL_TOKENS = ["<pad>", "<|end|>", IMAGE_TOKEN, "<|system|>", "<|user|>", "<|assistant|>"]

_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # {% generation %}, {%- generation -%}, ...
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleTooLong(ValueError):
    """A sample longer than ``max_length`` that cannot be cut there (see the subclasses)."""


class ImageSpanTruncated(SampleTooLong):
    """``max_length`` would cut into an image span."""


class AnswerTruncated(SampleTooLong):
    """``max_length`` would cut every answer token of the sample: it would train on nothing."""


# ---------------------------------------------------------------------------------- text
def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts`` (``transformers`` fast tokenizer).

    The first special tokens are pad and end-of-turn (used as eos); ``<image>`` must be one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if IMAGE_TOKEN not in special_tokens:
        raise ValueError(f"special_tokens must include {IMAGE_TOKEN!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=special_tokens[0], eos_token=special_tokens[1],
        additional_special_tokens=[t for t in special_tokens[2:]],
    )


def normalize_messages(conversation: Sequence[dict], key: str | None = None) -> list[dict]:
    """LLaVA (``from``/``value``) or chat (``role``/``content``) turns -> chat turns."""
    if not conversation:
        raise ValueError(f"{_name(key)}the conversation has no turns")
    out = []
    for i, turn in enumerate(conversation):
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLES or not isinstance(content, str):
            raise ValueError(f"{_name(key)}turn {i} is not a valid message (need role/content or from/value): {turn!r}")
        out.append({"role": _ROLES[role], "content": content})
    return out


IMAGE_PLACEMENTS = ("as_written", "after_text")


def place_images(messages: list[dict], num_images: int, key: str | None = None,
                 placement: str = "as_written") -> list[dict]:
    """Check the ``<image>`` count against ``num_images`` and place the images (placeholders in
    another role's turn than the user's raise ``ValueError``).

    ``as_written`` (LLaVA's layout): where the text puts them; with no placeholder at all, before
    the first user turn's text (``"<image>\\n"`` each). ``after_text``: the same images, but each
    user turn's moved to the end of that turn (``"question\\n<image>"``), so that in a causal LM
    the image tokens see the question and the answer sits at the same distance from each image
    token whatever the question's length.
    """
    if placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"unknown image placement {placement!r}; known: {list(IMAGE_PLACEMENTS)}")
    for m in messages:  # a caption or an answer that quotes "<image>" is text, not an image slot
        if m["role"] != "user" and IMAGE_TOKEN in m["content"]:
            raise ValueError(f"{_name(key)}{IMAGE_TOKEN} in a {m['role']} turn: images go in user turns "
                             f"(text that contains {IMAGE_TOKEN!r} cannot be trained as it is)")
    count = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if count == 0 and num_images:
        messages = [dict(m) for m in messages]
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise ValueError(f"{_name(key)}{num_images} image(s) but no user turn to attach them to")
        messages[first]["content"] = IMAGE_TOKEN * num_images + "\n" + messages[first]["content"]
    elif count != num_images:
        raise ValueError(f"{_name(key)}{count} {IMAGE_TOKEN} placeholder(s) in the text but {num_images} image(s)")
    if placement == "as_written" or not num_images:
        return messages
    out = []
    for m in messages:
        n = m["content"].count(IMAGE_TOKEN)
        if n and m["role"] == "user":
            text = m["content"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
            m = {**m, "content": (text + "\n" if text else "") + IMAGE_TOKEN * n}
        out.append(m)
    return out


def _name(key: str | int | None) -> str:
    return f"sample {key!r}: " if key is not None else ""


# ---------------------------------------------------------------------------------- processor
@dataclass
class ProcessorConfig:
    """The prompt format and input geometry that travel with a checkpoint."""

    image_transform: ImageTransformConfig
    """How images are resized and normalised for the encoder."""
    num_image_tokens: int
    """Tokens each ``<image>`` expands to (the model's tokens per image)."""
    max_length: int = 2048
    """Longest tokenized sample (image tokens included)."""
    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    """The user prompt a caption answers, in training and in ``describe``."""
    system_prompt: str | None = None
    """A system message put before every conversation that has none."""
    image_placement: str = "as_written"
    """Where images go in a user turn: ``as_written`` (where ``<image>`` is, else before the text, as
    LLaVA) or ``after_text`` (at the end of the turn: the image tokens attend to the question, and the
    answer is at a fixed distance from each of them; measured on the tiny quickstart in the README's status)."""
    on_overflow: str = "raise"
    """A sample longer than max_length whose cut would fall inside an image span or remove every answer
    token: ``raise`` or ``drop`` (``encode`` returns None)."""
    stop_tokens: list[str] = field(default_factory=list)
    """Extra tokens that end generation (besides the tokenizer's eos)."""
    vqa_suffix: str | None = None
    """What training appended to VQA questions (``data.vqa_suffix``, through :func:`vqa_prompt`; recorded
    by ``mmlm fit`` when its ``sample_mode`` trains questions), and so what ``mmlm eval vqa`` appends
    by default. None: not recorded (eval appends :data:`DEFAULT_VQA_SUFFIX`, LLaVA's)."""

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["image_transform"] = self.image_transform.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "ProcessorConfig":
        data = dict(data)
        data["image_transform"] = ImageTransformConfig.from_dict(data["image_transform"])
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"processor config: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


class Processor:
    """Turns images + text or conversations into VLM inputs (and labels for training)."""

    def __init__(self, tokenizer, config: ProcessorConfig, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.config = config
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        if not _GENERATION_MARK.search(tokenizer.chat_template):
            raise ValueError("the chat template must mark assistant text with {% generation %}...{% endgeneration %} "
                             "so that labels cover the assistant's tokens only")
        if config.image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(f"unknown image_placement {config.image_placement!r}; known: {list(IMAGE_PLACEMENTS)}")
        if config.on_overflow not in ("raise", "drop"):
            raise ValueError(f"on_overflow must be 'raise' or 'drop', got {config.on_overflow!r}")
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:  # batches could not be padded: a TypeError in a loader worker
                raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token: batches cannot be "
                                 "padded and generation cannot stop; set tokenizer.eos_token (and save it)")
            tokenizer.pad_token = tokenizer.eos_token
        self.image_transform = ImageTransform(config.image_transform)

    # ---------------------------------------------------------------- construction / io
    @classmethod
    def for_model(cls, model, tokenizer, chat_template: str | None = None, **config: Any) -> "Processor":
        """A processor matching ``model``'s image transform and tokens per image. The model's
        ``image_token_id`` must be the tokenizer's ``<image>`` id (else its images would meet no placeholder)."""
        known = {f.name for f in fields(ProcessorConfig)} - {"image_transform", "num_image_tokens"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise TypeError(f"unknown processor option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = ProcessorConfig(image_transform=model.image_transform(), num_image_tokens=model.num_image_tokens, **config)
        processor = cls(tokenizer, cfg, chat_template)
        check_vocabulary(model, tokenizer)
        model_id = model.config.image_token_id
        if model_id != processor.image_token_id:
            raise ValueError(f"the model's image_token_id={model_id} is not the tokenizer's {IMAGE_TOKEN} id "
                             f"{processor.image_token_id}: build the model with "
                             f"image_token_id=tokenizer.convert_tokens_to_ids({IMAGE_TOKEN!r})")
        return processor

    @property
    def chat_template(self) -> str:
        return self.tokenizer.chat_template

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id] + [self.tokenizer.convert_tokens_to_ids(t) for t in self.config.stop_tokens]
        return sorted({int(i) for i in ids if i is not None})

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer files, the chat template and processor_config.json into ``path``
        atomically (files of a model already there are kept)."""
        with atomic_dir(path) as tmp:
            self.tokenizer.save_pretrained(str(tmp))
            (tmp / "chat_template.jinja").write_text(self.chat_template)
            (tmp / PROCESSOR_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Processor":
        """The processor saved in ``path``. Missing or damaged files (processor_config.json, the tokenizer,
        the chat template) are one-line errors naming them; no remote code runs."""
        from transformers import AutoTokenizer

        path = Path(path)
        cfg_file = path / PROCESSOR_CONFIG
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no {PROCESSOR_CONFIG}: not an mmlm checkpoint directory")
        try:
            data = json.loads(cfg_file.read_text())
            config = ProcessorConfig.from_dict(data)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{cfg_file} is not a valid processor config ({type(e).__name__}: {e})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError) as e:  # missing or damaged tokenizer files: transformers' many-line message
            raise ValueError(f"{path}: cannot load the tokenizer ({' '.join(str(e).split())}); a checkpoint holds "
                             "the tokenizer files that Processor.save_pretrained writes") from None
        if tokenizer.eos_token_id is None and not (config.stop_tokens and tokenizer.pad_token_id is not None):
            # generation would never stop, and batches could not be padded (a traceback in the first pad)
            raise ValueError(f"{path}: the tokenizer has no end-of-sequence token (is tokenizer_config.json "
                             "missing?): a checkpoint holds the tokenizer files that Processor.save_pretrained writes")
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else None
        if template is None and not getattr(tokenizer, "chat_template", None):
            # the prompt format travels with the weights: mmlm's default one could be the wrong format, silently
            raise FileNotFoundError(f"{path} has no chat_template.jinja (and its tokenizer no chat template): the "
                                    "prompt format the model was trained with is missing")
        return cls(tokenizer, config, template)

    # ---------------------------------------------------------------- encoding
    def caption_conversation(self, caption: str | None = None) -> list[dict]:
        """The conversation a caption sample trains (or a caption request prompts)."""
        msgs = [{"role": "user", "content": self.config.caption_prompt}]
        if caption is not None:
            msgs.append({"role": "assistant", "content": caption})
        return msgs

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.config.system_prompt and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.config.system_prompt}] + messages
        return messages

    def encode(self, conversation: Sequence[dict], images: Sequence[Image.Image] = (), *,
               add_generation_prompt: bool = False, key: str | int | None = None, pixel_dtype: str = "float",
               on_overflow: str | None = None) -> dict | None:
        """One sample -> ``{input_ids (L,), labels (L,), pixel_values (n, 3, H, W) | None, num_images}``.

        ``pixel_dtype="float"``: pixel values normalised as the image transform says (float32);
        ``"uint8"``: the fitted RGB images, not normalised (the model normalises them on its device,
        see ``mmlm.pixels``; what the training data pipeline sends). Returns None only when the
        sample cannot be cut to max_length (an image span, every answer token) and ``on_overflow``
        (default: the config's) is "drop". Errors name the sample by ``key`` (``__call__`` passes each
        sample's index in the batch).
        """
        check_pixel_dtype(pixel_dtype)
        messages = self._with_system(place_images(normalize_messages(conversation, key), len(images), key,
                                                  self.config.image_placement))
        ids, mask = self._tokenize(messages, add_generation_prompt)
        if not add_generation_prompt and not mask.any() and any(
                m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise ValueError(f"{_name(key)}the chat template masks every label: none of the assistant's tokens is "
                             "inside {% generation %}...{% endgeneration %}, so the sample has nothing to learn")
        ids, labels = self._expand_images(ids, np.where(mask, ids, -100))
        if not add_generation_prompt:  # a prompt is never cut (see the module docstring)
            try:
                ids, labels = self._truncate(ids, labels, key)
            except SampleTooLong:
                if (on_overflow or self.config.on_overflow) == "drop":
                    return None
                raise
        pixel_values = None
        if images:
            to_tensor = self.image_transform.to_uint8 if pixel_dtype == "uint8" else self.image_transform
            pixel_values = torch.stack([to_tensor(im) for im in images])
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "num_images": len(images)}

    def _tokenize(self, messages: list[dict], add_generation_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
        """The chat template's rendering of ``messages`` as token ids (L,) and the assistant mask (L,): True
        at the tokens whose characters overlap a ``{% generation %}`` span (all False for a generation prompt).

        Not transformers' ``return_assistant_tokens_mask``, which maps only a span's first and last
        characters to tokens: with a tokenizer that trims whitespace from its offsets (GPT-2's), a span
        that starts with a space (``vicuna_v1``'s ``" " + answer``) maps to no token, and transformers
        then drops that span and every later one of the sample (no labels, silently); one that ends on
        such a character labels the rest of the sequence."""
        from transformers.utils.chat_template_utils import render_jinja_template

        tok = self.tokenizer
        rendered, spans = render_jinja_template(
            conversations=[messages], chat_template=tok.get_chat_template(), add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=not add_generation_prompt, **tok.special_tokens_map,
        )
        text = rendered[0]
        if add_generation_prompt:
            ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)  # (L,)
            return ids, np.zeros(len(ids), dtype=bool)
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"labels need a fast tokenizer (character offsets); got {type(tok).__name__}")
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)  # (L,)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (L, 2) [start, end)
        start, end = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans[0]:  # [lo, hi) characters of one generation span
            mask |= np.where(end > start, (start < hi) & (end > lo), (start >= lo) & (start < hi))
        return ids, mask

    def _expand_images(self, ids: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Repeat each image token ``num_image_tokens`` times (labels -100 there): (L,), (L,)."""
        img, n = self.image_token_id, self.config.num_image_tokens
        ids_a = np.asarray(ids, dtype=np.int64)  # (L,)
        is_img = ids_a == img
        repeats = np.where(is_img, n, 1)
        labels_a = np.where(is_img, -100, np.asarray(labels, dtype=np.int64))
        return torch.from_numpy(np.repeat(ids_a, repeats)), torch.from_numpy(np.repeat(labels_a, repeats))

    def _truncate(self, ids: torch.Tensor, labels: torch.Tensor, key: str | None):
        max_len = self.config.max_length
        if ids.numel() <= max_len:
            return ids, labels
        img_pos = (ids == self.image_token_id).nonzero().flatten()
        if img_pos.numel() and int(img_pos[-1]) >= max_len:
            raise ImageSpanTruncated(
                f"{_name(key)}{ids.numel()} tokens exceed max_length={max_len} and the cut would fall inside an "
                f"image span (last image token at {int(img_pos[-1])}); raise max_length or use on_overflow='drop'"
            )
        labelled = (labels != -100).nonzero().flatten()
        if labelled.numel() and int(labelled[0]) >= max_len:
            raise AnswerTruncated(
                f"{_name(key)}{ids.numel()} tokens exceed max_length={max_len} and the cut would remove every answer "
                f"token (the first at {int(labelled[0])}); raise max_length, shorten the prompt or use "
                "on_overflow='drop'"
            )
        return ids[:max_len], labels[:max_len]

    # ---------------------------------------------------------------- batches
    def pad(self, samples: Sequence[dict], padding_side: str = "right") -> dict:
        """Stack encoded samples: input_ids/labels/attention_mask (B, L), pixel_values (N, 3, H, W),
        num_images (B,). ``padding_side="left"`` for generation."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(s["input_ids"].numel() for s in samples)
        pad_id = self.tokenizer.pad_token_id
        batch = len(samples)
        input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = s["input_ids"].numel()
            sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = s["input_ids"]
            labels[i, sl] = s["labels"]
            attention_mask[i, sl] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": cat_pixel_values([s["pixel_values"] for s in samples]),
            "num_images": torch.tensor([s["num_images"] for s in samples], dtype=torch.long),
        }

    def __call__(self, images=None, text: str | Sequence[str] | None = None,
                 conversations: Sequence[dict] | Sequence[Sequence[dict]] | None = None) -> dict:
        """Batch inputs. ``text`` (prompts, one per sample): left-padded generation inputs, no labels.
        ``conversations`` (one or a list): right-padded training inputs with labels; a batch in which no
        token is labelled (no assistant turn anywhere) is refused, as its loss would be NaN.
        ``images``: one image, a list (one per sample), or a list of lists (several per sample)."""
        if (text is None) == (conversations is None):
            raise ValueError("pass exactly one of text= (prompts) or conversations=")
        if text is not None:
            prompts = [text] if isinstance(text, str) else list(text)
            convs = [[{"role": "user", "content": p}] for p in prompts]
        else:
            convs = [conversations] if conversations and isinstance(conversations[0], dict) else list(conversations)
        if not convs:
            raise ValueError("no samples: pass at least one prompt or conversation")
        per_sample = _images_per_sample(images, len(convs))
        generating = text is not None
        # errors name the sample by its index in the batch
        # a batch has no row to drop: a sample that cannot be cut raises, whatever on_overflow says
        samples = [self.encode(c, ims, add_generation_prompt=generating, key=i, on_overflow="raise")
                   for i, (c, ims) in enumerate(zip(convs, per_sample))]
        if generating:
            batch = self.pad(samples, "left")
            del batch["labels"]  # generation prompts supervise nothing
            return batch
        batch = self.pad(samples, "right")
        if not bool((batch["labels"] != -100).any()):
            raise ValueError("no token of the batch is labelled (no conversation has an assistant turn), so its "
                             "loss would be NaN; for generation inputs pass text= (prompts)")
        return batch

    def prompt_inputs(self, images: Sequence[Image.Image | Sequence[Image.Image]], prompts: Sequence[str | None]) -> dict:
        """Left-padded generation inputs; a None prompt means the caption prompt."""
        texts = [self.config.caption_prompt if p is None else p for p in prompts]
        return self(images=list(images), text=texts)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def batch_decode(self, ids) -> list[str]:
        return [self.decode(row) for row in ids]


def check_vocabulary(model, tokenizer) -> None:
    """A ``ValueError`` when the tokenizer has ids past the model's input embeddings: the first forward would
    fail with a bare ``IndexError`` (a device-side assert on a GPU)."""
    rows = model.lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows: "
                         "build the model with text={'hf_config': {'vocab_size': len(tokenizer)}}")


def _images_per_sample(images, n: int) -> list[list[Image.Image]]:
    if images is None:
        return [[] for _ in range(n)]
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(_NOT_AN_IMAGE.format(type(images).__name__))
    images = list(images)
    if len(images) != n:
        raise ValueError(f"{len(images)} image entries for {n} samples (pass one entry per sample)")
    out = [[im] if isinstance(im, Image.Image) else list(im or []) if isinstance(im, (list, tuple, type(None)))
           else im for im in images]
    for entry in out:
        bad = [x for x in (entry if isinstance(entry, list) else [entry]) if not isinstance(x, Image.Image)]
        if bad:
            raise TypeError(_NOT_AN_IMAGE.format(type(bad[0]).__name__))
    return out


_NOT_AN_IMAGE = ("images must be PIL images (one per sample, or a list per sample), got {}: open files with "
                 "mmlm.api.open_image (it decodes as training does), arrays with PIL.Image.fromarray")
