"""`conceptseg evaluate`: predicted masks against a dataset's ground truth, as the paper reports it.

Mask datasets: pooled pixel accuracy, foreground IoU and mIoU over all test pixels. Box datasets
(Stanford Dogs, Stanford Cars, Human3.6M): bounding-box IoU, the tight box of the predicted mask
against the annotated box, averaged over images. Per-image numbers go into the JSON too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptseg.data.readers import Sample, box_iou, load_mask, mask_to_box, read_dataset
from conceptseg.geometry import ImageReadError, image_size, load_mask_file
from conceptseg.io import write_json
from conceptseg.metrics import PooledCounts


def find_prediction(pred_dir: Path, sample: Sample) -> Path | None:
    """pred_dir[/masks]/<key or image stem>.png: the names prelim, refine and segment write."""
    for folder in (pred_dir / "masks", pred_dir):
        for name in (sample.key, sample.image.stem):
            if (folder / f"{name}.png").exists():
                return folder / f"{name}.png"
    return None


def evaluate_predictions(pred_dir: str | Path, spec: str, split: str = "test") -> dict:
    report = evaluate_samples(pred_dir, read_dataset(spec, split))
    report["summary"].update(dataset=spec, split=split)
    return report


def evaluate_samples(pred_dir: str | Path, samples: list[Sample]) -> dict:
    pred_dir = Path(pred_dir)
    counts, box_ious, per_image, missing = PooledCounts(), [], {}, []
    for s in samples:
        path = find_prediction(pred_dir, s)
        if path is None:
            missing.append(s.key)
            continue
        try:
            pred = load_mask_file(path)
        except ImageReadError as e:
            missing.append(f"{s.key} ({e})")
            continue
        w, h = image_size(s.image)
        if pred.shape != (h, w):
            raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]}, image {s.image} is {w}x{h}")
        row = {}
        if s.mask is not None:
            truth = load_mask(s)
            one = PooledCounts()
            one.add(pred, truth)
            counts.add(pred, truth)
            row.update(one.as_dict())
        if s.box is not None:
            row["box_iou"] = box_iou(mask_to_box(pred), s.box)
            box_ious.append(row["box_iou"])
        per_image[s.key] = row
    if not per_image:
        raise ValueError(f"no prediction in {pred_dir} matches a test image; expected <key>.png, e.g. {samples[0].key}.png"
                         if samples else "no test images to evaluate")
    summary = {"predictions": str(pred_dir), "evaluated": len(per_image), "missing": len(missing)}
    if counts.tp + counts.fp + counts.fn + counts.tn:
        summary.update(counts.as_dict())
    if box_ious:
        summary["box_iou"] = float(np.mean(box_ious))
    return {"summary": summary, "missing": missing, "per_image": per_image}


def format_summary(summary: dict) -> str:
    cols = [k for k in ("acc", "iou", "miou", "box_iou") if k in summary]
    head = "| images | " + " | ".join(c.upper().replace("_", " ") for c in cols) + " |"
    body = f"| {summary['evaluated']} | " + " | ".join(f"{100 * summary[c]:.1f}" for c in cols) + " |"
    return "\n".join([head, "|---" * (len(cols) + 1) + "|", body])


def run_evaluate(pred_dir: Path, spec: str, split: str, out: Path | None) -> dict:
    report = evaluate_predictions(pred_dir, spec, split)
    write_json(out or Path(pred_dir) / "evaluation.json", report)
    return report
