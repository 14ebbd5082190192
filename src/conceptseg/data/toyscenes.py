"""Toy world v2: structured scenes in which concept distillation has something to do.

World v1 (`toyworld.py`) puts small objects on stationary photo textures and captions empty scenes
"a photo of a background", the method's own background prompt. A model trained on it already knows
what to fill a hole with, and a mirrored strip continues its backgrounds as well as a model does.
World v2 changes the statistics that decide this, as CUB's photographs have them:

- objects are large (40-90% of the image side), sometimes cut by the border, and sometimes partly
  hidden behind scene elements drawn in front of them (seaweed, grass blades, posts, branches);
- backgrounds are scenes with structure a mirror breaks: tilted horizons, perspective lines to a
  vanishing point, light from one side, large shapes, several textures in one image;
- context co-occurs with the class (`HABITATS`: fish under water, cars on roads, ...), so a model
  asked to fill an object-shaped hole in such a scene tends to put the object back;
- captions read like web captions: no caption contains the word "background"; an empty scene is
  captioned with what it shows ("the sea floor", "an empty street").

Every drawing is a function of one `numpy.random.Generator`, so a row depends only on (seed, i).
Objects are v1's shapes (`drawing.draw_object`); masks are exact: a pixel is in an object's
mask iff the saved image shows that object there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from conceptseg.data.drawing import SUPERSAMPLE, background_source, draw_object, hsv_color, paste, render_background, to_u8

# The scene kind each class is usually seen in, and how often (the rest: any other kind).
HABITATS: dict[str, str] = {"fish": "underwater", "car": "street", "flower": "meadow", "star": "night", "heart": "room"}
HABITAT_PROBABILITY = 0.75
SCENES: tuple[str, ...] = ("underwater", "street", "meadow", "night", "room", "photo")

# How a caption says where a scene is, and what an empty one shows. None of them says "background".
_WHERE: dict[str, tuple[str, ...]] = {
    "underwater": ("under water", "in the sea", "near the sea floor"),
    "street": ("on a street", "on a road", "in a city"),
    "meadow": ("in a meadow", "in the grass", "on a hill"),
    "night": ("in the night sky", "at night"),
    "room": ("in a room", "on a wall", "indoors"),
    "photo": (),
}
_EMPTY: dict[str, tuple[str, ...]] = {
    "underwater": ("the sea floor", "water and sand", "the sea"),
    "street": ("an empty street", "a road and buildings", "a city street"),
    "meadow": ("a meadow", "green hills", "grass and sky"),
    "night": ("the night sky", "stars over the hills at night", "the moon at night"),
    "room": ("an empty room", "a wall and a floor", "a room with a window"),
}
# v1's photo sources, with what they show
_PHOTOS: dict[str, str] = {
    "brick": "a brick wall", "grass": "grass", "gravel": "gravel", "camera": "a man with a camera",
    "moon": "the surface of the moon", "coins": "old coins", "astronaut": "an astronaut",
    "coffee": "a cup of coffee", "chelsea": "a cat", "rocket": "a rocket on a launch pad",
    "immunohistochemistry": "cells under a microscope", "hubble_deep_field": "galaxies in deep space",
}


# ----------------------------------------------------------------------------- helpers


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) in [0, 1] on an n x n grid."""
    c = (np.arange(n) + 0.5) / n
    return np.meshgrid(c, c)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a * (1.0 - t[..., None]) + b * t[..., None]


