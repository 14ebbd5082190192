"""Pictures for people: float maps as heat maps, and grids of images, maps and masks with a header
naming the columns (the run's report, the fine-tune's preview, the docs' figures)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def heatmap(values: np.ndarray) -> np.ndarray:
    """A float map as an RGB heat map (black -> red -> yellow -> white), min-max scaled per map."""
    v = np.asarray(values, dtype=np.float64)
    v = (v - v.min()) / (np.ptp(v) or 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def as_tile(x: np.ndarray, size: int) -> np.ndarray:
    """Image (HxWx3 uint8), mask (bool) or float map as a size x size RGB tile (nearest, to show pixels)."""
    x = np.asarray(x)
    if x.dtype == bool:
        x = np.repeat((x * 255).astype(np.uint8)[..., None], 3, axis=-1)
    elif x.ndim == 2:
        x = heatmap(x)
    return np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.NEAREST))


def picture_grid(rows: list[list[np.ndarray]], titles: list[str], tile: int = 96, gap: int = 4) -> np.ndarray:
    """One row per example, one column per title; a header line names the columns."""
    header = 14
    n_cols = len(titles)
    w = n_cols * tile + (n_cols + 1) * gap
    h = header + len(rows) * (tile + gap) + gap
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((gap + c * (tile + gap), 1), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, item in enumerate(row):
            canvas.paste(Image.fromarray(as_tile(item, tile)), (gap + c * (tile + gap), header + gap + r * (tile + gap)))
    return np.asarray(canvas)
