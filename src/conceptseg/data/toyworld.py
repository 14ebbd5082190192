"""Seeded procedural "toy world": captioned images with exact foreground masks.

Every scene is a random crop of one of scikit-image's bundled sample images with
0-3 objects of distinct classes composited on top.  Objects are drawn with Pillow
at 4x supersampling; the 4x coverage is box-downsampled and thresholded at 0.5,
and the object's pixels are composited *hard* through that same binary mask, so
the saved mask is exactly the set of pixels that show the object.

``generate`` writes a Hugging Face "imagefolder" dataset (``images/``, ``masks/``,
``metadata.jsonl``).  Row ``i`` depends only on ``(seed, i)`` and the config, so
generation is deterministic and resumable.
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from conceptseg.data import toyscenes

CLASSES: tuple[str, ...] = ("star", "heart", "fish", "flower", "car")
BACKGROUND_CAPTION = "a photo of a background"
BACKGROUND_NAMES: tuple[str, ...] = (
    "brick", "grass", "gravel", "camera", "moon", "coins", "astronaut", "coffee",
    "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
)
WORLDS: dict[str, str] = {
    "v1": "small objects on photo textures; empty scenes captioned 'a photo of a background'",
    "v2": "large, sometimes cut or occluded objects in structured scenes of their usual habitat; web-like captions",
}
SUPERSAMPLE = 4
MIN_EXTENT, MAX_EXTENT = 0.15, 0.60  # object bounding extent / image side

ColorFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def caption_for(classes: Sequence[str]) -> str:
    """Caption for a scene: background, "a photo of a X", "... a X and a Y", "... a X, a Y and a Z"."""
    items = [f"a {c}" for c in classes]
    if not items:
        return BACKGROUND_CAPTION
    if len(items) == 1:
        return f"a photo of {items[0]}"
    return f"a photo of {', '.join(items[:-1])} and {items[-1]}"


@dataclass(frozen=True)
class Scene:
    """One rendered scene. ``object_masks[k]`` holds the visible pixels of ``classes[k]``."""

    image: np.ndarray  # HxWx3 uint8
    mask: np.ndarray  # HxW bool, union of all objects
    object_masks: list[np.ndarray]  # one HxW bool per object (visible pixels after occlusion)
    classes: list[str]
    caption: str


# --------------------------------------------------------------------------- shapes


@dataclass
class _Part:
    """A filled polygon in object-local units (object spans roughly [-0.5, 0.5]^2, v points down)."""

    points: np.ndarray  # (k, 2) as (u, v)
    color: ColorFn  # (u, v) arrays of pixel coordinates -> (n, 3) RGB in [0, 1]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
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
    base = _hsv(rng.uniform(0.11, 0.16), rng.uniform(0.7, 1.0), rng.uniform(0.85, 1.0))
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
    base = _hsv(rng.uniform(-0.07, 0.02), rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))
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
    base = _hsv(rng.uniform(0.03, 0.10), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    dark = _hsv(rng.uniform(0.0, 0.1), rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.25))
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
    base = _hsv(rng.uniform(0.74, 0.92), rng.uniform(0.5, 0.9), rng.uniform(0.65, 1.0))
    centre = _hsv(rng.uniform(0.11, 0.16), rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
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
    base = _hsv(rng.uniform(0.55, 0.66), rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.95))
    glass = _hsv(rng.uniform(0.5, 0.6), rng.uniform(0.05, 0.25), rng.uniform(0.8, 0.97))
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
             _Part(_ellipse(0.455, 0.02, 0.025, 0.02, n=16), _solid(_hsv(0.14, 0.4, 1.0)))]
    for wx in (-0.28, 0.28):
        parts += [_Part(_ellipse(wx, 0.13, 0.1, 0.1), _solid(tyre)),
                  _Part(_ellipse(wx, 0.13, 0.045, 0.045, n=24), _solid(hub))]
    return parts


_BUILDERS: dict[str, Callable[[np.random.Generator], list[_Part]]] = {
    "star": _star, "heart": _heart, "fish": _fish, "flower": _flower, "car": _car,
}


def _draw_object(rng: np.random.Generator, cls: str, extent_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw one object at a random pose; return its tight low-res (colour float hxwx3, mask bool hxw)."""
    parts = _BUILDERS[cls](rng)
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