def _photo_texture(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    """A random crop of one of v1's photo sources as a grey texture, zero mean, unit-ish contrast."""
    src = background_source(name)
    grey = src.mean(axis=-1) if src.ndim == 3 else src.astype(np.float64)
    side = min(grey.shape)
    crop = max(16, int(side * rng.uniform(0.2, 0.6)))
    y0, x0 = (int(rng.integers(0, s - crop + 1)) for s in grey.shape[:2])
    tile = np.asarray(Image.fromarray(grey[y0:y0 + crop, x0:x0 + crop].astype(np.uint8)).resize((n, n), Image.Resampling.BILINEAR), np.float64)
    return (tile - tile.mean()) / (tile.std() + 1e-6)


def _shape_mask(n: int, draw: Callable[[ImageDraw.ImageDraw, int], None]) -> np.ndarray:
    """Coverage in [0, 1] on an n x n grid of shapes drawn at SUPERSAMPLE x (coordinates in [0, 1])."""
    big = n * SUPERSAMPLE
    layer = Image.new("L", (big, big), 0)
    draw(ImageDraw.Draw(layer), big)
    a = np.asarray(layer, np.float64) / 255.0
    return a.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))


# ------------------------------------------------------------------------------ scenes
# Each scene returns a float HxWx3 image in [0, 1]; directions of light and tilt are random, so a
# mirrored strip of one side never continues the other.


def _underwater(rng: np.random.Generator, n: int) -> np.ndarray:
    x, y = _grid(n)
    tilt = rng.uniform(-0.35, 0.35)
    top = hsv_color(rng.uniform(0.47, 0.55), rng.uniform(0.3, 0.6), rng.uniform(0.75, 0.95))
    deep = hsv_color(rng.uniform(0.55, 0.65), rng.uniform(0.6, 0.95), rng.uniform(0.2, 0.45))
    img = _lerp(top, deep, np.clip(y + tilt * (x - 0.5), 0, 1))
    # shafts of light from one side
    ang, phase = rng.uniform(0.3, 1.0) * rng.choice([-1, 1]), rng.uniform(0, 6.3)
    shafts = np.clip(np.sin((x + ang * y) * rng.uniform(9, 16) + phase), 0, 1) ** 3 * (1 - y) * rng.uniform(0.15, 0.3)
    img = img + shafts[..., None]
    # sand floor under a sloped, wavy line
    base, slope = rng.uniform(0.6, 0.85), rng.uniform(-0.35, 0.35)
    floor_y = base + slope * (x - 0.5) + 0.03 * np.sin(x * rng.uniform(4, 9) + rng.uniform(0, 6.3))
    sand = hsv_color(rng.uniform(0.08, 0.13), rng.uniform(0.25, 0.5), rng.uniform(0.6, 0.85))
    texture = _photo_texture(rng, "gravel", n)[..., None] * 0.08
    floor = np.clip(sand + texture - 0.25 * (1 - np.clip((y - floor_y) * 4, 0, 1))[..., None] * 0.3, 0, 1)
    img = np.where((y > floor_y)[..., None], floor, img)
    # a rock on the floor
    if rng.random() < 0.6:
        cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.18)
        cy = base + slope * (cx - 0.5)
        rock = ((x - cx) / r) ** 2 + ((y - cy) / (0.7 * r)) ** 2 < 1
        img = np.where(rock[..., None], hsv_color(0.1, 0.1, rng.uniform(0.25, 0.45)) * (1.2 - 0.6 * (y - cy + r)[..., None] / r), img)
    return np.clip(img, 0, 1)


