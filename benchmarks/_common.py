"""Shared helpers of the side-by-side benchmarks in ``benchmarks/`` (not a public API).

- :func:`system_info`: device (CPU model from ``/proc/cpuinfo`` or the GPU's name), core counts,
  library versions (torch, transformers, lightning, timm, Pillow, ...) and the machine load
  (``os.getloadavg`` and ``uptime``), so a result file says how busy the machine was;
- :func:`resolve_device`, :func:`set_threads`: ``--device auto|cpu|cuda`` and ``--threads``;
- :func:`cache_dir`, :func:`synthetic_dataset`, :func:`jpeg_dataset`: small datasets built once
  into a cache directory (``--cache-dir``, else ``$MMLM_BENCH_CACHE``, else
  ``~/.cache/mmlm-benchmarks``) and reused by later runs;
- :func:`bench_tokenizer`, :func:`build_pair`: a from-scratch BPE tokenizer trained on the cached
  shards and a random-weight ``(VLM, Processor)`` of a preset (presets with a pretrained LM get
  the local tokenizer instead of their hub one: nothing is downloaded; the vocabulary is then
  the small BPE one, which makes the LM head cheaper than the real model's);
- :func:`print_table`, :func:`write_result`: the printed table and
  ``benchmarks/results/<name>-<UTC date>-<device>.json``.

Every script keeps its default sizes small (each run well under 90 s on a 2-core CPU) and takes
``--steps``/``--batch-size``/``--preset``/``--device`` style flags to scale up.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path(os.environ.get("MMLM_BENCH_CACHE", Path.home() / ".cache" / "mmlm-benchmarks"))
VERSION_PACKAGES = ("torch", "transformers", "lightning", "timm", "pillow", "numpy", "tokenizers", "torchvision")


# ---------------------------------------------------------------------------------- system
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_load() -> dict:
    """1/5/15-minute load averages and the ``uptime`` line (a busy machine skews every timing)."""
    out: dict[str, Any] = {}
    try:
        out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        out["loadavg"] = None
    try:
        out["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["uptime"] = None
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def system_info(device) -> dict:
    """What the result files record about the machine and the software."""
    import torch

    dev = torch.device(device)
    info = {
        "device_type": dev.type,
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions(),
    }
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    info["device"] = info.get("gpu") or info["cpu_model"]
    return info


def device_slug(info: dict) -> str:
    """``cpu-amd-epyc`` / ``nvidia-h100-80gb-hbm3``: the device part of a result file name."""
    name = info.get("gpu") or f"cpu-{info['cpu_model']}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60] or "unknown"


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device must be auto, cpu or cuda, got {name!r}")
    return name


def set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(int(n))


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring up to ``Usage::`` (the method in full) as the description
    and its ``Usage::`` section (when present) as the epilog, both printed as written."""
    cut = doc.find("Usage::")
    epilog = doc[cut:] if cut >= 0 else None
    return argparse.ArgumentParser(description=(doc[:cut] if cut >= 0 else doc).strip(), epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"  # argparse names the type in its messages
    return parse


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def jpeg_size(text: str) -> tuple[int, int]:
    """``--size WxH`` (e.g. 500x400), each side at least 48 pixels."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(int(p) for p in parts) < 48:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT of at least 48x48 pixels, e.g. 500x400; "
                                         f"got {text!r}")
    return int(parts[0]), int(parts[1])


def preset_name(text: str) -> str:
    """``--preset``: a known preset (or alias), checked when the arguments are parsed."""
    from mmlm.presets import get_preset

    try:
        get_preset(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_common_args(p: argparse.ArgumentParser, *, device: bool = True, threads: int | None = 1) -> None:
    if device:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto (GPU when there is one), cpu or cuda (default auto)")
    p.add_argument("--threads", type=nonneg_int, default=threads,
                   help=f"torch intra-op threads on CPU (default {threads}; 0: torch's default). One thread keeps "
                        "timings steadier on a shared machine")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"where the benchmark datasets are built once (default {DEFAULT_CACHE}; env MMLM_BENCH_CACHE)")
    p.add_argument("--no-save", action="store_true", help="print only; write no result file")
    p.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/NAME-DATE-DEVICE.json)")


# ---------------------------------------------------------------------------------- datasets
def synthetic_dataset(cache: Path, *, train: int = 2000, image_size: int = 72, shard_size: int = 250) -> Path:
    """The synthetic shapes set (``data_pipelines.synthetic.build``), built once; returns its
    ``train`` shard directory. Train records hold a caption and a 3-5 turn VQA conversation."""
    from data_pipelines.synthetic import build

    out = Path(cache) / f"synthetic-{train}-{image_size}"
    manifest = out / "synthetic.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        build(out, train=train, val=0, test=0, image_size=image_size, shard_size=shard_size, workers=1,
              show_progress=False)
    return out / "train"


def _photo_like(rng, width: int, height: int):
    """A smooth random colour field with texture and a few shapes: compresses like a photo
    (tens of KB as JPEG at 500x400), unlike flat colour (too small) or pure noise (too big)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(im).astype(np.int16) + rng.normal(0, 9, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg_dataset(cache: Path, *, count: int = 512, size: tuple[int, int] = (500, 400), shards: int = 4,
                 quality: int = 90) -> Path:
    """``count`` photo-like JPEGs of ``size`` (w, h) with captions, as ``shards`` tar shards, built
    once; returns the shard directory."""
    import numpy as np

    from mmlm.data.writer import ShardWriter

    out = Path(cache) / f"jpeg-{count}-{size[0]}x{size[1]}-q{quality}"
    done = out / "done.json"
    if done.exists():
        return out
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "round", "square", "small", "large", "bright", "dark", "shapes", "on", "a",
             "field", "with", "two", "three", "some", "soft", "the", "and"]
    per = -(-count // shards)
    with ShardWriter(out, "shard", max_count=per, overwrite=True) as w:
        for i in range(count):
            buf = io.BytesIO()
            _photo_like(rng, *size).save(buf, "JPEG", quality=quality)
            caption = " ".join(rng.choice(words, size=int(rng.integers(4, 16))))
            w.write_members(f"img{i:06d}", {"jpg": buf.getvalue(), "txt": caption.encode()})
    done.write_text(json.dumps({"count": count, "size": list(size), "quality": quality}))
    return out


def shard_paths(directory: Path) -> list[str]:
    return sorted(str(p) for p in Path(directory).glob("*.tar"))


# ---------------------------------------------------------------------------------- models
def bench_tokenizer(shard_dir: Path, vocab_size: int = 512, cache: Path | None = None):
    """A byte-level BPE tokenizer trained on the shards' texts (as ``mmlm fit`` does for a
    from-scratch preset), cached as tokenizer files next to the shards."""
    from mmlm.processing import DEFAULT_CAPTION_PROMPT
    from mmlm.training.build import tokenizer_files, tokenizer_from_files, tokenizer_from_shards

    cache_file = Path(cache or shard_dir.parent) / f"tokenizer-{vocab_size}.json"
    if cache_file.exists():
        files = {k: bytes.fromhex(v) for k, v in json.loads(cache_file.read_text()).items()}
        return tokenizer_from_files(files)
    tok = tokenizer_from_shards([str(shard_dir)], vocab_size, max_records=5000, prompts=[DEFAULT_CAPTION_PROMPT],
                                log=lambda *a: None)
    cache_file.write_text(json.dumps({k: v.hex() for k, v in tokenizer_files(tok).items()}))
    return tokenizer_from_files(tokenizer_files(tok))


def offline_overrides(preset: str) -> dict:
    """Model overrides that build ``preset`` offline with random weights and a local tokenizer:
    a preset with a hub LM name is treated as a from-scratch LM (its architecture is kept)."""
    from mmlm.presets import get_preset

    return {"text": {"name": None, "pretrained": False}} if get_preset(preset).text.name else {}


def build_pair(preset: str, tokenizer, *, max_length: int = 256, seed: int = 0, overrides: dict | None = None):
    """A random-weight ``(VLM, Processor)`` of ``preset`` with ``tokenizer``."""
    import torch

    from mmlm import VLM, Processor
    from mmlm.processing import IMAGE_TOKEN

    torch.manual_seed(seed)
    ov = {**offline_overrides(preset), **(overrides or {})}
    ov.setdefault("text", {})
    ov["text"] = {**ov["text"], "hf_config": {**ov["text"].get("hf_config", {}), "vocab_size": len(tokenizer)}}
    vlm = VLM.from_preset(preset, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **ov)
    return vlm, Processor.for_model(vlm, tokenizer, max_length=max_length)


# ---------------------------------------------------------------------------------- output
def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> None:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]  # rows may be none
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def verdict(measured: float | None, target: float, direction: str = "min") -> str:
    if measured is None:
        return "n/a"
    ok = measured >= target if direction == "min" else measured <= target
    return "met" if ok else "MISSED"


def write_result(name: str, payload: dict, info: dict, out: Path | None = None) -> Path:
    """``benchmarks/results/<name>-<UTC date>-<device>.json`` (or ``out``), written atomically."""
    now = _dt.datetime.now(_dt.timezone.utc)
    path = Path(out) if out else RESULTS_DIR / f"{name}-{now:%Y-%m-%d}-{device_slug(info)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "utc": now.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "system": info, **payload}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return path


class Stopwatch:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
