"""``mmlm chat IMAGE --model DIR``: a multi-turn conversation about an image in the terminal.

The whole conversation is kept as chat messages and re-encoded with the checkpoint's chat
template every turn (the image goes before the first user message), then generated with
:func:`mmlm.generation.generate` and streamed through :class:`mmlm.api.TextStream`. When the
conversation no longer fits the processor's ``max_length`` (or the model's positions), the
oldest exchanges are dropped (the image stays). Works on a terminal (line editing, history)
and on piped stdin (one message per line; the transcript is echoed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mmlm.cli.describe import add_decoding_args, add_model_args, check_model_args, generation_config, load_model

HELP = """\
commands:
  /image PATH   talk about another image (starts a new conversation)
  /reset        forget the conversation so far (same image)
  /help         this help
  /quit         leave (also /exit, Ctrl-D)
anything else is your message to the model."""

EXAMPLES = """\
example:
  mmlm chat cat.jpg --model mmlm-quickstart/model --system "You answer in one word."
  you> what color is the star?
  model> red
  you> /quit

  printf 'what is this?\\nwhere is it?\\n' | mmlm chat cat.jpg --model DIR    # non-interactive

""" + HELP


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="multi-turn terminal chat about an image",
        description=(
            "Talk with a checkpoint about an image. Each turn sends the conversation so far plus your message "
            "through the checkpoint's chat template and streams the reply. Reads from the terminal (you> prompt) "
            "or, when stdin is not a terminal, one message per line."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE", help="the image to talk about")
    add_model_args(p)
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message (default: the checkpoint's system prompt, if any)")
    add_decoding_args(p, max_new_tokens=256)
    p.set_defaults(run=run)


def _open(path: str):
    from mmlm.api import open_image
    try:
        return open_image(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


class Chat:
    """The conversation state and one turn of generation."""

    def __init__(self, vlm, processor, image, config, system: str | None = None, stop_strings=(), out=None):
        self.vlm, self.processor, self.image = vlm, processor, image
        self.config, self.system, self.stop_strings = config, system, list(stop_strings)
        self.out = out if out is not None else sys.stdout
        self.turns: list[dict] = []  # user/assistant messages, alternating
        self.replies = 0  # replies in this conversation (a sampled reply's seed key)
        self.positions = getattr(vlm.lm.config, "max_position_embeddings", None) or 10**9

    def reset(self, image=None) -> None:
        self.turns = []
        self.replies = 0
        if image is not None:
            self.image = image

    def _encode(self, message: str):
        """The conversation plus ``message``, encoded; the oldest exchanges are dropped until it
        fits ``max_length`` (the processor would cut it) with room left to generate."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        turns = list(self.turns)
        while True:
            enc = self.processor.encode(head + turns + [{"role": "user", "content": message}], [self.image],
                                        add_generation_prompt=True)
            n = enc["input_ids"].numel()
            if n < self.processor.config.max_length and self.positions - n >= min(self.config.max_new_tokens, 32):
                if len(turns) < len(self.turns):
                    print(f"(the conversation got too long: the oldest {(len(self.turns) - len(turns)) // 2} "
                          "exchange(s) were forgotten)", file=sys.stderr)
                    self.turns = turns
                return enc
            if not turns:
                raise ValueError("this message is too long for the model's context; try a shorter one")
            turns = turns[2:]

    def ask(self, message: str) -> str:
        """Send one user message; stream the reply to ``out`` (after ``model> ``) and return it."""
        from mmlm.api import TextStream, stop_on_strings, trim_at_stop
        from mmlm.generation import generate
        from mmlm.inference import StreamPrinter

        from mmlm.processing import IMAGE_TOKEN

        if IMAGE_TOKEN in message:  # it would move the chat's image into this turn (placeholders place images)
            raise ValueError(f"{IMAGE_TOKEN} marks where the image goes and the chat has placed it already; "
                             "to talk about another image use /image PATH")
        enc = self._encode(message)
        room = self.positions - enc["input_ids"].numel()
        config = dataclasses.replace(self.config, max_new_tokens=min(self.config.max_new_tokens, room))
        batch = self.processor.pad([enc], "left")
        printer = StreamPrinter(self.out, self.stop_strings)
        self.out.write("model> ")
        self.out.flush()
        try:
            new = generate(
                self.vlm, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                num_images=batch["num_images"], config=config, eos_token_id=self.processor.stop_token_ids,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                stop=stop_on_strings(self.processor, self.stop_strings) if self.stop_strings else None,
                on_tokens=TextStream(self.processor, 1, printer),
                seed_keys=[self.replies],  # a sampled reply's seed: its turn (not the same draws every turn)
            )
        except KeyboardInterrupt:
            self.out.write(" [interrupted]\n")
            self.out.flush()
            return ""
        reply = printer.finish(trim_at_stop(self.processor.decode(new[0].tolist()), self.stop_strings))
        self.turns += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        self.replies += 1
        return reply


def _read_line(interactive: bool) -> str | None:
    """The next message; None at EOF. Interactive: ``you> `` prompt with line editing."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    if not line:
        return None
    line = line.rstrip("\r\n")
    print(f"you> {line}", flush=True)
    return line


def run(args) -> int:
    config = generation_config(args)
    image = _open(args.image)
    check_model_args(args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    vlm, processor = load_model(args)
    chat = Chat(vlm, processor, image, config, system=args.system, stop_strings=args.stop)
    dtype = str(next(vlm.parameters()).dtype).replace("torch.", "")
    print(f"chatting about {args.image} with {args.model} ({vlm.device}, {dtype}); "
          "/help for commands, /quit or Ctrl-D to leave", file=sys.stderr, flush=True)
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", flush=True)
            continue
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            cmd, rest = cmd.lower(), rest.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return 0
            if cmd == "/help":
                print(HELP, flush=True)
            elif cmd == "/reset":
                chat.reset()
                print("(conversation reset)", flush=True)
            elif cmd == "/image":
                if not rest:
                    print("usage: /image PATH", flush=True)
                    continue
                try:
                    chat.reset(_open(rest))
                except Exception as e:  # a bad path is reported; the chat goes on with the old image
                    print(f"error: {e}", flush=True)
                    continue
                print(f"(now talking about {rest}; conversation reset)", flush=True)
            else:
                print(f"unknown command {cmd}; /help lists the commands", flush=True)
            continue
        try:
            chat.ask(text)
        except ValueError as e:  # e.g. a message too long for the context: the chat goes on
            print(f"error: {e}", flush=True)
