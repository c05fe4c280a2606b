"""``mmlm plot RUN_DIR``: draw the loss, learning-rate and throughput curves of a run as a PNG.

Reads the CSV logs ``RUN_DIR/logs/version_*/metrics.csv`` (one version per start of the run; a
later version wins where a resumed run repeats steps) or one ``metrics.csv`` given directly, and
writes ``RUN_DIR/curves.png`` (``--out`` to choose). Drawn with PIL: no plotting library needed.

Panels: ``train/loss`` and ``val/loss``; ``lr/*`` (one line per component); ``perf/samples_per_s``
(and ``perf/tokens_per_s`` on its own scale, labelled at the right). ``eval/*`` metrics, when the
run logged some, get a fourth panel.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import re
import sys
import tempfile
from pathlib import Path

Series = dict[str, list[tuple[float, float]]]

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


class PlotError(ValueError):
    pass


def metric_files(path: str | Path) -> list[Path]:
    """The metrics.csv files of a run directory, oldest version first (or ``path`` itself)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such run directory: {path}")
    files = list(path.glob("logs/version_*/metrics.csv")) or list(path.glob("**/metrics.csv"))

    def version(p: Path) -> tuple[int, str]:
        m = re.search(r"version_(\d+)", str(p))
        return (int(m.group(1)) if m else -1, str(p))

    files = sorted(files, key=version)
    if not files:
        raise FileNotFoundError(f"{path} has no logs/version_*/metrics.csv (was it trained with `mmlm fit`?)")
    return files


def read_metrics(files: list[Path]) -> Series:
    """``{metric: [(step, value), ...]}`` sorted by step; later files override earlier ones per step."""
    data: dict[str, dict[float, float]] = {}
    for f in files:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                step = row.get("step")
                if step in (None, ""):
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in (None, ""):
                        continue
                    try:
                        v = float(value)
                    except ValueError:
                        continue
                    if math.isfinite(v):
                        data.setdefault(key, {})[float(step)] = v
    return {k: sorted(v.items()) for k, v in data.items()}


def panels(series: Series) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    out = []
    loss = {k: series[k] for k in ("train/loss", "val/loss") if k in series}
    if loss:
        out.append(("loss", loss))
    lr = {k: v for k, v in series.items() if k.startswith("lr/")}
    if lr:
        out.append(("learning rate", lr))
    perf = {k: series[k] for k in ("perf/samples_per_s",) if k in series}
    if perf:
        out.append(("throughput (samples/s)", perf))
    tok = {k: series[k] for k in ("perf/tokens_per_s",) if k in series}
    if tok:
        out.append(("throughput (tokens/s)", tok))
    ev = {k: v for k, v in series.items() if k.startswith("eval/")}
    if ev:
        out.append(("evaluation", dict(list(ev.items())[: len(COLORS)])))
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(t)
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.1e}"
    return f"{v:.3g}"


def draw(series: Series, out: str | Path, title: str = "", width: int = 960, panel_height: int = 260) -> Path:
    """Write a PNG of the panels of ``series`` to ``out``."""
    from PIL import Image, ImageDraw, ImageFont

    plots = panels(series)
    if not plots:
        raise PlotError("the logs hold no train/loss, val/loss, lr/* or perf/* metric yet")
    font = ImageFont.load_default()
    top = 30
    img = Image.new("RGB", (width, top + panel_height * len(plots)), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((10, 8), title, fill="black", font=font)
    left, right, pad_top, pad_bottom = 80, 20, 22, 30
    for i, (name, lines) in enumerate(plots):
        y0 = top + i * panel_height
        box = (left, y0 + pad_top, width - right, y0 + panel_height - pad_bottom)
        xs = [s for pts in lines.values() for s, _ in pts]
        ys = [v for pts in lines.values() for _, v in pts]
        x_lo, x_hi = min(xs), max(xs)
        y_lo, y_hi = min(ys), max(ys)
        if x_hi == x_lo:
            x_hi = x_lo + 1
        if y_hi == y_lo:
            y_lo, y_hi = y_lo - (abs(y_lo) * 0.1 or 1), y_hi + (abs(y_hi) * 0.1 or 1)
        span = y_hi - y_lo
        y_lo, y_hi = y_lo - 0.05 * span, y_hi + 0.05 * span

        def px(s: float, v: float) -> tuple[float, float]:
            x = box[0] + (s - x_lo) / (x_hi - x_lo) * (box[2] - box[0])
            y = box[3] - (v - y_lo) / (y_hi - y_lo) * (box[3] - box[1])
            return x, y

        d.rectangle(box, outline=(80, 80, 80))
        d.text((box[0], y0 + 4), name, fill="black", font=font)
        d.text((box[2] - 30, box[3] + 18), "step", fill=(60, 60, 60), font=font)
        for t in _ticks(y_lo, y_hi):
            _, y = px(x_lo, t)
            d.line([(box[0], y), (box[2], y)], fill=(230, 230, 230))
            d.text((6, y - 6), _fmt(t), fill=(60, 60, 60), font=font)
        for t in _ticks(x_lo, x_hi):
            x, _ = px(t, y_lo)
            d.line([(x, box[3]), (x, box[3] + 4)], fill=(80, 80, 80))
            d.text((x - 10, box[3] + 8), _fmt(t), fill=(60, 60, 60), font=font)
        for j, (label, pts) in enumerate(lines.items()):
            color = COLORS[j % len(COLORS)]
            coords = [px(s, v) for s, v in pts]
            if len(coords) == 1:
                x, y = coords[0]
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
            else:
                d.line(coords, fill=color, width=2)
                if len(coords) <= 40:
                    for x, y in coords:
                        d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
            ly = box[1] + 12 + 14 * j
            d.line([(box[2] - 190, ly), (box[2] - 172, ly)], fill=color, width=3)
            d.text((box[2] - 166, ly - 6), label, fill=color, font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            img.save(fh, format="PNG")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Plot a run directory (or a metrics.csv) to ``out`` (default ``RUN_DIR/curves.png``)."""
    run = Path(run)
    files = metric_files(run)
    series = read_metrics(files)
    if out is None:
        out = (run if run.is_dir() else run.parent) / "curves.png"
    steps = max((s for pts in series.values() for s, _ in pts), default=0)
    return draw(series, out, title=f"{run}  ({len(files)} log version(s), up to step {int(steps)})")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot", help="draw a run's loss / lr / throughput curves as a PNG",
        description=__doc__.split("\n\n")[0] + " Reads RUN_DIR/logs/version_*/metrics.csv; writes RUN_DIR/curves.png.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="run directory (trainer.default_root_dir of `mmlm fit`) or a metrics.csv")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmlm plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory or a metrics.csv")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, PlotError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
