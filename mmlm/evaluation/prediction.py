"""Generate predictions over a benchmark with a resumable on-disk cache, and build a
``predict_fn`` from a checkpoint.

Contract
--------
A ``predict_fn(images: list[PIL.Image], prompts: list[str|None]) -> list[str]`` (:data:`PredictFn`)
is the only thing needed from a model; :func:`model_predict_fn` builds one from a checkpoint
directory (``mmlm.load``) or a ``(vlm, processor)`` pair, greedy by default, and
:func:`resolve_device` maps ``"auto"`` to the GPU when there is one.

:func:`predict` runs a ``predict_fn`` over benchmark items in batches and returns
``(predictions, skipped)``. With ``cache_path`` (the runner uses ``out_dir/`` :data:`CACHE_NAME`)
the cache is an append-only JSON-lines file: first line ``{"fingerprint": {...}}``, then one
``{"id", "prediction"}`` line per item, flushed and fsync-ed after every batch. A rerun with the
same fingerprint skips the ids already there (an interrupted run resumes); a different
fingerprint (other model/prompt/generation settings, other data files or contents) is refused with
:class:`EvalError`, naming the keys that differ (``data_sha256.questions`` for one entry of a nested
mapping), unless ``resume=False``, which starts the cache afresh. A torn last line is dropped (the cache is then
rewritten atomically). An item whose image cannot be read is skipped and reported in ``skipped`` (the
runner then scores it as wrong, with an empty prediction);
more than ``max_bad_fraction`` of the items (at least 1) stops the run with :class:`EvalError`,
and so does a run in which no item at all has a prediction (every image unreadable), whatever
the budget. The cache fingerprint is the caller's: ``mmlm eval`` puts the resolved device type
and dtype in it, so a run is never resumed with other numerics, and :func:`.runner.evaluate` the
data files' paths and the annotation/question files' SHA-256 (an edited file is another run).
Nothing here scores or writes result files; see :mod:`.scoring` and :mod:`.runner`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .benchmarks import Item, atomic_write_text, load_image
from .errors import EvalError

__all__ = ["PredictFn", "CACHE_NAME", "predict", "model_predict_fn", "resolve_device"]

PredictFn = Callable[[list, list], list]
CACHE_NAME = "predictions.cache.jsonl"


# --------------------------------------------------------------------------- prediction cache


def _read_cache(path: Path) -> tuple[dict | None, dict[str, str], bool]:
    """-> (fingerprint, {id: prediction}, clean). ``clean`` is False when a torn/invalid line was dropped."""
    fingerprint: dict | None = None
    done: dict[str, str] = {}
    clean = True
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        clean = False
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            clean = False
            continue
        if i == 0 and isinstance(obj, dict) and "fingerprint" in obj:
            fingerprint = obj["fingerprint"]
        elif isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("prediction"), str):
            done[obj["id"]] = obj["prediction"]
        else:
            clean = False
    return fingerprint, done, clean


def _cache_text(fingerprint: dict, done: Mapping[str, str]) -> str:
    lines = [json.dumps({"fingerprint": fingerprint}, ensure_ascii=False, sort_keys=True)]
    lines += [json.dumps({"id": k, "prediction": v}, ensure_ascii=False) for k, v in done.items()]
    return "\n".join(lines) + "\n"


def _differences(old: Mapping, new: Mapping) -> list[str]:
    """The fingerprint keys whose values differ; in a nested mapping (``data``, ``data_sha256``) the entries,
    e.g. ``data_sha256.questions``: that names the file that was edited."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{k}.{sub}" for sub in _differences(a, b)]
        else:
            out.append(k)
    return out


def _open_cache(path: Path, fingerprint: dict, resume: bool) -> dict[str, str]:
    """Load (or start) the cache; returns the predictions already done."""
    fingerprint = json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists, ...)
    if path.exists() and resume:
        old, done, clean = _read_cache(path)
        if old is not None and old != fingerprint and not done:  # a run that failed before any prediction
            old, clean = None, False
        if old is not None and old != fingerprint:
            diff = _differences(old, fingerprint)
            raise EvalError(
                f"{path} holds predictions of a different run (differs in: {', '.join(diff)}); "
                "use another --out or pass --no-resume to discard it"
            )
        if old is None or not clean:
            atomic_write_text(path, _cache_text(fingerprint, done))
        return done
    atomic_write_text(path, _cache_text(fingerprint, {}))
    return {}


