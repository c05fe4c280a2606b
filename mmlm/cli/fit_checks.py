"""What ``mmlm fit`` checks before anything is written: bad options (with the option a misspelt one
may have meant), data paths, ``--model.init_from``, ``--ckpt_path`` and a run directory that holds a run.

Each check raises a one-line ``ValueError`` / ``FileNotFoundError`` (``mmlm fit`` exits 2) and reads
only what it needs (a checkpoint's tensors are memory-mapped, not read)."""

from __future__ import annotations

import os
from pathlib import Path


def option_strings(parser) -> list[str]:
    """Every ``--option`` of ``parser`` and of its subcommands' parsers."""
    import argparse

    found = list(getattr(parser, "_option_string_actions", {}))
    for action in getattr(parser, "_actions", []):
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += option_strings(sub)
    return found


def suggest_option(message: str, known: list[str]) -> str:
    """``message`` of an "unrecognized arguments" error, with the known option closest to each unknown
    one (``--data.trian`` -> ``did you mean --data.train?``); other messages as they are."""
    import difflib

    if "unrecognized arguments" not in message.lower():
        return message
    options = sorted({k for k in known if k.startswith("--")})
    hints = []
    for word in message.split():
        name = word.split("=", 1)[0]
        if name.startswith("--") and name not in options:
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
            if close:
                hints.append(close[0])
    return message + (f" (did you mean {', '.join(hints)}?)" if hints else "")


def check_shards(datamodule_class, data) -> None:
    """For the ``VLMDataModule``: expand ``data.train`` / ``data.val`` now, so that a missing path or a
    directory with no shard stops the run (exit 2) before its run directory is written (the module
    itself expands them when it builds a loader, after the model, the tokenizer and the pre-flight)."""
    try:
        from mmlm.data import VLMDataModule
    except ImportError:
        return
    if data is None or not (isinstance(datamodule_class, type) and issubclass(datamodule_class, VLMDataModule)):
        return
    from jsonargparse import Namespace

    from mmlm.data.sources import resolve_sources

    def plain(value):
        if isinstance(value, Namespace):
            value = value.as_dict()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    for key in ("train", "val"):
        spec = plain(data.get(key))
        if spec is not None:
            try:
                resolve_sources(spec, allow_pipes=bool(data.get("allow_pipes")),
                                allow_remote=bool(data.get("allow_remote")))
            except (ValueError, FileNotFoundError) as e:  # which option (a recipe's path left in place?)
                hint = " (or --data.val null: no validation)" if key == "val" else ""
                raise type(e)(f"data.{key}: {e}{hint}") from None


def check_new_run_dir(root: str, checkpoint_dir: str | None, model_dirname: str = "model") -> None:
    """A new run (no ``--ckpt_path``) into a run directory that holds a run's checkpoints or exported
    model would overwrite its model and config and leave two runs' checkpoints side by side: refused
    (exit 2) before anything is written."""
    found = sorted(p.name for p in Path(checkpoint_dir).glob("*.ckpt")) if checkpoint_dir and \
        os.path.isdir(checkpoint_dir) else []
    if (Path(root) / model_dirname / "config.json").is_file():
        found.append(f"{model_dirname}/")
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"{root} already holds a run ({shown}): resume it with --ckpt_path last, or train a new "
                         f"one in another --trainer.default_root_dir (or delete {root} first)")


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Raise ``ValueError`` unless ``path`` (which may not exist yet) can be created and written: its nearest
    existing ancestor is a writable directory (a read-only mount fails here, not at the first checkpoint)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"{option} {path}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write in {p} (read-only file system or no permission)")


def check_max_steps(ckpt_path: str, max_steps: int | None) -> None:
    """A resumed run must end after the step its checkpoint reached (a smaller ``trainer.max_steps``
    trained nothing and exported the checkpoint's model as if it had)."""
    if max_steps is None or max_steps < 0:
        return
    import torch

    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip file (mmap needs one)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    step = int(ckpt.get("global_step", 0)) if isinstance(ckpt, dict) else 0
    if max_steps < step:
        raise ValueError(f"--trainer.max_steps {max_steps} is below the step the checkpoint reached ({step}, "
                         f"{ckpt_path}): give a larger --trainer.max_steps to train on, or use its model as it is")


def check_init_from(model) -> None:
    """For a fresh run: a ``model.init_from`` that is no mmlm checkpoint directory (a typo, a run directory
    instead of its ``model/``) stops the run (exit 2) before its run directory is written (the module
    itself reads it when it builds the model, after the logs and config.yaml are written)."""
    path = model.get("init_from") if model is not None and hasattr(model, "get") else None
    if not path:
        return
    from mmlm.checkpoint import read_config

    try:
        cfg = read_config(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"--model.init_from: {e}") from None
    max_length = model.get("max_length")
    if max_length:  # as the module checks it when it builds the model, after a multi-process start
        from mmlm.training.build import check_positions

        check_positions(cfg.updated(**(model.get("model_overrides") or {})), int(max_length), from_scratch=False)


def check_checkpoint_file(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a readable Lightning checkpoint file (the tensors are
    memory-mapped, not read)."""
    if not os.path.isfile(path):
        raise ValueError(f"no such checkpoint file: {path} (--ckpt_path takes a .ckpt file, or `last`)")
    import torch

    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip file (mmap needs one)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad argument
        raise ValueError(f"{path} is not a checkpoint mmlm can read (torch.load with weights_only=True: "
                         f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The ``global_step`` a Lightning checkpoint holds (its tensors memory-mapped, not read); None if unreadable."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - unreadable, or not a checkpoint
        return None


def find_last_checkpoint(directory: str | os.PathLike | None) -> str | None:
    """The ``last*.ckpt`` in ``directory`` at the highest training step (as Lightning's ``ckpt_path="last"``,
    which takes the newest file: a copied or moved run directory has the copy's times, and a resume there by
    Lightning's own checkpointing wrote ``last-v1.ckpt`` next to an older ``last.ckpt``), the newest of equal
    steps; unreadable files rank last. None when there is none."""
    if not directory or not os.path.isdir(directory):
        return None
    found = [p for p in Path(directory).glob("last*.ckpt") if p.is_file()]
    if not found:
        return None
    step = {p: checkpoint_step(p) for p in found}
    return str(max(found, key=lambda p: (step[p] is not None, step[p] or 0, p.stat().st_mtime)))


def check_last_checkpoint(path: str) -> None:
    """:func:`check_checkpoint_file` for the file ``--ckpt_path last`` resolved to, naming the directory's
    other checkpoints when it is unreadable (a crash while writing it can leave a truncated file)."""
    try:
        check_checkpoint_file(path)
    except ValueError as e:
        others = sorted(p.name for p in Path(path).parent.glob("*.ckpt") if p.name != Path(path).name)
        hint = f"; other checkpoints there: {', '.join(others)} (pass one with --ckpt_path FILE)" if others else ""
        raise ValueError(f"--ckpt_path last: {e}{hint}") from None
