"""Named chat templates with ``{% generation %}`` marks, and the choice of one for an LM.

mmlm's labels cover exactly the assistant text that the chat template marks with
``{% generation %}...{% endgeneration %}``; most LMs' own templates carry no such marks.
This module holds the common prompt formats written with the marks:

- ``chatml`` (Qwen, SmolLM2-Instruct, ...): ``<|im_start|>user\\n...<|im_end|>``;
- ``vicuna_v1`` (LLaVA-1.5 / Vicuna v1.1): ``USER: <image>\\n... ASSISTANT: ...</s>``;
- ``llama3``: ``<|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>``;
- ``mmlm``: mmlm's own format for from-scratch models (``<|user|>...<|end|>``).

Every template accepts both string message contents (mmlm's conversations, with ``<image>``
where an image goes) and transformers' list contents (``[{"type": "image"}, {"type": "text",
"text": ...}]``: the images go first, as ``<image>`` each and one newline, then the text), so the
same template serves ``mmlm`` and an exported ``LlavaProcessor``.

The rendered template is the whole input: the mmlm processor never adds special tokens around it,
so templates for LMs whose tokenizer adds a BOS token (``vicuna_v1``, ``llama3``) write
``bos_token`` themselves. transformers does not reliably skip a tokenizer's own BOS: in
transformers 5, only a processor's ``apply_chat_template(..., tokenize=True)`` does (when the
prompt starts with it); ``processor(text=prompt)`` and ``tokenizer(prompt)`` add a second one.
So an export's tokenizer is written not to add special tokens
(:func:`mmlm.interop.export.prompt_tokenizer`), and every way of calling it gives mmlm's ids.
A named template without ``bos_token`` (``chatml``) on an LM whose tokenizer adds one gets it written
first (:func:`with_bos`; :func:`renders_bos` tells whether a template writes it).

``choose_chat_template(tokenizer, name)`` picks, in order: the template named ``name``; the
tokenizer's own template if it already has generation marks (its stop token: the special token that ends
its generation span, when not eos, found by rendering a probe conversation); the named template whose markers
the tokenizer's template (or, without one, its vocabulary) shows; else it raises an error that
says how to name one from each entry point (``TEMPLATE_OPTIONS``: ``mmlm fit --model.chat_template
NAME``, ``mmlm import hf --chat-template NAME``, Python ``chat_template=NAME``; this module knows
them as text only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from mmlm.processing import DEFAULT_CHAT_TEMPLATE

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")

TEMPLATE_OPTIONS = ("`mmlm fit --model.chat_template NAME`, `mmlm import hf --chat-template NAME` "
                    "or, in Python, chat_template=NAME")
"""How a user names a chat template from each entry point (for error messages)."""

# Turns transformers-style list contents into strings, so each template below only deals with
# strings: images first ("<image>" each, then one newline, as mmlm places images), then the text.
LIST_CONTENT_PRELUDE = (
    "{%- set ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.msgs = ns.msgs + [m] -%}"
    "{%- else -%}"
    "{%- set c = namespace(images='', text='') -%}"
    "{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set c.images = c.images + '<image>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set c.text = c.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if c.images -%}{%- set c.images = c.images + '\n' -%}{%- endif -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': c.images + c.text}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
)

_BOS = "{%- if bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}"

CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# LLaVA-1.5's conv_vicuna_v1: "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:". The space after
# "ASSISTANT:" belongs to the answer, so that the generation prompt ends where training's did.
VICUNA_V1 = (
    _BOS
    + "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

LLAMA3 = (
    _BOS
    + "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}{{ message['content'] + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A prompt format: the Jinja text plus the tokens it needs."""

    name: str
    template: str
    """Jinja source (with ``{% generation %}`` marks)."""
    special_tokens: tuple[str, ...] = ()
    """Tokens the template writes that must be single tokens (added to a tokenizer that lacks them)."""
    stop_tokens: tuple[str, ...] = ()
    """End-of-turn tokens that end generation (besides the tokenizer's eos)."""
    markers: tuple[str, ...] = field(default=(), compare=False)
    """Strings whose presence in an LM's own template identifies this format (all must occur);
    a template without markers is only chosen by name."""
    description: str = ""


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("chatml", LIST_CONTENT_PRELUDE + CHATML, ("<|im_start|>", "<|im_end|>"), ("<|im_end|>",),
                     ("<|im_start|>",), "Qwen / ChatML: <|im_start|>role\\n...<|im_end|>"),
        ChatTemplate("llama3", LIST_CONTENT_PRELUDE + LLAMA3,
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("<|eot_id|>",),
                     ("<|start_header_id|>",), "Llama 3: <|start_header_id|>role<|end_header_id|>...<|eot_id|>"),
        ChatTemplate("vicuna_v1", LIST_CONTENT_PRELUDE + VICUNA_V1, (), (), ("ASSISTANT:",),
                     "LLaVA-1.5 / Vicuna v1.1: USER: <image>\\n... ASSISTANT: ...</s>"),
        ChatTemplate("mmlm", LIST_CONTENT_PRELUDE + DEFAULT_CHAT_TEMPLATE,
                     ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), ("<|end|>",),
                     (), "mmlm's from-scratch format: <|user|>...<|end|>"),
    )
}


