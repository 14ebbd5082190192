"""Make docs/edit_grid.png: `remove`, `composite` and `segment` on held-out toy-world images.

    python docs/edit_grid.py RUN OUT      # RUN: a `conceptseg demo` run folder; OUT: a scratch folder

Columns: the image, its refined mask M (stage 3), the concept removed (`conceptseg remove`), the
cut-out over a background the fine-tuned model generated from "a photo of a background" and over a
given picture (`conceptseg composite`), and the run's U-Net cut-out (`conceptseg segment`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conceptseg.cli import main
from conceptseg.pictures import picture_grid


def checker(rgba: Image.Image) -> np.ndarray:
    """An RGBA cut-out over a grey checkerboard, as image editors show transparency."""
    w, h = rgba.size
    cells = ((np.arange(h)[:, None] // 8 + np.arange(w)[None, :] // 8) % 2).astype(np.uint8)
    board = Image.fromarray(np.stack([np.where(cells, 200, 255)] * 3, -1).astype(np.uint8))
    return np.asarray(Image.alpha_composite(board.convert("RGBA"), rgba).convert("RGB"))


def run(run_dir: Path, out: Path, count: int = 6) -> Path:
    data = run_dir / "data"
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"][:count]
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for r in test:
        shutil.copy(data / r["file_name"], images / Path(r["file_name"]).name)
    model, masks = str(run_dir / "finetune" / "model"), str(run_dir / "refine" / "masks")
    given = out / "given.png"
    from skimage import data as skdata

    Image.fromarray(skdata.brick()).convert("RGB").save(given)  # a real texture shipped with scikit-image
    seg = str(run_dir / "segmenter" / "unet_real" / "model")
    for argv in (["remove", "--model", model, "--images", str(images), "--masks", masks, "--out", str(out / "remove")],
                 ["composite", "--model", model, "--images", str(images), "--masks", masks, "--out", str(out / "generated")],
                 ["composite", "--background", str(given), "--images", str(images), "--masks", masks, "--out", str(out / "given")],
                 ["segment", "--segmenter", seg, "--images", str(images), "--out", str(out / "segment"), "--output", "rgba"]):
        if main(argv + ["--device", "cpu"]) != 0:
            raise SystemExit(f"failed: conceptseg {' '.join(argv)}")
    grid_rows = []
    for p in sorted(images.iterdir()):
        grid_rows.append([
            np.asarray(Image.open(p).convert("RGB")),
            np.asarray(Image.open(Path(masks) / p.name)) > 127,
            np.asarray(Image.open(out / "remove" / "removed" / p.name)),
            np.asarray(Image.open(out / "generated" / "composites" / p.name)),
            np.asarray(Image.open(out / "given" / "composites" / p.name)),
            checker(Image.open(out / "segment" / "cutouts" / p.name)),
        ])
    grid = picture_grid(grid_rows, ["image", "refined M", "removed", "generated bg", "given bg", "U-Net cut-out"], tile=112)
    target = Path(__file__).parent / "edit_grid.png"
    Image.fromarray(grid).save(target)
    return target


if __name__ == "__main__":
    print(run(Path(sys.argv[1]), Path(sys.argv[2])))
