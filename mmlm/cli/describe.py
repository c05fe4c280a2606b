"""``mmlm describe PATH... --model DIR``: caption images, or answer ``--prompt`` about them.

One image without ``--out``: the text streams to the terminal as it is generated. Otherwise
batched generation (images decoded by a background thread meanwhile) with a progress bar on
stderr, printing ``PATH<TAB>TEXT`` lines, or with ``--out`` writing JSONL that a re-run resumes.
Input discovery, the loader and the resume logic live in :mod:`mmlm.inference`; generation is
:func:`mmlm.api.generate_texts`, the same code as :func:`mmlm.describe`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  mmlm describe cat.jpg --model mmlm-quickstart/model        # stream one caption
  mmlm describe photos/ --model mmlm-quickstart/model --out caps.jsonl
  mmlm describe 'data/test-{000000..000003}.tar' --model DIR --out caps.jsonl --batch-size 32
  mmlm describe img/*.png --model DIR --prompt "what color is the star?" --max-new-tokens 8

inputs:
  PATH is an image file, a folder (searched recursively for jpg/jpeg/png/webp/bmp/gif/tif/tiff
  images and .tar/.tar.gz/.tgz shards), a glob ('**' recurses; quote it to let mmlm expand it), a
  brace pattern, or a webdataset shard (.tar): each sample's first image, reported as key SHARD#KEY.
  A missing path is an error before anything is loaded or written (exit 2).

output:
  one image and no --out: the text as it is generated. Otherwise one PATH<TAB>TEXT line per image
  on stdout (newlines and tabs in the text written as \\n and \\t), or with --out FILE one JSON
  object per line: {"path" or "key", "prompt", "text"}, or {"path" or "key", "prompt", "error"}
  for an image that could not be read (the run goes on). Lines are appended and flushed per batch;
  re-running with the same --out skips the images already described with the same prompt (a
  truncated last line of a killed run is dropped, failed images are retried).

exit status: 0 all images described; 1 some could not be read; 2 bad arguments or paths.
"""

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# ---------------------------------------------------------------------------------- shared options
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (mmlm save_pretrained)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (default: the CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto: bfloat16 on a GPU that supports it, else float32")


def add_decoding_args(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help="most tokens generated per reply (default %(default)s)")
    g.add_argument("--num-beams", type=int, default=1, metavar="N",
                   help="beam search width (default 1: greedy, or sampling with --do-sample); beams do not stream")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature when sampling (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling threshold (default 1.0: off)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K most likely tokens (default 0: all)")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed for sampling (reproducible output): describe seeds each image by its path (the same "
                        "text at any --batch-size and in a resumed run), chat each reply by its turn")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end a reply at this string (not included); repeatable")
    g.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                   help="KV cache: dynamic (grows per token, default) or static (preallocated for prompt + "
                        "--max-new-tokens; same output)")
    g.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step (torch.compile; CUDA graphs on a GPU; implies --cache "
                        "static): each new batch size compiles first (seconds), then decodes faster (2 CPU cores: "
                        "about 2x images/s at --batch-size 1, 0.9-1.35x at 16); same greedy output; not with --num-beams")


def generation_config(args):
    """The ``GenerationConfig`` the decoding options ask for (ValueError on bad values)."""
    from mmlm.generation import GenerationConfig

    if any(not s for s in getattr(args, "stop", None) or []):  # "" is in every text: every reply would be empty
        raise ValueError("--stop must not be empty")

    return GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            cache=args.cache, compile=args.compile)


def check_model_args(args) -> None:
    """Bad --model/--device values as one-line errors, before anything heavy is loaded."""
    if not _DEVICE.match(args.device):
        raise ValueError(f"--device must be auto, cpu, mps, cuda or cuda:N, got {args.device!r}")
    from mmlm.api import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as e:  # a CUDA or MPS device this machine does not have
        raise ValueError(f"--device {str(e).replace('(use cpu)', '(use --device cpu)')}") from None
    from mmlm.checkpoint import check_model_dir

    check_model_dir(Path(args.model))


def load_model(args):
    from mmlm.api import load

    return load(args.model, device=args.device, dtype=args.dtype)