def has_generation_marks(template: str | None) -> bool:
    """Whether ``template`` marks assistant text with ``{% generation %}``."""
    return bool(template) and bool(_GENERATION_RE.search(template))


def get_template(name: str) -> ChatTemplate:
    """The named template; an unknown name lists the known ones."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def detect_template(tokenizer) -> str | None:
    """The name of the template whose markers the tokenizer's own template shows, or (when it
    has none) whose special tokens its vocabulary holds; None when nothing matches."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: use the default one
        own = own.get("default") or next(iter(own.values()), None)
    if own:
        for t in TEMPLATES.values():
            if t.markers and all(m in own for m in t.markers):
                return t.name
        return None
    vocab = tokenizer.get_vocab()
    for t in TEMPLATES.values():
        if t.markers and t.special_tokens and all(s in vocab for s in t.special_tokens):
            return t.name
    return None


_PROBES = (  # a user turn and an answer, with string and with transformers' list contents
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}],
)


def _render_probe(tokenizer, template: str) -> tuple[str, list[tuple[int, int]]] | None:
    """A probe conversation rendered with ``template`` and its generation spans ([lo, hi) characters);
    None when the template renders neither probe."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    for probe in _PROBES:
        try:
            rendered, spans = render_jinja_template(conversations=[probe], chat_template=template,
                                                    return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError):
            continue
        return rendered[0], list(spans[0])
    return None


def end_of_turn_tokens(tokenizer, template: str) -> tuple[str, ...]:
    """The token that ends the assistant's ``{% generation %}`` span in ``template`` (trailing whitespace
    aside), as a 1-tuple, when it is one of ``tokenizer``'s special or added tokens and not its eos; else ().

    Labels train that token, so generation must stop at it (``ProcessorConfig.stop_tokens``): Gemma's
    ``<end_of_turn>``, ChatML's ``<|im_end|>``... A span that ends with eos, or with plain text, needs none;
    so does a template that a probe conversation cannot render."""
    probe = _render_probe(tokenizer, template)
    if probe is None or not probe[1]:
        return ()
    text, spans = probe
    lo, hi = spans[-1]
    span = text[lo:hi].rstrip()
    added = (t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
    known = sorted({t for t in (*tokenizer.all_special_tokens, *added) if t}, key=len, reverse=True)
    end = next((t for t in known if span.endswith(t)), None)
    return () if end is None or end == tokenizer.eos_token else (end,)


def renders_bos(tokenizer, template: str) -> bool:
    """Whether ``template`` writes ``tokenizer``'s BOS token into a probe conversation (True when it cannot
    be rendered: nothing to say then)."""
    probe = _render_probe(tokenizer, template)
    return probe is None or bool(tokenizer.bos_token and tokenizer.bos_token in probe[0])


def with_bos(template: ChatTemplate) -> ChatTemplate:
    """``template`` writing ``bos_token`` first (when the tokenizer has one), as ``vicuna_v1`` and ``llama3``
    do: for an LM whose tokenizer adds a BOS that a named template does not write (``chatml`` on Gemma)."""
    return replace(template, template=_BOS + template.template)


def choose_chat_template(tokenizer, name: str | None = None, *, source: str | None = None) -> ChatTemplate:
    """The template to train and prompt ``tokenizer``'s LM with (see the module docstring).

    ``source`` names the LM in the error message. The tokenizer's own template comes back as
    ``ChatTemplate("tokenizer", ...)`` with no extra tokens; its stop token is the one that ends its
    generation span when that is not eos (:func:`end_of_turn_tokens`).
    """
    if name:
        return get_template(name)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and has_generation_marks(own):
        return ChatTemplate("tokenizer", own, stop_tokens=end_of_turn_tokens(tokenizer, own))
    detected = detect_template(tokenizer)
    if detected:
        return TEMPLATES[detected]
    what = f"the tokenizer of {source}" if source else "the tokenizer"
    why = ("has a chat template without {% generation %} marks that matches none of mmlm's named templates"
           if own else "has no chat template")
    raise ValueError(
        f"{what} {why}; name one with {TEMPLATE_OPTIONS}; the names: "
        + ", ".join(f"{n} ({TEMPLATES[n].description})" for n in template_names())
    )


def missing_special_tokens(tokenizer, template: ChatTemplate) -> list[str]:
    """The template's special tokens that ``tokenizer`` does not have as single tokens."""
    vocab = tokenizer.get_vocab()
    return [t for t in template.special_tokens if t not in vocab]
