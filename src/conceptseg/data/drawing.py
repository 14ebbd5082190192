"""How the toy worlds draw: the five object shapes (4x supersampled, masks exact), pasting a drawn
patch on a canvas, photo backgrounds from scikit-image's sample images, and colour helpers. World
v1 (`toyworld`) and world v2 (`toyscenes`) both draw with these."""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered
# scikit-image sample images the photo backgrounds are cropped from
BACKGROUND_NAMES: tuple[str, ...] = (
    "brick", "grass", "gravel", "camera", "moon", "coins", "astronaut", "coffee",
    "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
)

ColorFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- shapes


@dataclass
class _Part:
    """A filled polygon in object-local units (object spans roughly [-0.5, 0.5]^2, v points down)."""

    points: np.ndarray  # (k, 2) as (u, v)
    color: ColorFn  # (u, v) arrays of pixel coordinates -> (n, 3) RGB in [0, 1]


def hsv_color(h: float, s: float, v: float) -> np.ndarray:
    """RGB in [0, 1] of a hue (wrapped) and a saturation and value (clipped to [0, 1])."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def _solid(rgb: np.ndarray) -> ColorFn:
    return lambda u, v: np.broadcast_to(rgb, (u.size, 3))


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)


def _star(rng: np.random.Generator) -> list[_Part]:
    """Golden-yellow five-point star with a smooth radial gradient (light centre, deeper tips)."""
    base = hsv_color(rng.uniform(0.11, 0.16), rng.uniform(0.7, 1.0), rng.uniform(0.85, 1.0))
    inner = rng.uniform(0.38, 0.5)
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 0.5, 0.5 * inner)
    pts = np.stack([r * np.cos(ang), r * np.sin(ang) + 0.05], axis=1)
    glow = rng.uniform(0.25, 0.5)

    def color(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d = np.clip(np.hypot(u, v - 0.05) / 0.5, 0.0, 1.0)[:, None]
        return base * (1.0 - 0.35 * d) + glow * (1.0 - d)

    return [_Part(pts, color)]


def _heart(rng: np.random.Generator) -> list[_Part]:
    """Red/pink heart (two lobes and a point), solid with a soft highlight on the left lobe."""
    base = hsv_color(rng.uniform(-0.07, 0.02), rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))
    t = np.linspace(0.0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) + 2.5
    pts = np.stack([x, y], axis=1) / 33.0
    hx, hy = rng.uniform(-0.26, -0.16), rng.uniform(-0.24, -0.16)

    def color(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        w = 0.75 * np.exp(-(((u - hx) / 0.08) ** 2) - ((v - hy) / 0.055) ** 2)[:, None]
        return base * (1 - w) + w

    return [_Part(pts, color)]


def _fish(rng: np.random.Generator) -> list[_Part]:
    """Orange fish facing +u: striped ellipse body, forked tail, dorsal fin, white eye with pupil."""
    base = hsv_color(rng.uniform(0.03, 0.10), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    dark = hsv_color(rng.uniform(0.0, 0.1), rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.25))
    ry = 0.17 * rng.uniform(0.85, 1.2)
    tail = rng.uniform(0.15, 0.21)
    period, phase = rng.uniform(0.15, 0.22), rng.uniform(0.0, 1.0)

    def body_color(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        stripe = (np.sin(2 * np.pi * (u / period + phase)) > 0.55)[:, None]
        return np.where(stripe, dark, base * (1.05 - 0.5 * np.abs(v)[:, None] / ry * 0.5))

    fin = np.array([[-0.08, -ry * 0.8], [0.14, -ry * 0.8], [-0.12, -ry - 0.1]])
    tail_pts = np.array([[-0.2, 0.0], [-0.48, -tail], [-0.39, 0.0], [-0.48, tail]])
    return [
        _Part(fin, _solid(base * 0.8)),
        _Part(tail_pts, _solid(base * 0.85)),
        _Part(_ellipse(0.08, 0.0, 0.36, ry), body_color),
        _Part(_ellipse(0.3, -0.045, 0.055, 0.055, n=24), _solid(np.array([0.97, 0.97, 0.95]))),
        _Part(_ellipse(0.315, -0.045, 0.028, 0.028, n=16), _solid(np.array([0.02, 0.02, 0.02]))),
    ]


def _flower(rng: np.random.Generator) -> list[_Part]:
    """Purple/magenta petals (lighter towards the tips) around a yellow centre disk."""
    base = hsv_color(rng.uniform(0.74, 0.92), rng.uniform(0.5, 0.9), rng.uniform(0.65, 1.0))
    centre = hsv_color(rng.uniform(0.11, 0.16), rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
    n = int(rng.integers(5, 9))
    r0 = rng.uniform(0.13, 0.16)
    width = min(0.16, 0.3 * math.sin(math.pi / n) + 0.03)
    offset = rng.uniform(0.0, 2 * np.pi)

    def petal_color(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d = np.clip(np.hypot(u, v) / 0.5, 0.0, 1.0)[:, None]
        return base * (0.6 + 0.5 * d) + 0.15 * d

    def centre_color(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d = np.clip(np.hypot(u, v) / r0, 0.0, 1.0)[:, None]
        return centre * (1.0 - 0.35 * d)

    parts = []
    for k in range(n):
        a = offset + 2 * np.pi * k / n
        parts.append(_Part(_ellipse(0.26 * math.cos(a), 0.26 * math.sin(a), 0.235, width, a), petal_color))
    parts.append(_Part(_ellipse(0.0, 0.0, r0, r0), centre_color))
    return parts


def _car(rng: np.random.Generator) -> list[_Part]:
    """Blue side-view car facing +u: body, cabin with light windows, two dark wheels with hubs."""
    base = hsv_color(rng.uniform(0.55, 0.66), rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.95))
    glass = hsv_color(rng.uniform(0.5, 0.6), rng.uniform(0.05, 0.25), rng.uniform(0.8, 0.97))
    tyre = np.full(3, rng.uniform(0.03, 0.15))
    hub = np.full(3, rng.uniform(0.55, 0.75))

    def paint(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return base * (1.15 - 0.9 * (v[:, None] + 0.24))

    body = np.array([[-0.48, 0.13], [-0.48, -0.02], [-0.44, -0.06], [0.36, -0.06],
                     [0.48, 0.0], [0.48, 0.13]])
    cabin = np.array([[-0.3, -0.05], [-0.21, -0.24], [0.11, -0.24], [0.25, -0.05]])
    rear = np.array([[-0.24, -0.08], [-0.185, -0.21], [-0.06, -0.21], [-0.06, -0.08]])
    front = np.array([[-0.015, -0.08], [-0.015, -0.21], [0.095, -0.21], [0.19, -0.08]])
    parts = [_Part(cabin, paint), _Part(body, paint), _Part(rear, _solid(glass)), _Part(front, _solid(glass)),
             _Part(_ellipse(0.455, 0.02, 0.025, 0.02, n=16), _solid(hsv_color(0.14, 0.4, 1.0)))]
    for wx in (-0.28, 0.28):
        parts += [_Part(_ellipse(wx, 0.13, 0.1, 0.1), _solid(tyre)),
                  _Part(_ellipse(wx, 0.13, 0.045, 0.045, n=24), _solid(hub))]
    return parts


SHAPES: dict[str, Callable[[np.random.Generator], list[_Part]]] = {
    "star": _star, "heart": _heart, "fish": _fish, "flower": _flower, "car": _car,
}


def draw_object(rng: np.random.Generator, cls: str, extent_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw one object at a random pose; return its tight low-res (colour float hxwx3, mask bool hxw)."""
    parts = SHAPES[cls](rng)
    if cls == "car":
        theta = math.radians(rng.uniform(-25.0, 25.0))
    else:
        theta = rng.uniform(0.0, 2 * np.pi)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    scale = extent_px * SUPERSAMPLE  # hi-res pixels per object unit
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]]) * scale

    def forward(p: np.ndarray) -> np.ndarray:
        return (p * np.array([flip, 1.0])) @ rot.T

    allpts = forward(np.concatenate([p.points for p in parts]))
    off = -allpts.min(axis=0) + 1.0 + rng.uniform(0.0, SUPERSAMPLE, size=2)  # random sub-pixel phase
    hw = np.ceil((allpts.max(axis=0) + off + 1.0) / SUPERSAMPLE).astype(int)  # low-res (w, h)
    W, H = hw * SUPERSAMPLE
    rgb = np.zeros((H, W, 3))
    alpha = np.zeros((H, W), dtype=bool)
    inv = np.linalg.inv(rot)
    for part in parts:
        layer = Image.new("L", (int(W), int(H)), 0)
        ImageDraw.Draw(layer).polygon([tuple(q) for q in forward(part.points) + off], fill=255)
        ys, xs = np.nonzero(np.asarray(layer))
        if xs.size == 0:
            continue
        uv = (np.stack([xs + 0.5, ys + 0.5], axis=1) - off) @ inv.T
        rgb[ys, xs] = np.clip(part.color(uv[:, 0] * flip, uv[:, 1]), 0.0, 1.0)
        alpha[ys, xs] = True
    h, w = H // SUPERSAMPLE, W // SUPERSAMPLE
    count = alpha.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).sum(axis=(1, 3))
    summed = (rgb * alpha[..., None]).reshape(h, SUPERSAMPLE, w, SUPERSAMPLE, 3).sum(axis=(1, 3))
    color = summed / np.maximum(count, 1)[..., None]
    color = color + rng.normal(0.0, 0.015, size=color.shape)  # faint sensor-like noise
    return np.clip(color, 0.0, 1.0), count >= SUPERSAMPLE * SUPERSAMPLE / 2


