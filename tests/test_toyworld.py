"""Tests for the procedural toy-world dataset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    from conceptseg.data import toyworld
except ImportError:  # package not installed: fall back to the src layout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from conceptseg.data import toyworld

from conceptseg.data.toyworld import (
    BACKGROUND_CAPTION,
    CLASSES,
    ToyWorldConfig,
    caption_for,
    generate,
    load_rows,
    render_scene,
)

ROW_KEYS = {"file_name", "mask_file_name", "caption", "class", "classes", "object_mask_file_names", "split"}


def test_captions() -> None:
    assert caption_for([]) == BACKGROUND_CAPTION == "a photo of a background"
    assert caption_for(["star"]) == "a photo of a star"
    assert caption_for(["star", "car"]) == "a photo of a star and a car"
    assert caption_for(["star", "car", "fish"]) == "a photo of a star, a car and a fish"
    assert len(CLASSES) >= 5 and len(set(CLASSES)) == len(CLASSES)


def test_determinism() -> None:
    a = render_scene(np.random.default_rng([3, 1]), ["fish", "car"])
    b = render_scene(np.random.default_rng([3, 1]), ["fish", "car"])
    c = render_scene(np.random.default_rng([4, 1]), ["fish", "car"])
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert all(np.array_equal(x, y) for x, y in zip(a.object_masks, b.object_masks))
    assert a.caption == b.caption == "a photo of a fish and a car"
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("cls", CLASSES)
def test_mask_matches_drawn_pixels(cls: str) -> None:
    for seed in range(4):
        scene, background = toyworld._render(np.random.default_rng([seed, 7]), [cls], 64)
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert scene.mask.dtype == bool and scene.mask.shape == (64, 64)
        assert np.array_equal(scene.image[~scene.mask], background[~scene.mask])
        changed = np.any(scene.image != background, axis=-1)
        assert changed[scene.mask].mean() > 0.9
        assert np.array_equal(scene.object_masks[0], scene.mask)


def test_background_scene() -> None:
    scene = render_scene(np.random.default_rng(0), [], 64)
    assert scene.caption == BACKGROUND_CAPTION
    assert not scene.mask.any() and scene.object_masks == [] and scene.classes == []
    assert scene.image.std() > 0


def test_sizes_areas_and_disjoint_masks() -> None:
    extents = []
    for i in range(50):
        rng = np.random.default_rng([11, i])
        k = 1 + i % 3
        classes = [str(c) for c in rng.choice(CLASSES, size=k, replace=False)]
        scene = render_scene(rng, classes, 64)
        assert len(scene.object_masks) == k and scene.classes == classes
        stack = np.stack(scene.object_masks)
        assert (stack.sum(axis=(1, 2)) > 0).all()
        assert (stack.sum(axis=0) <= 1).all()  # disjoint
        assert np.array_equal(stack.any(axis=0), scene.mask)
        if k == 1:
            ys, xs = np.nonzero(scene.mask)
            extents.append(max(np.ptp(ys) + 1, np.ptp(xs) + 1) / 64)
    assert 0.1 <= min(extents) and max(extents) <= 0.65
    assert max(extents) - min(extents) > 0.2  # sizes actually vary


@pytest.mark.parametrize("size", [32, 64, 128])
def test_every_class_at_every_size(size: int) -> None:
    for j, cls in enumerate(CLASSES):
        scene = render_scene(np.random.default_rng([size, j]), [cls], size)
        assert scene.image.shape == (size, size, 3)
        assert scene.mask.sum() >= 4


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), ["unicorn"])
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), ["star"], size=16)


def test_generate_layout_and_resume(tmp_path: Path) -> None:
    cfg = ToyWorldConfig(test_fraction=0.3)
    root = generate(tmp_path / "tw", num=12, seed=5, config=cfg, progress=False)
    rows = load_rows(root)
    assert len(rows) == 12
    for i, row in enumerate(rows):
        assert set(row) == ROW_KEYS
        assert row["file_name"] == f"images/{i:05d}.png"
        assert row["mask_file_name"] == f"masks/{i:05d}.png"
        assert row["split"] in ("train", "test")
        assert row["caption"] == caption_for(row["classes"])
        assert len(row["object_mask_file_names"]) == len(row["classes"])
        assert len(set(row["classes"])) == len(row["classes"])
        assert row["class"] == ("+".join(row["classes"]) or "background")
        if row["split"] == "test":
            assert len(row["classes"]) == 1
        image = Image.open(root / row["file_name"])
        mask = np.asarray(Image.open(root / row["mask_file_name"]))
        assert image.mode == "RGB" and image.size == (64, 64)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert mask.any() == bool(row["classes"])
        union = np.zeros_like(mask, dtype=bool)
        for name in row["object_mask_file_names"]:
            obj = np.asarray(Image.open(root / name)) > 0
            assert obj.any() and not (union & obj).any()
            union |= obj
        assert np.array_equal(union, mask > 0)
    assert not list(root.rglob("*.tmp*"))

    files = sorted(p for p in root.rglob("*.png"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    metadata = (root / "metadata.jsonl").read_text()
    generate(root, num=12, seed=5, config=cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert (root / "metadata.jsonl").read_text() == metadata
    assert json.loads(metadata.splitlines()[0])["file_name"] == "images/00000.png"

    # extending keeps the first rows and renders the new ones identically to a fresh run
    generate(root, num=14, seed=5, config=cfg, progress=False)
    fresh = generate(tmp_path / "fresh", num=14, seed=5, config=cfg, progress=False)
    assert load_rows(root)[:12] == rows
    assert load_rows(root) == load_rows(fresh)
    a, b = (np.asarray(Image.open(r / "images/00013.png")) for r in (root, fresh))
    assert np.array_equal(a, b)


def test_generate_in_worker_processes_matches_serial(tmp_path: Path) -> None:
    serial = generate(tmp_path / "serial", num=10, seed=3, progress=False)
    parallel = generate(tmp_path / "parallel", num=10, seed=3, progress=False, workers=2)
    assert (serial / "metadata.jsonl").read_text() == (parallel / "metadata.jsonl").read_text()
    files = sorted(p.relative_to(serial) for p in serial.rglob("*.png"))
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*.png"))
    for rel in files:
        assert np.array_equal(np.asarray(Image.open(serial / rel)), np.asarray(Image.open(parallel / rel))), rel


def test_split_composition() -> None:
    cfg = ToyWorldConfig()
    specs = [toyworld._row_spec(0, i, cfg)[1:] for i in range(2000)]
    test = [c for c, s in specs if s == "test"]
    train = [c for c, s in specs if s == "train"]
    assert 0.15 < len(test) / len(specs) < 0.25
    assert all(len(c) == 1 for c in test) and {c[0] for c in test} == set(CLASSES)
    assert 0.05 < sum(len(c) == 0 for c in train) / len(train) < 0.15
    assert 0.4 < sum(len(c) >= 2 for c in train) / len(train) < 0.6


def test_load_rows_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_rows(tmp_path)