def _paste(patch: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """Place a low-res patch (hxw or hxwx3) at (y, x) on a size x size canvas (zeros elsewhere), clipping."""
    out = np.zeros((size, size) + patch.shape[2:], dtype=patch.dtype)
    h, w = patch.shape[:2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, size), min(x + w, size)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = patch[y0 - y:y1 - y, x0 - x:x1 - x]
    return out


# ----------------------------------------------------------------------- backgrounds


@functools.lru_cache(maxsize=None)
def _background_source(name: str) -> np.ndarray:
    """A scikit-image sample image (uint8, HxW or HxWx3), loaded once per process."""
    from skimage import data

    img = np.asarray(getattr(data, name)())
    return img[..., :3] if img.ndim == 3 else img


def _render_background(rng: np.random.Generator, size: int, source: str | None = None) -> np.ndarray:
    """Random crop/scale/flip of a sample image (`source`, or one drawn from `rng`), tinted or
    hue-shifted and colour-jittered; float HxWx3."""
    from skimage.color import hsv2rgb, rgb2hsv

    src = _background_source(source or str(rng.choice(BACKGROUND_NAMES)))
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
        img = img[..., None] * _hsv(rng.random(), rng.uniform(0.0, 0.7), 1.0)
    else:
        hsv = rgb2hsv(np.clip(img, 0.0, 1.0))
        shift = rng.uniform(-0.5, 0.5) if rng.random() < 0.3 else rng.uniform(-0.08, 0.08)
        hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.3), 0.0, 1.0)
        img = hsv2rgb(hsv)
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.6, 1.3) + mean * rng.uniform(0.7, 1.25)
    return np.clip(img, 0.0, 1.0)