def _street(rng: np.random.Generator, n: int) -> np.ndarray:
    x, y = _grid(n)
    horizon, tilt = rng.uniform(0.35, 0.6), rng.uniform(-0.15, 0.15)
    h_line = horizon + tilt * (x - 0.5)
    sky = _lerp(hsv_color(rng.uniform(0.55, 0.62), rng.uniform(0.3, 0.6), 0.95), hsv_color(rng.uniform(0.05, 0.6), 0.15, 0.9),
                np.clip(y / horizon + 0.3 * (x - rng.random()), 0, 1))
    img = sky.copy()
    # a skyline of buildings standing on the horizon, lit from one side
    left = rng.random() < 0.5
    xpos = 0.0
    while xpos < 1.0:
        w = rng.uniform(0.08, 0.25)
        top = rng.uniform(0.05, horizon - 0.05)
        col = hsv_color(rng.uniform(0.0, 0.12), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.8))
        inside = (x >= xpos) & (x < xpos + w) & (y >= top) & (y < h_line)
        shade = 1.0 + 0.25 * ((x - xpos) / w - 0.5) * (1 if left else -1)
        wins = (np.sin((x - xpos) * 2 * np.pi / rng.uniform(0.03, 0.05)) > 0.3) & (np.sin((y - top) * 2 * np.pi / rng.uniform(0.04, 0.06)) > 0.2)
        bcol = col * shade[..., None]
        bcol = np.where(wins[..., None], hsv_color(rng.uniform(0.1, 0.6), 0.3, rng.uniform(0.5, 0.9)), bcol)
        img = np.where(inside[..., None], bcol, img)
        xpos += w
    # the ground: pavement, and a road to a vanishing point on the horizon
    vx = rng.uniform(0.2, 0.8)
    vy = horizon + tilt * (vx - 0.5)
    ground = hsv_color(rng.uniform(0.05, 0.12), rng.uniform(0.05, 0.25), rng.uniform(0.45, 0.65))
    img = np.where((y >= h_line)[..., None], ground + _photo_texture(rng, "gravel", n)[..., None] * 0.04, img)
    depth = np.clip((y - vy) / (1 - vy + 1e-6), 1e-3, None)
    half = rng.uniform(0.35, 0.6) * depth
    road = (y >= h_line) & (np.abs(x - vx) < half)
    asphalt = hsv_color(0.6, 0.05, rng.uniform(0.18, 0.32)) * (0.8 + 0.4 * depth)[..., None]
    img = np.where(road[..., None], asphalt, img)
    dashes = road & (np.abs(x - vx) < 0.02 * depth + 0.002) & (np.sin(np.log(depth) * 12 + rng.uniform(0, 6.3)) > 0)
    img = np.where(dashes[..., None], hsv_color(0.14, 0.6, 0.95), img)
    return np.clip(img, 0, 1)


def _meadow(rng: np.random.Generator, n: int) -> np.ndarray:
    x, y = _grid(n)
    sky = _lerp(hsv_color(rng.uniform(0.55, 0.62), rng.uniform(0.4, 0.7), rng.uniform(0.8, 1.0)),
                hsv_color(0.58, 0.1, 1.0), np.clip(y * 1.6, 0, 1))
    img = sky.copy()
    sun = (rng.uniform(0, 1), rng.uniform(0.05, 0.3))
    glow = np.exp(-((x - sun[0]) ** 2 + (y - sun[1]) ** 2) / 0.02)
    img = img + glow[..., None] * np.array([0.4, 0.35, 0.1])
    for _ in range(int(rng.integers(1, 4))):  # soft clouds
        cx, cy, rx = rng.uniform(0, 1), rng.uniform(0.05, 0.35), rng.uniform(0.08, 0.2)
        cloud = np.exp(-(((x - cx) / rx) ** 2 + ((y - cy) / (0.4 * rx)) ** 2))
        img = _lerp(img, np.ones(3), np.clip(cloud * 1.3, 0, 0.9))
    # two or three rolling hills, far ones lighter and bluer, each with its own slope
    k = int(rng.integers(2, 4))
    for j in range(k):
        level = rng.uniform(0.3, 0.5) + 0.15 * j
        ridge = level + rng.uniform(-0.2, 0.2) * (x - 0.5) + rng.uniform(0.03, 0.08) * np.sin(x * rng.uniform(3, 8) + rng.uniform(0, 6.3))
        green = hsv_color(rng.uniform(0.22, 0.35), rng.uniform(0.5, 0.85), rng.uniform(0.35, 0.6) + 0.25 * (k - 1 - j) / k)
        tex = _photo_texture(rng, "grass", n)[..., None] * (0.03 + 0.04 * j)
        lit = 1.0 + 0.3 * (x - sun[0])[..., None] * -0.5
        img = np.where((y > ridge)[..., None], np.clip(green * lit + tex, 0, 1), img)
    return np.clip(img, 0, 1)