def paste(patch: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """Place a low-res patch (hxw or hxwx3) at (y, x) on a size x size canvas (zeros elsewhere), clipping."""
    out = np.zeros((size, size) + patch.shape[2:], dtype=patch.dtype)
    h, w = patch.shape[:2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, size), min(x + w, size)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = patch[y0 - y:y1 - y, x0 - x:x1 - x]
    return out


# ----------------------------------------------------------------------- backgrounds


@functools.lru_cache(maxsize=None)
def background_source(name: str) -> np.ndarray:
    """A scikit-image sample image (uint8, HxW or HxWx3), loaded once per process."""
    from skimage import data

    img = np.asarray(getattr(data, name)())
    return img[..., :3] if img.ndim == 3 else img


def render_background(rng: np.random.Generator, size: int, source: str | None = None) -> np.ndarray:
    """Random crop/scale/flip of a sample image (`source`, or one drawn from `rng`), tinted or
    hue-shifted and colour-jittered; float HxWx3."""
    from skimage.color import hsv2rgb, rgb2hsv

    src = background_source(source or str(rng.choice(BACKGROUND_NAMES)))
    side = min(src.shape[:2])
    crop = max(16, int(side * rng.uniform(0.15, 1.0)))
    y0 = int(rng.integers(0, src.shape[0] - crop + 1))
    x0 = int(rng.integers(0, src.shape[1] - crop + 1))
    pil = Image.fromarray(np.ascontiguousarray(src[y0:y0 + crop, x0:x0 + crop]))
    img = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.5:
        img = img[::-1]
    if img.ndim == 2:  # grayscale: tint with a random colour
        img = img[..., None] * hsv_color(rng.random(), rng.uniform(0.0, 0.7), 1.0)
    else:
        hsv = rgb2hsv(np.clip(img, 0.0, 1.0))
        shift = rng.uniform(-0.5, 0.5) if rng.random() < 0.3 else rng.uniform(-0.08, 0.08)
        hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.3), 0.0, 1.0)
        img = hsv2rgb(hsv)
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.6, 1.3) + mean * rng.uniform(0.7, 1.25)
    return np.clip(img, 0.0, 1.0)


def to_u8(x: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] as uint8."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
