"""Caption every image in a folder (recursively) into a JSONL file, using only the public API.

Run it with a checkpoint directory (for example the one `mmlm quickstart` leaves in
mmlm-quickstart/model):

    python demos/describe_folder.py photos/ --model mmlm-quickstart/model --out captions.jsonl
    python demos/describe_folder.py photos/ --model DIR --out answers.jsonl --prompt "what color is the star?"

Each line of the output is ``{"path": ..., "prompt": ..., "text": ...}``. The file is written to
a temporary name and renamed when complete. ``mmlm describe photos/ --model DIR --out FILE``
does the same from the command line, plus shards, unreadable images reported in the output and
resume. (Here unreadable images are only listed on stderr and skipped.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

import mmlm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception as e:
        print(f"{path}: {type(e).__name__}: {e}", file=sys.stderr)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Caption a folder of images into JSONL with mmlm.describe.")
    parser.add_argument("folder", help="folder searched recursively for images")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--prompt", default=None, help="a question instead of the checkpoint's caption prompt")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    if not folder.is_dir():
        parser.error(f"not a folder: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    readable = [p for p in images if _readable(p)]
    if len(readable) < len(images):
        print(f"skipping {len(images) - len(readable)} unreadable image(s)", file=sys.stderr)
    images = readable
    if not images:
        parser.error(f"no readable images under {folder}")

    try:
        vlm, processor = mmlm.load(args.model, device=args.device)  # load once, describe in batches
    except (OSError, ValueError) as e:  # no such directory, a damaged checkpoint, a bad --device
        parser.error(f"--model {args.model}: {e}")
    texts = mmlm.describe([str(p) for p in images], model=(vlm, processor), prompt=args.prompt,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=True)
    prompt = args.prompt if args.prompt is not None else processor.config.caption_prompt

    lines = [json.dumps({"path": str(p), "prompt": prompt, "text": t}, ensure_ascii=False) + "\n"
             for p, t in zip(images, texts)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)  # no half-written output
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    os.replace(tmp, out)
    print(f"described {len(images)} images -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
