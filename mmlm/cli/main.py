"""``mmlm``: the command line. Each subcommand lives in its own module and registers itself
with ``add_parser(subparsers)``; its ``run(args)`` returns the exit code. Errors a user can
fix (bad paths, bad options) print one ``error: ...`` line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module under mmlm.cli (loaded lazily so `mmlm --help` is fast)
COMMANDS: dict[str, str] = {
    "quickstart": "quickstart",
    "fit": "fit",
    "describe": "describe",
    "chat": "chat",
    "eval": "eval",
    "export": "interop",
    "import": "interop",
    "plot": "plot",
}


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmlm",
        description="Train and evaluate LLaVA-style vision-language models (ViT + projector + causal LM).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for name, module in COMMANDS.items():
        if module in seen:
            continue
        try:
            mod = importlib.import_module(f"mmlm.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"mmlm.cli.{module}":
                raise
            continue
        seen.add(module)
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "fit":  # LightningCLI owns its own argument parsing
        try:
            from mmlm.cli import fit
        except ModuleNotFoundError:
            print("error: `mmlm fit` arrives with the training issue (#7)", file=sys.stderr)
            return 3
        return fit.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # `mmlm describe ... | head`: the reader is gone; stop quietly, as Unix tools do
        try:  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 128 + 13  # SIGPIPE
    except (UserError, FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m mmlm.cli.main`: run the imported module so its classes are the ones raised
    from mmlm.cli.main import main as _main

    sys.exit(_main())
