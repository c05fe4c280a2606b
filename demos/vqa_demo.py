"""Ask a few questions about a few images and print the answers as a table (public API only).

    python demos/vqa_demo.py --model mmlm-quickstart/model red.png blue.png \\
        --question "what color is the star?" --question "how many shapes are there?"

Without --question the model is asked for a caption (the checkpoint's caption prompt). The
model is loaded once with ``mmlm.load``; each question is one batched ``mmlm.describe`` call
over all the images.
"""

from __future__ import annotations

import argparse
import os
import sys

import mmlm


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line per cell
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: list[list[str]], header: list[str], max_width: int = 48) -> str:
    rows = [[_cell(c, max_width) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Visual question answering on a few images with mmlm.describe.")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--question", action="append", default=None,
                        help="a question (repeatable); default: the caption prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        parser.error(f"no such image: {missing[0]}")

    try:
        vlm, processor = mmlm.load(args.model, device=args.device)
    except (OSError, ValueError) as e:  # no such directory, a damaged checkpoint, a bad --device
        parser.error(f"--model {args.model}: {e}")
    questions = args.question or [processor.config.caption_prompt]
    rows = []
    for q in questions:
        answers = mmlm.describe(args.images, model=(vlm, processor), prompt=q, max_new_tokens=args.max_new_tokens)
        rows += [[os.path.basename(img), q, a] for img, a in zip(args.images, answers)]
    print(table(rows, ["image", "question", "answer"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
