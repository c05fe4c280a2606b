"""Drawing of the synthetic shapes: a scene (``data_pipelines.synthetic_scenes``) to PNG bytes.

Contract: :func:`render` turns a scene into a ``size`` x ``size`` RGB PIL image, a pure function
of the scene and the size (the noisy background is seeded by the scene's ``noise_seed``), and
:func:`encode_png` turns an image into PNG bytes with fixed settings, so the same scene always
gives the same bytes. numpy and PIL are imported when first used. Any change to what these draw
changes the dataset's bytes: bump ``data_pipelines.synthetic.VERSION`` with it.
"""

from __future__ import annotations

import io
import math

from .synthetic_scenes import CELLS, COLORS, Scene

RADIUS = {"small": 0.32, "large": 0.46}  # in cell units


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def rotate(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        a = math.radians(rot)
        ca, sa = math.cos(a), math.sin(a)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]

    if shape == "square":
        h = r * 0.82
        return rotate([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "diamond":
        return rotate([(0, -r), (r * 0.66, 0), (0, r), (-r * 0.66, 0)])
    if shape == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)) + r * 0.12) for a in (-90, 30, 150)]
        return rotate(pts)
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a) + r * 0.05))
        return rotate(pts)
    if shape == "cross":
        w, L = r * 0.34, r * 0.95
        return rotate(
            [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w), (-w, -w)]
        )
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, size: int):
    import numpy as np

    c1 = np.array(scene.bg_color, dtype=np.float32)
    if scene.background == "plain":
        arr = np.broadcast_to(c1, (size, size, 3))
    elif scene.background == "noise":
        rng = np.random.default_rng(scene.noise_seed)
        arr = c1 + rng.normal(0.0, 9.0, (size, size, 1)) + rng.normal(0.0, 3.0, (size, size, 3))
    else:
        c2 = np.array(scene.bg_color2, dtype=np.float32)
        y, x = np.mgrid[0:size, 0:size]
        coord = (y, x, x + y, x - y + size)[scene.stripe_dir]
        period = max(2.0, scene.stripe_period * size)
        band = (np.floor(coord / (period / 2)) % 2).astype(bool)[..., None]
        arr = np.where(band, c2, c1)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int):
    """Draw ``scene`` as a ``size`` x ``size`` RGB PIL image (2x supersampled up to 256 px)."""
    from PIL import Image, ImageDraw

    ss = 2 if size <= 256 else 1
    img = Image.fromarray(_background(scene, size), "RGB")
    if ss > 1:
        img = img.resize((size * ss, size * ss), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    cell = size * ss / 3.0
    for o in scene.objects:
        col, row = CELLS[o.position]
        cx, cy = (col + 0.5 + o.dx) * cell, (row + 0.5 + o.dy) * cell
        r = RADIUS[o.size] * o.scale * cell
        fill = tuple(max(0, min(255, c + t)) for c, t in zip(COLORS[o.color], o.tint))
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r, o.rotation), fill=fill)
    if ss > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return img


def encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