def _night(rng: np.random.Generator, n: int) -> np.ndarray:
    x, y = _grid(n)
    tilt = rng.uniform(-0.5, 0.5)
    img = _lerp(hsv_color(rng.uniform(0.6, 0.72), rng.uniform(0.6, 0.9), rng.uniform(0.08, 0.2)),
                hsv_color(rng.uniform(0.7, 0.85), rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.5)), np.clip(y + tilt * (x - 0.5), 0, 1))
    dots = rng.random((n, n)) < rng.uniform(0.01, 0.03)
    img = np.where(dots[..., None], rng.uniform(0.7, 1.0), img)
    # a crescent moon
    cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.35), rng.uniform(0.06, 0.11)
    off = rng.uniform(0.3, 0.6) * r * rng.choice([-1, 1])
    moon = ((x - cx) ** 2 + (y - cy) ** 2 < r * r) & ((x - cx - off) ** 2 + (y - cy + 0.2 * r) ** 2 > r * r)
    img = np.where(moon[..., None], hsv_color(0.13, 0.25, 0.95), img)
    # a dark, jagged mountain line, lower on one side
    pts_x = np.linspace(-0.05, 1.05, int(rng.integers(5, 10)))
    pts_y = rng.uniform(0.55, 0.85, pts_x.size) + rng.uniform(-0.2, 0.2) * (pts_x - 0.5)
    ridge = np.interp(x, pts_x, pts_y)
    hill = hsv_color(rng.uniform(0.6, 0.75), rng.uniform(0.3, 0.6), rng.uniform(0.04, 0.12))
    img = np.where((y > ridge)[..., None], hill + _photo_texture(rng, "grass", n)[..., None] * 0.02, img)
    return np.clip(img, 0, 1)


def _room(rng: np.random.Generator, n: int) -> np.ndarray:
    x, y = _grid(n)
    floor_line, tilt = rng.uniform(0.55, 0.8), rng.uniform(-0.12, 0.12)
    f_y = floor_line + tilt * (x - 0.5)
    wall = hsv_color(rng.uniform(0, 1), rng.uniform(0.1, 0.45), rng.uniform(0.55, 0.9))
    light = 1.0 + 0.35 * (x - rng.uniform(0, 1))  # a lamp on one side
    if rng.random() < 0.5:  # striped wallpaper
        stripes = (np.sin(x * 2 * np.pi * rng.uniform(6, 12)) > 0)[..., None] * 0.08
        walls = wall * light[..., None] - stripes
    else:  # painted brick
        walls = wall * light[..., None] + _photo_texture(rng, "brick", n)[..., None] * 0.06
    img = walls
    # a window showing sky
    wx, wy = rng.uniform(0.05, 0.65), rng.uniform(0.08, 0.3)
    ww, wh = rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.25)
    win = (x > wx) & (x < wx + ww) & (y > wy) & (y < wy + wh)
    frame = win & ((np.abs(x - wx - ww / 2) < 0.012) | (np.abs(y - wy - wh / 2) < 0.012))
    img = np.where(win[..., None], _lerp(hsv_color(0.58, 0.5, 1.0), hsv_color(0.58, 0.2, 0.9), (y - wy) / wh), img)
    img = np.where(frame[..., None], np.full(3, 0.95), img)
    # a wooden floor in perspective: boards converge to a vanishing point above the floor line
    vx = rng.uniform(0.2, 0.8)
    wood = hsv_color(rng.uniform(0.05, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.35, 0.6))
    depth = np.clip(y - f_y, 1e-3, None)
    boards = (np.sin((x - vx) / (depth + 0.15) * rng.uniform(6, 10)) > 0.85)[..., None] * 0.12
    img = np.where((y > f_y)[..., None], wood * (0.8 + 0.4 * depth)[..., None] - boards, img)
    return np.clip(img, 0, 1)


