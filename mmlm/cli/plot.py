"""``mmlm plot RUN_DIR``: draw the loss, learning-rate and throughput curves of a run as a PNG.

Reads the CSV logs ``RUN_DIR/logs/version_*/metrics.csv`` (one version per start of the run; a
later version replaces the earlier ones from its first logged step on, so a resumed run drops what
was logged after the checkpoint it resumed from, and a fresh run in the same RUN_DIR the old run)
or one ``metrics.csv`` given directly, and writes ``RUN_DIR/curves.png`` (``--out`` to choose).
Drawn with PIL: no plotting library needed.

Panels: ``train/loss`` and ``val/loss``; ``lr/*`` (one line per component); ``perf/samples_per_s``
(and ``perf/tokens_per_s`` on its own scale, labelled at the right). ``eval/*`` metrics, when the
run logged some, get a fourth panel.

NaN/inf values (a diverged run) are not drawn: the title and a ``note:`` line on stderr say how many
per metric and the first step; when nothing finite is left the command fails saying so. A file that
is not a Lightning CSV log (no numeric ``step`` column, undecodable) is a one-line error naming it.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
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


def _read_log(f: Path) -> dict[str, dict[float, float]]:
    """``{metric: {step: value}}`` of one CSV log, NaN/inf included (a later row wins a repeated step)."""
    values: dict[str, dict[float, float]] = {}
    try:
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is not None and "step" not in reader.fieldnames:
                raise PlotError(f"{f} has no 'step' column: not a Lightning CSV log")
            for row in reader:
                step = row.get("step")
                if step in (None, ""):
                    continue
                try:
                    s = float(step)
                except ValueError:
                    raise PlotError(f"{f}, line {reader.line_num}: step {step!r} is not a number") from None
                for key, value in row.items():
                    # key None: the surplus fields of a row longer than the header (a torn write)
                    if key in (None, "step", "epoch") or not isinstance(value, str) or value == "":
                        continue
                    try:
                        values.setdefault(key, {})[s] = float(value)
                    except ValueError:
                        continue
    except (UnicodeDecodeError, csv.Error) as e:
        raise PlotError(f"{f} is not a readable CSV log ({e})") from None
    return values


def read_metrics(files: list[Path], nonfinite: dict[str, dict[float, float]] | None = None) -> Series:
    """``{metric: [(step, value), ...]}`` sorted by step. Each file (a log version) supersedes the earlier
    ones from its first logged step on: a resumed run replaces what its killed predecessor logged after
    the checkpoint it resumed from, a fresh run in the same directory replaces the old run.
    NaN/inf values are left out of the series; ``nonfinite`` (a dict) receives them, ``{metric: {step: value}}``.
    A file that is not a CSV log with a numeric ``step`` column raises ``PlotError`` naming it."""
    data: dict[str, dict[float, float]] = {}
    for f in files:
        here = _read_log(f)
        steps = [s for pts in here.values() for s in pts]
        if not steps:
            continue
        first = min(steps)
        data = {k: {s: v for s, v in pts.items() if s < first} for k, pts in data.items()}
        for key, pts in here.items():
            data.setdefault(key, {}).update(pts)
    series: Series = {}
    for key, pts in data.items():
        good = sorted((s, v) for s, v in pts.items() if math.isfinite(v))
        bad = {s: v for s, v in pts.items() if not math.isfinite(v)}
        if good:
            series[key] = good
        if bad and nonfinite is not None:
            nonfinite[key] = bad
    return series


def nonfinite_notes(nonfinite: dict[str, dict[float, float]]) -> list[str]:
    """One line per metric with NaN/inf values: how many and the first step (where a run diverged)."""
    return [f"{k}: {len(v)} NaN/inf value(s) not drawn, the first at step {int(min(v))}"
            for k, v in sorted(nonfinite.items())]


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
    import io

    from mmlm.io import atomic_write_bytes

    out = Path(out)
    png = io.BytesIO()
    img.save(png, format="PNG")
    atomic_write_bytes(out, png.getvalue())
    return out


def plot_run(run: str | Path, out: str | Path | None = None, notes: list[str] | None = None) -> Path:
    """Plot a run directory (or a metrics.csv) to ``out`` (default ``RUN_DIR/curves.png``). Metrics with
    NaN/inf values are drawn without them; ``notes`` (a list) receives a line per such metric."""
    run = Path(run)
    files = metric_files(run)
    nonfinite: dict[str, dict[float, float]] = {}
    series = read_metrics(files, nonfinite)
    lines = nonfinite_notes(nonfinite)
    if notes is not None:
        notes.extend(lines)
    if not panels(series) and panels({k: [(0.0, 0.0)] for k in nonfinite}):  # a plotted metric, all NaN/inf
        raise PlotError("nothing to draw: every logged value is NaN or infinite (" + "; ".join(lines) + ")")
    if out is None:
        out = (run if run.is_dir() else run.parent) / "curves.png"
    if Path(out).is_dir():
        raise PlotError(f"--out {out} is a directory; give the PNG file to write, e.g. {Path(out) / 'curves.png'}")
    steps = max((s for pts in series.values() for s, _ in pts), default=0)
    title = f"{run}  ({len(files)} log version(s), up to step {int(steps)})"
    if lines:
        title += "   " + "; ".join(lines)
    return draw(series, out, title=title)


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
    notes: list[str] = []
    path = plot_run(args.run_dir, args.out, notes)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmlm plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory or a metrics.csv")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (PlotError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
