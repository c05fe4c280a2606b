"""``mmlm export hf`` and ``mmlm import hf``: to and from transformers LLaVA checkpoints.

Thin: parse, call ``mmlm.interop``, print. See ``mmlm.interop.export`` and ``mmlm.interop.import_``
for what maps to what."""

from __future__ import annotations

import argparse
import sys
import warnings

_EXPORT_HELP = (
    "Write an mmlm checkpoint as a stock transformers LLaVA directory (LlavaForConditionalGeneration + "
    "LlavaProcessor) that AutoModelForImageTextToText / AutoProcessor load. Vision towers: transformers "
    "CLIP/SigLIP, or timm ViTs with CLIP's or SigLIP's layout (converted exactly); projectors: mlp2x_gelu "
    "(hidden width = the LM's) and linear. Other combinations are refused with what would be needed. "
    "Vision layers after the feature layer are not written: the export's vision_feature_layer is -1."
)
_IMPORT_HELP = (
    "Convert a transformers LLaVA checkpoint (a directory written by LlavaForConditionalGeneration."
    "save_pretrained with its processor, or a hub name) into an mmlm checkpoint that `mmlm describe`, "
    "`eval`, `chat` and `fit` use. The chat template must mark assistant text with {% generation %}; "
    "a template without marks is replaced by the named template it matches (or --chat-template)."
)


def add_parser(sub) -> None:
    fmt = argparse.HelpFormatter
    exp = sub.add_parser("export", help="export an mmlm checkpoint to another format (hf: transformers LLaVA)",
                         description=_EXPORT_HELP, formatter_class=fmt)
    exp.add_argument("format", choices=["hf"], help="target format: hf = transformers LlavaForConditionalGeneration")
    exp.add_argument("--model", required=True, metavar="DIR", help="mmlm checkpoint directory")
    exp.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist or be empty)")
    exp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="cast the weights (default: as saved)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new one is written")
    exp.set_defaults(run=run)

    imp = sub.add_parser("import", help="import a checkpoint of another format (hf: transformers LLaVA) into mmlm",
                         description=_IMPORT_HELP, formatter_class=fmt)
    imp.add_argument("format", choices=["hf"], help="source format: hf = transformers LlavaForConditionalGeneration")
    imp.add_argument("--model", required=True, metavar="DIR_OR_NAME", help="LLaVA directory or hub name")
    imp.add_argument("--out", required=True, metavar="DIR", help="mmlm checkpoint directory to write")
    imp.add_argument("--chat-template", default=None, metavar="NAME",
                     help="named chat template (chatml, llama3, vicuna_v1, mmlm); default: the checkpoint's own "
                          "when it has {%% generation %%} marks, else the named one it matches")
    imp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="cast the weights (default: float32)")
    imp.add_argument("--max-length", type=int, default=None,
                     help="the processor's longest sample in tokens (default: 2048, or the LM's position limit "
                          "when it has fewer; more than the LM's positions is an error)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new one is written")
    imp.set_defaults(run=run)


def run(args) -> int:
    from mmlm import interop

    try:
        if args.command == "export":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                out = interop.export_hf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
            print(f"wrote transformers LLaVA checkpoint to {out}")
            for w in caught:  # what the export does differently, as one line each (not a warning's source line)
                print(f"note: {w.message}", file=sys.stderr)
        else:
            if args.max_length is not None and args.max_length < 1:
                raise ValueError(f"--max-length must be >= 1, got {args.max_length}")
            interop.import_hf(args.model, args.out, chat_template=args.chat_template, dtype=args.dtype,
                              overwrite=args.overwrite, max_length=args.max_length)
            print(f"wrote mmlm checkpoint to {args.out}")
    except (OSError, ValueError) as e:  # transformers' messages span lines: keep the one-line contract
        raise ValueError(" ".join(str(e).split())) from e
    return 0
