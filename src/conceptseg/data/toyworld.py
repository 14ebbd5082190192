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

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from conceptseg.data import toyscenes
from conceptseg.data.drawing import SHAPES, draw_object, paste, render_background, to_u8

CLASSES: tuple[str, ...] = tuple(SHAPES)  # star, heart, fish, flower, car
BACKGROUND_CAPTION = "a photo of a background"
WORLDS: dict[str, str] = {
    "v1": "small objects on photo textures; empty scenes captioned 'a photo of a background'",
    "v2": "large, sometimes cut or occluded objects in structured scenes of their usual habitat; web-like captions",
}
MIN_EXTENT, MAX_EXTENT = 0.15, 0.60  # object bounding extent / image side


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


# ---------------------------------------------------------------------------- scenes


def _check_render_args(classes: Sequence[str], size: int) -> None:
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known: {CLASSES}")


def _render(rng: np.random.Generator, classes: Sequence[str], size: int = 64) -> tuple[Scene, np.ndarray]:
    """Render a scene; also return the uint8 background it was composited on (for testing)."""
    _check_render_args(classes, size)
    background = to_u8(render_background(rng, size))
    image = background.copy()
    hi = {0: MAX_EXTENT, 1: MAX_EXTENT, 2: 0.5}.get(len(classes), 0.42)
    masks: list[np.ndarray] = []
    for cls in classes:
        extent = rng.uniform(MIN_EXTENT, hi) * size
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for attempt in range(4):  # shrink the object if it cannot be placed with little overlap
            color, patch = draw_object(rng, cls, extent * 0.85**attempt)
            h, w = patch.shape
            for _ in range(25):
                y = int(rng.integers(-int(0.1 * h), size - int(0.9 * h) + 1))
                x = int(rng.integers(-int(0.1 * w), size - int(0.9 * w) + 1))
                m = paste(patch, y, x, size)
                area = max(int(m.sum()), 1)
                overlap = max((np.logical_and(m, o).sum() / max(min(area, o.sum()), 1) for o in masks), default=0.0)
                if best is None or overlap < best[0]:
                    best = (overlap, m, paste(color, y, x, size))
                if overlap <= 0.1:
                    break
            if best[0] <= 0.1:
                break
        assert best is not None
        _, m, col = best
        image[m] = to_u8(col[m])
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