_SCENES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "underwater": _underwater, "street": _street, "meadow": _meadow, "night": _night, "room": _room,
}


# --------------------------------------------------------------------------- occluders


def _occluder(rng: np.random.Generator, kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A scene element in front of the objects: (colour HxWx3, hard mask HxW) at n x n."""
    if kind in ("underwater", "meadow"):  # seaweed or tall grass: a few wavy blades from the bottom
        col = hsv_color(rng.uniform(0.22, 0.4), rng.uniform(0.5, 0.9), rng.uniform(0.25, 0.55))
        blades = [(rng.uniform(0, 1), rng.uniform(0.3, 0.8), rng.uniform(0.015, 0.035), rng.uniform(-0.15, 0.15))
                  for _ in range(int(rng.integers(1, 4)))]

        def draw(d: ImageDraw.ImageDraw, s: int) -> None:
            for bx, height, width, lean in blades:
                ts = np.linspace(0, 1, 12)
                xs = bx + lean * ts + 0.03 * np.sin(ts * 6 + bx * 10)
                ys = 1.02 - height * ts
                left = [(float((u - width * (1 - t)) * s), float(v * s)) for u, v, t in zip(xs, ys, ts)]
                right = [(float((u + width * (1 - t)) * s), float(v * s)) for u, v, t in zip(xs[::-1], ys[::-1], ts[::-1])]
                d.polygon(left + right, fill=255)
    elif kind == "street":  # a lamp post or a sign pole
        col = np.full(3, rng.uniform(0.1, 0.3))
        px, w = rng.uniform(0.1, 0.9), rng.uniform(0.025, 0.05)
        top = rng.uniform(0.0, 0.3)

        def draw(d: ImageDraw.ImageDraw, s: int) -> None:
            d.rectangle([(px - w / 2) * s, top * s, (px + w / 2) * s, s], fill=255)
            d.rectangle([(px - w / 2) * s, top * s, (px + 0.12) * s, (top + w) * s], fill=255)
    elif kind == "room":  # a chair back: two posts and a rail
        col = hsv_color(rng.uniform(0.05, 0.1), 0.6, rng.uniform(0.15, 0.35))
        px, w, rail = rng.uniform(0.0, 0.7), rng.uniform(0.2, 0.35), rng.uniform(0.4, 0.7)

        def draw(d: ImageDraw.ImageDraw, s: int) -> None:
            for post in (px, px + w):
                d.rectangle([post * s, rail * s, (post + 0.035) * s, s], fill=255)
            d.rectangle([px * s, rail * s, (px + w + 0.035) * s, (rail + 0.05) * s], fill=255)
    else:  # a bare branch across the view
        col = hsv_color(rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.05, 0.2))
        y0, y1 = rng.uniform(0, 1, 2)
        w = rng.uniform(0.02, 0.04)
        twig = (rng.uniform(0.3, 0.7), rng.uniform(-0.3, 0.3))

        def draw(d: ImageDraw.ImageDraw, s: int) -> None:
            a, b = (-0.05 * s, y0 * s), (1.05 * s, y1 * s)
            d.line([a, b], fill=255, width=max(1, int(w * s)))
            tx = twig[0]
            ty = y0 + (y1 - y0) * (tx + 0.05) / 1.1
            d.line([(tx * s, ty * s), ((tx + 0.15) * s, (ty + twig[1]) * s)], fill=255, width=max(1, int(0.6 * w * s)))
    coverage = _shape_mask(n, draw)
    x, y = _grid(n)
    shade = (0.85 + 0.3 * y)[..., None]
    return np.clip(col * shade, 0, 1), coverage >= 0.5


# ------------------------------------------------------------------------------ rows


def choose_scene(rng: np.random.Generator, classes: Sequence[str]) -> str:
    """The scene kind: the first class's habitat with HABITAT_PROBABILITY, else any other kind."""
    if classes and rng.random() < HABITAT_PROBABILITY:
        return HABITATS[classes[0]]
    home = HABITATS.get(classes[0]) if classes else None
    others = [s for s in SCENES if s != home]
    return str(rng.choice(others))


def caption(rng: np.random.Generator, classes: Sequence[str], scene: str, photo: str | None) -> str:
    """A web-like caption: what is in view and, sometimes, where."""
    if not classes:
        what = _PHOTOS[photo] if scene == "photo" else str(rng.choice(_EMPTY[scene]))
        return what if rng.random() < 0.5 else f"a photo of {what}"
    items = [f"a {c}" for c in classes]
    things = items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
    where = _WHERE[scene]
    if where and rng.random() < 0.5:
        things = f"{things} {rng.choice(where)}"
    return f"a photo of {things}" if rng.random() < 0.7 else things


def render(rng: np.random.Generator, classes: Sequence[str], scene: str, photo: str | None, size: int):
    """Render a v2 scene; return (image uint8, union mask, object masks, the scene without its objects
    (occluders included) uint8)."""
    if scene == "photo":
        background = to_u8(_photo_background(rng, size, photo))
    else:
        background = to_u8(_SCENES[scene](rng, size))
    image = background.copy()
    masks: list[np.ndarray] = []
    lo, hi = (0.4, 0.9) if len(classes) <= 1 else (0.3, 0.55)
    for cls in classes:
        extent = rng.uniform(lo, hi) * size
        best = None
        for attempt in range(4):  # shrink the object if it cannot be placed with little overlap
            color, patch = draw_object(rng, cls, extent * 0.85**attempt)
            h, w = patch.shape
            for _ in range(25):  # up to 30% of the object may leave the frame
                y = int(rng.integers(-int(0.3 * h), size - int(0.7 * h) + 1))
                x = int(rng.integers(-int(0.3 * w), size - int(0.7 * w) + 1))
                m = paste(patch, y, x, size)
                if m.sum() < 0.55 * patch.sum():
                    continue
                overlap = max((np.logical_and(m, o).sum() / max(min(m.sum(), o.sum()), 1) for o in masks), default=0.0)
                if best is None or overlap < best[0]:
                    best = (overlap, m, paste(color, y, x, size))
                if overlap <= 0.1:
                    break
            if best is not None and best[0] <= 0.1:
                break
        if best is None:  # nothing placed with enough of it in frame: centre it
            color, patch = draw_object(rng, cls, extent * 0.6)
            h, w = patch.shape
            y, x = (size - h) // 2, (size - w) // 2
            best = (1.0, paste(patch, y, x, size), paste(color, y, x, size))
        _, m, col = best
        image[m] = to_u8(col[m])
        masks = [o & ~m for o in masks] + [m]
    if classes and rng.random() < 0.35:  # a scene element in front, hiding part of the objects
        occ_col, occ = _occluder(rng, scene, size)
        keep = [o & ~occ for o in masks]
        if all(k.sum() >= 0.6 * o.sum() for k, o in zip(keep, masks)):
            image[occ] = background[occ] = to_u8(occ_col[occ])  # the occluder belongs to the scene
            masks = keep
    union = np.logical_or.reduce(masks) if masks else np.zeros((size, size), dtype=bool)
    return image, union, masks, background


def _photo_background(rng: np.random.Generator, size: int, name: str) -> np.ndarray:
    img = render_background(rng, size, source=name)
    x, _ = _grid(size)
    side = x if rng.random() < 0.5 else 1 - x
    return np.clip(img * (0.8 + 0.4 * side)[..., None], 0, 1)


def scene_spec(rng: np.random.Generator, classes: Sequence[str]) -> tuple[str, str | None, str]:
    """(scene kind, photo source or None, caption) for a row's classes, drawn from `rng`."""
    scene = choose_scene(rng, classes)
    photo = str(rng.choice(sorted(_PHOTOS))) if scene == "photo" else None
    return scene, photo, caption(rng, classes, scene, photo)