# ---------------------------------------------------------------------------- scenes


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_render_args(classes: Sequence[str], size: int) -> None:
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    unknown = [c for c in classes if c not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known: {CLASSES}")


def _render(rng: np.random.Generator, classes: Sequence[str], size: int = 64) -> tuple[Scene, np.ndarray]:
    """Render a scene; also return the uint8 background it was composited on (for testing)."""
    _check_render_args(classes, size)
    background = _to_u8(_render_background(rng, size))
    image = background.copy()
    hi = {0: MAX_EXTENT, 1: MAX_EXTENT, 2: 0.5}.get(len(classes), 0.42)
    masks: list[np.ndarray] = []
    for cls in classes:
        extent = rng.uniform(MIN_EXTENT, hi) * size
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for attempt in range(4):  # shrink the object if it cannot be placed with little overlap
            color, patch = _draw_object(rng, cls, extent * 0.85**attempt)
            h, w = patch.shape
            for _ in range(25):
                y = int(rng.integers(-int(0.1 * h), size - int(0.9 * h) + 1))
                x = int(rng.integers(-int(0.1 * w), size - int(0.9 * w) + 1))
                m = _paste(patch, y, x, size)
                area = max(int(m.sum()), 1)
                overlap = max((np.logical_and(m, o).sum() / max(min(area, o.sum()), 1) for o in masks), default=0.0)
                if best is None or overlap < best[0]:
                    best = (overlap, m, _paste(color, y, x, size))
                if overlap <= 0.1:
                    break
            if best[0] <= 0.1:
                break
        assert best is not None
        _, m, col = best
        image[m] = _to_u8(col[m])
        masks = [o & ~m for o in masks] + [m]  # later objects occlude earlier ones
    union = np.logical_or.reduce(masks) if masks else np.zeros((size, size), dtype=bool)
    scene = Scene(image=image, mask=union, object_masks=masks, classes=list(classes), caption=caption_for(classes))
    return scene, background


def render_scene(rng: np.random.Generator, classes: Sequence[str], size: int = 64, world: str = "v1") -> Scene:
    """Render ``classes`` (in drawing order, later on top) over a random background at ``size`` px,
    as world ``world`` draws scenes (v1: photo textures; v2: `toyscenes`)."""
    if world == "v1":
        return _render(rng, classes, size)[0]
    return _render_v2(rng, classes, toyscenes.scene_spec(rng, classes), size)[0]


def _render_v2(rng: np.random.Generator, classes: Sequence[str], spec: tuple[str, str | None, str],
               size: int) -> tuple[Scene, np.ndarray]:
    _check_render_args(classes, size)
    scene, photo, text = spec
    image, union, masks, background = toyscenes.render(rng, classes, scene, photo, size)
    return Scene(image=image, mask=union, object_masks=masks, classes=list(classes), caption=text), background


# ------------------------------------------------------------------------- datasets


@dataclass
class ToyWorldConfig:
    """Dataset composition. Changing it changes the content of existing row indices."""

    world: str = "v1"  # "v1": objects on photo textures; "v2": structured scenes (`toyscenes`), see WORLDS
    size: int = 64
    classes: tuple[str, ...] = CLASSES
    background_fraction: float = 0.1  # train rows with no object
    multi_object_fraction: float = 0.5  # train rows with 2-3 objects (2 with prob 0.75, 3 with 0.25)
    test_fraction: float = 0.2  # rows in split "test"; test rows are single objects, uniform over classes


def _row_spec(seed: int, i: int, cfg: ToyWorldConfig) -> tuple[np.random.Generator, list[str], str]:
    """The row's rng (positioned for rendering), its classes and split; depends only on (seed, i, cfg)."""
    rng = np.random.default_rng([seed, i])
    names = list(cfg.classes)
    if rng.random() < cfg.test_fraction:
        return rng, [str(rng.choice(names))], "test"
    r = rng.random()
    if r < cfg.background_fraction:
        return rng, [], "train"
    if r < cfg.background_fraction + cfg.multi_object_fraction and len(names) >= 2:
        k = min(2 if rng.random() < 0.75 else 3, len(names))
        return rng, [str(c) for c in rng.choice(names, size=k, replace=False)], "train"
    return rng, [str(rng.choice(names))], "train"


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def _row_plan(seed: int, i: int, cfg: ToyWorldConfig):
    """Row ``i``'s rng (positioned for rendering), classes, split and, in v2, its scene spec
    (kind, photo, caption); depends only on (seed, i, cfg)."""
    rng, classes, split = _row_spec(seed, i, cfg)
    spec = toyscenes.scene_spec(rng, classes) if cfg.world == "v2" else None
    return rng, classes, split, spec


def _row_record(seed: int, i: int, cfg: ToyWorldConfig) -> dict:
    """Row ``i``'s metadata.jsonl record."""
    _, classes, split, spec = _row_plan(seed, i, cfg)
    mask_name = f"masks/{i:05d}.png"
    obj_names = [f"masks/{i:05d}_obj{k}.png" for k in range(len(classes))] if len(classes) > 1 else []
    return {
        "file_name": f"images/{i:05d}.png",
        "mask_file_name": mask_name,
        "caption": spec[2] if spec else caption_for(classes),
        "class": "+".join(classes) if classes else "background",
        "classes": classes,
        "object_mask_file_names": obj_names or [mask_name] * len(classes),
        "split": split,
        **({"scene": spec[0]} if spec else {}),
    }


def _row_files(row: dict) -> list[str]:
    return [row["file_name"], row["mask_file_name"], *row["object_mask_file_names"]]


def _render_row(out: Path, seed: int, cfg: ToyWorldConfig, i: int) -> None:
    rng, classes, _, spec = _row_plan(seed, i, cfg)
    row = _row_record(seed, i, cfg)
    scene = _render_v2(rng, classes, spec, cfg.size)[0] if spec else _render(rng, classes, cfg.size)[0]
    if len(classes) > 1:
        for name, m in zip(row["object_mask_file_names"], scene.object_masks):
            _save_png(m.astype(np.uint8) * 255, out / name)
    _save_png(scene.mask.astype(np.uint8) * 255, out / row["mask_file_name"])
    _save_png(scene.image, out / row["file_name"])  # written last: its presence marks a complete row


def generate(
    out_dir: str | Path,
    num: int,
    seed: int = 0,
    config: ToyWorldConfig | None = None,
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Write ``num`` rows as an imagefolder dataset into ``out_dir`` and return it.

    Existing rows (image and masks present) are not re-rendered, so a run can be
    resumed or extended with a larger ``num``; use the same seed and config. Rows render in
    ``workers`` processes; a row depends only on (seed, i, config), so the output does not.
    """


    cfg = config or ToyWorldConfig()
    unknown = set(cfg.classes) - set(CLASSES)
    if unknown or not cfg.classes:
        raise ValueError(f"config.classes must be a non-empty subset of {CLASSES}, got {cfg.classes}")
    if cfg.world not in WORLDS:
        raise ValueError(f"unknown toy world {cfg.world!r}; known: {', '.join(WORLDS)}")
    if cfg.background_fraction + cfg.multi_object_fraction > 1.0:
        raise ValueError("background_fraction + multi_object_fraction must be <= 1")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = [_row_record(seed, i, cfg) for i in range(num)]
    missing = [i for i, row in enumerate(rows) if not all((out / n).exists() for n in _row_files(row))]
    render_rows(functools.partial(_render_row, out, seed, cfg), missing, workers, "toyworld", progress)
    tmp = out / "metadata.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out / "metadata.jsonl")
    return out


def render_rows(render, indices: list[int], workers: int, desc: str, progress: bool) -> None:
    """`render(i)` for each row index, in `workers` processes (same output as serial: a row depends
    only on (seed, i)), with a progress bar."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    if workers > 1 and len(indices) > 1:
        with ProcessPoolExecutor(workers) as pool:
            done = pool.map(render, indices, chunksize=max(1, min(64, len(indices) // (4 * workers))))
            for _ in tqdm(done, total=len(indices), desc=desc, disable=not progress):
                pass
    else:
        for i in tqdm(indices, desc=desc, disable=not progress):
            render(i)


def load_rows(root: str | Path) -> list[dict]:
    """Read ``root/metadata.jsonl`` written by :func:`generate` (paths in rows are relative to ``root``)."""
    path = Path(root) / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"toy-world metadata not found: {path} (run conceptseg.data.toyworld.generate first)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