def _lock_cache(cache: Path):
    """An exclusive lock on ``cache`` for this run (a lock file next to it; POSIX ``flock``): two runs into one
    ``--out`` would append to, or one replace, the other's cache. Raises :class:`EvalError` when it is held."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: unlocked, as before
        return None
    cache.parent.mkdir(parents=True, exist_ok=True)
    path = cache.with_name(f".{cache.name}.lock")
    fh = open(path, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise EvalError(f"another mmlm eval is writing {cache.parent}: wait for it to end, or use another --out") from None
    return fh, path


def _unlock(lock) -> None:
    if lock is not None:
        fh, path = lock
        path.unlink(missing_ok=True)
        fh.close()


def predict(
    items: Sequence[Item],
    predict_fn: PredictFn,
    *,
    batch_size: int = 16,
    cache_path: str | os.PathLike | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    max_bad_fraction: float = 0.01,
    desc: str = "eval",
) -> tuple[dict[str, str], dict[str, str]]:
    """Run ``predict_fn`` over ``items`` in batches; returns ``(predictions, skipped)``.

    ``predictions``: id -> text for every item that was predicted (from the cache or now);
    ``skipped``: id -> reason for items whose image could not be read. With ``cache_path`` the
    cache file is resumed/appended as described in the module docstring.
    """
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    done: dict[str, str] = {}
    cache = Path(cache_path) if cache_path is not None else None
    lock = _lock_cache(cache) if cache is not None else None
    try:
        if cache is not None:
            done = _open_cache(cache, dict(fingerprint or {}), resume)
    except BaseException:
        _unlock(lock)
        raise
    todo = [it for it in items if it.id not in done]
    skipped: dict[str, str] = {}
    budget = max(1, int(max_bad_fraction * len(items)))
    fh = open(cache, "a", encoding="utf-8") if cache is not None else None
    try:
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                images, prompts, ok = [], [], []
                for it in batch:
                    try:
                        if it.image is None:
                            raise FileNotFoundError("no image (pass --images)")
                        images.append(load_image(it.image))
                    except Exception as e:  # unreadable image: skip and count
                        where = it.image if isinstance(it.image, str) else "<shard bytes>"
                        skipped[it.id] = f"{type(e).__name__}: {e} ({where})"
                        if len(skipped) > budget:
                            first = next(iter(skipped.items()))
                            raise EvalError(
                                f"{len(skipped)} items have unreadable images (budget {budget}); "
                                f"first: item {first[0]}: {first[1]}"
                            ) from None
                        continue
                    prompts.append(it.prompt)
                    ok.append(it)
                if not ok:
                    bar.update(len(batch))
                    continue
                outs = list(predict_fn(images, prompts))
                if len(outs) != len(ok):
                    raise EvalError(f"predict_fn returned {len(outs)} texts for {len(ok)} images")
                lines = []
                for it, text in zip(ok, outs):
                    text = text if isinstance(text, str) else str(text)
                    done[it.id] = text
                    lines.append(json.dumps({"id": it.id, "prediction": text}, ensure_ascii=False) + "\n")
                if fh is not None:
                    fh.write("".join(lines))
                    fh.flush()
                    os.fsync(fh.fileno())
                bar.update(len(batch))
    finally:
        if fh is not None:
            fh.close()
        _unlock(lock)
    out = {it.id: done[it.id] for it in items if it.id in done}
    if items and not out:  # e.g. one item whose image is missing: within the budget, yet nothing to show
        first = next(iter(skipped.items()), None)
        raise EvalError(f"none of the {len(items)} item(s) could be predicted: every image is unreadable"
                        + (f"; first: item {first[0]}: {first[1]}" if first else ""))
    return out, skipped


# --------------------------------------------------------------------------- model


def resolve_device(device: str | None = "auto"):
    """``"auto"``/None -> the GPU when there is one, else the CPU; anything else -> ``torch.device``."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EvalError(f"bad --device {device!r}: {e}") from None


def model_predict_fn(
    model: str | os.PathLike | tuple,
    *,
    device: str | None = "auto",
    dtype: str | None = "auto",
    max_new_tokens: int = 32,
    num_beams: int = 1,
    do_sample: bool = False,
    compile: bool = False,
) -> PredictFn:
    """A ``predict_fn`` from a checkpoint directory (``mmlm.load(path, device, dtype)``) or a
    ``(vlm, processor)`` pair (used where it is, e.g. inside training).

    Generation is greedy by default (``do_sample=False, num_beams=1``); ``compile`` compiles the
    decode step (``mmlm.generation.GenerationConfig.compile``). Prompts are passed to
    ``mmlm.describe`` untouched: the checkpoint's chat template is applied there, and a ``None``
    prompt means the checkpoint's captioning prompt.
    """
    import torch

    import mmlm

    if isinstance(model, tuple):
        vlm, processor = model
    else:
        path = Path(model)
        from mmlm.checkpoint import check_model_dir

        try:
            check_model_dir(path)
        except FileNotFoundError as e:
            raise EvalError(f"--model: {e}") from None
        vlm, processor = mmlm.load(os.fspath(path), device=resolve_device(device), dtype=dtype)
    vlm.eval()

    def predict_fn(images: list, prompts: list) -> list[str]:
        with torch.no_grad():
            return list(mmlm.describe(
                images, model=(vlm, processor), prompt=list(prompts), batch_size=max(1, len(images)),
                max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams, compile=compile,
            ))

    return predict_fn
