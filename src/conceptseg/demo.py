"""`conceptseg demo`: the README's main command, on the embedded toy-world model.

It makes held-out toy-world images of one class (their true masks are known), runs stage 1 on
them exactly as a user would (`prelim` into a run folder), and scores the result against the
truth: pooled ACC / IoU / mIoU of M_pre and the raw map's AUC-ROC. Later stages join this command
as they land.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptseg.data.imagefolder import read_imagefolder
from conceptseg.data.toyworld import ToyWorldConfig, generate
from conceptseg.geometry import Canvas, load_rgb
from conceptseg.io import save_png, write_json
from conceptseg.metrics import PooledCounts, auc_roc
from conceptseg.models import load_model
from conceptseg.prelim import PrelimConfig, run_prelim
from conceptseg.report import picture_grid


@dataclass
class DemoConfig:
    out: Path
    concept: str = "fish"
    num_images: int = 24
    steps: int = 40  # T0
    batch_size: int = 40
    seed: int = 1234  # the toy world's seed: not the embedded model's training seed (0)
    model: str | None = None
    device: str | None = None


def _held_out_images(cfg: DemoConfig) -> list:
    """Single-object rows of the concept's class from a toy world the model never saw."""
    data = cfg.out / "data"
    num = cfg.num_images * 6
    while True:
        generate(data, num, seed=cfg.seed, config=ToyWorldConfig(test_fraction=1.0, background_fraction=0.0,
                                                                 multi_object_fraction=0.0), progress=False)
        rows = [r for r in read_imagefolder(data) if r.classes == (cfg.concept,)]
        if len(rows) >= cfg.num_images:
            return rows[: cfg.num_images]
        num *= 2


def run_demo(cfg: DemoConfig) -> dict:
    cfg.out = Path(cfg.out)
    rows = _held_out_images(cfg)
    images = cfg.out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if not (images / r.image.name).exists():
            shutil.copy(r.image, images / r.image.name)

    model = load_model(cfg.model, device=cfg.device)
    prelim_out = cfg.out / "prelim"
    run_prelim(model, images, prelim_out, PrelimConfig(cfg.concept, steps=cfg.steps, batch_size=cfg.batch_size))

    counts, aucs, grid = PooledCounts(), [], []
    for r in rows:
        truth = np.asarray(load_rgb(r.mask).convert("L")) > 127
        pred = np.asarray(load_rgb(prelim_out / "masks" / f"{r.image.stem}.png").convert("L")) > 127
        attention = np.load(prelim_out / "attention" / f"{r.image.stem}.npy")
        image = load_rgb(r.image)
        full_map = Canvas(image.width, image.height, model.resolution).restore(attention)
        counts.add(pred, truth)
        aucs.append(auc_roc(full_map, truth))
        grid.append([np.asarray(image), full_map, pred, truth])
    metrics = {"prelim": {**counts.as_dict(), "auc": float(np.nanmean(aucs))}}
    write_json(cfg.out / "metrics.json", {**metrics, "model": model.source, "concept": cfg.concept, "images": len(rows)})
    save_png(cfg.out / "prelim_grid.png", picture_grid(grid[:12], ["image", "attention", "M_pre", "truth"]))
    return metrics


def format_table(metrics: dict) -> str:
    names = {"prelim": "preliminary masks M_pre"}
    lines = ["| method | ACC | IoU | mIoU | AUC |", "|---|---|---|---|---|"]
    for key, m in metrics.items():
        auc = f"{100 * m['auc']:.1f}" if "auc" in m else "-"
        lines.append(f"| {names.get(key, key)} | {100 * m['acc']:.1f} | {100 * m['iou']:.1f} | {100 * m['miou']:.1f} | {auc} |")
    return "\n".join(lines)