# ---------------------------------------------------------------------------------- describe
def add_parser(sub) -> None:
    p = sub.add_parser(
        "describe",
        help="caption images (files, folders, globs, shards) or answer a question about them",
        description=(
            "Describe images with a checkpoint: a caption by default (the checkpoint's caption prompt), or the "
            "answer to --prompt. One image streams to the terminal; many are batched, with a progress bar, "
            "and written as PATH<TAB>TEXT lines or as JSONL with --out (resumable)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="images, folders, globs or .tar shards")
    add_model_args(p)
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="ask this instead of the checkpoint's caption prompt (formatted by its chat template)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="write JSONL results here (appended per batch; a re-run skips what is done; FILE.jsonl.run.json "
                        "records the model and decoding options, and a re-run with others is refused)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images generated together (default 16)")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="threads decoding images ahead of generation (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal stderr only)")
    add_decoding_args(p)
    p.set_defaults(run=run)


def _shown(path: str) -> str:
    """A path for the terminal (file names that are not UTF-8 shown with replacement characters)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _tsv(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def run(args) -> int:
    from mmlm import inference

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    config = generation_config(args)
    from mmlm.processing import IMAGE_TOKEN

    if args.prompt is not None and args.prompt.count(IMAGE_TOKEN) > 1:  # before the model loads and --out opens
        raise ValueError(f"--prompt has {args.prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders, but describe gives "
                         f"each prompt one image (at most one {IMAGE_TOKEN})")
    sources = inference.discover_inputs(args.paths)  # missing paths fail here, before anything is written
    if not sources:
        raise FileNotFoundError("no images to describe")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file name such as {out}/results.jsonl")
    check_model_args(args)
    if out is None and len(sources) == 1 and not sources[0].shard:
        return _describe_one(args, sources[0].path, config)

    if out is not None:
        inference.read_done(out, rewrite=False)  # a file that is not ours fails here, before the model loads
    ids = inference.entry_ids(sources)
    vlm, processor = load_model(args)
    prompt_text = processor.config.caption_prompt if args.prompt is None else args.prompt
    done: set = set()
    if out is not None:
        settings = run_settings(args, vlm, config)
        inference.check_run_record(out, settings)  # another model's or other options' results: refused
        # drops a truncated last line, and the error lines of this run's images (retried)
        done = inference.read_done(out, retry={(i, prompt_text) for i in ids}, log=sys.stderr)
    todo = sum(1 for i in ids if (i, prompt_text) not in done)
    if out is not None and todo < len(ids):
        print(f"{out}: {len(ids) - todo} of {len(ids)} images already described; {todo} to go", file=sys.stderr)
    if todo == 0:
        return 0

    from tqdm.auto import tqdm

    entries = inference.iter_entries(sources, skip=lambda i: (i, prompt_text) in done)
    failed = 0
    sink = None
    if out is not None:
        inference.write_run_record(out, settings)
        sink = inference.open_results(out)
    bar = tqdm(total=todo, unit="img", desc="describe", file=sys.stderr, disable=args.no_progress or None,
               dynamic_ncols=True)
    try:
        with inference.PrefetchLoader(entries, args.batch_size, workers=args.workers) as loader:
            for results in inference.describe_batches(vlm, processor, loader, args.prompt, config, args.stop):
                for r in results:
                    if "error" in r:
                        failed += 1
                        bar.write(f"error: {_shown(inference.result_id(r))}: {r['error']}", file=sys.stderr)
                    elif sink is None:
                        sys.stdout.write(f"{_shown(inference.result_id(r))}\t{_tsv(r['text'])}\n")
                if sink is not None:
                    sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
                    sink.flush()
                else:
                    sys.stdout.flush()
                bar.update(len(results))
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    if failed:
        print(f"{failed} of {todo} images could not be read" + (f" (see \"error\" in {out})" if out else ""),
              file=sys.stderr)
    return 1 if failed else 0


def run_settings(args, vlm, config) -> dict:
    """What decides ``describe --out``'s texts besides the image and prompt (kept in ``OUT.run.json``): the
    checkpoint (``mmlm.checkpoint.model_fingerprint``), the device type and dtype it ran in, the generation
    options and the stop strings."""
    import dataclasses

    from mmlm.checkpoint import model_fingerprint

    param = next(vlm.parameters())
    return {**model_fingerprint(args.model), "device": param.device.type,
            "dtype": str(param.dtype).removeprefix("torch."), "generation": dataclasses.asdict(config),
            "stop": list(args.stop or [])}


def _describe_one(args, path: str, config) -> int:
    """One image: stream the text to stdout as it is generated."""
    from mmlm.api import generate_texts, open_image
    from mmlm.inference import StreamPrinter

    try:
        image = open_image(path)
    except Exception as e:
        print(f"error: {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    vlm, processor = load_model(args)
    printer = StreamPrinter(sys.stdout, args.stop)
    text = generate_texts(vlm, processor, [image], [args.prompt], config, args.stop, on_text=printer,
                          seed_keys=[path])[0]  # seeded by its path, as among many images
    printer.finish(text)
    return 0
