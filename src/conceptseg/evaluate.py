"""`conceptseg evaluate`: predicted masks against a dataset's ground truth, as the paper reports it.

Mask datasets: pooled pixel accuracy, foreground IoU and mIoU over all test pixels. Box datasets
(Stanford Dogs, Stanford Cars, Human3.6M): bounding-box IoU, the tight box of the predicted mask
against the annotated box, averaged over images. Per-image numbers go into the JSON too.

Every test image counts: one without a prediction is scored as an empty mask (and named), so
rows scored together are scored on the same images. `protocol` says where masks are compared:
"paper" (METHOD.md §5: prediction and truth resized so the short side is `size`, centre crop of
size x size, the paper's 128) or "full" (the whole image at its original size). Box IoU is always
on the whole image: a crop would cut the boxes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from conceptseg.data.readers import Sample, box_iou, load_mask, mask_to_box, read_dataset
from conceptseg.geometry import ImageReadError, image_size, load_mask_file
from conceptseg.io import write_json
from conceptseg.metrics import PooledCounts

PROTOCOLS = ("paper", "full")
PAPER_SIZE = 128


def describe_protocol(protocol: str, size: int = PAPER_SIZE) -> str:
    if protocol == "paper":
        return f"masks: short side resized to {size}, centre crop {size}x{size} (the paper's test protocol); boxes: whole image"
    if protocol == "full":
        return "masks and boxes: whole image at its original size"
    raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")


def centre_crop_view(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask as the paper's test protocol sees it: short side resized to `size` (bilinear, >= 0.5),
    then the centre `size` x `size` crop."""
    h, w = mask.shape
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((nw, nh), Image.Resampling.BILINEAR)) >= 0.5
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top : top + size, left : left + size]


def prediction_path(pred_dir: Path, sample: Sample) -> Path | None:
    """pred_dir[/masks]/<key>.png: the name prelim, refine and segment give a sample's mask."""
    for folder in (pred_dir / "masks", pred_dir):
        if (folder / f"{sample.key}.png").exists():
            return folder / f"{sample.key}.png"
    return None


def evaluate_predictions(pred_dir: str | Path, spec: str, split: str = "test", protocol: str = "paper",
                         size: int = PAPER_SIZE) -> dict:
    report = evaluate_samples(pred_dir, read_dataset(spec, split), protocol, size)
    report["summary"].update(dataset=spec, split=split)
    return report


def evaluate_samples(pred_dir: str | Path, samples: list[Sample], protocol: str = "paper", size: int = PAPER_SIZE) -> dict:
    pred_dir = Path(pred_dir)
    summary = {"predictions": str(pred_dir), "protocol": describe_protocol(protocol, size)}
    if not samples:
        raise ValueError("no test images to evaluate")
    counts, box_ious, per_image, missing, unreadable = PooledCounts(), [], {}, [], []
    for s in samples:
        try:
            w, h = image_size(s.image)
        except ImageReadError as e:  # no size, so nothing to score against: named, left out
            unreadable.append(str(e))
            continue
        path, pred = prediction_path(pred_dir, s), None
        if path is None:
            missing.append(s.key)
        else:
            try:
                pred = load_mask_file(path)
            except ImageReadError as e:
                missing.append(f"{s.key} ({e})")
            else:
                if pred.shape != (h, w):
                    raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]}, image {s.image} is {w}x{h}")
        row = {"missing": pred is None}
        if pred is None:  # scored as predicting no foreground at all
            pred = np.zeros((h, w), dtype=bool)
        if s.mask is not None:
            truth = load_mask(s)
            if protocol == "paper":
                pred_view, truth_view = centre_crop_view(pred, size), centre_crop_view(truth, size)
            else:
                pred_view, truth_view = pred, truth
            one = PooledCounts()
            one.add(pred_view, truth_view)
            counts.add(pred_view, truth_view)
            row.update(one.as_dict())
        if s.box is not None:
            row["box_iou"] = box_iou(mask_to_box(pred), s.box)
            box_ious.append(row["box_iou"])
        per_image[s.key] = row
    if len(missing) == len(samples):
        raise ValueError(f"no prediction in {pred_dir} matches a test image; expected <key>.png, e.g. {samples[0].key}.png")
    summary.update(evaluated=len(per_image) - len(missing), missing=len(missing), unreadable=len(unreadable))
    if counts.tp + counts.fp + counts.fn + counts.tn:
        summary.update(counts.as_dict())
    if box_ious:
        summary["box_iou"] = float(np.mean(box_ious))
    return {"summary": summary, "missing": missing, "unreadable": unreadable, "per_image": per_image}


def format_summary(summary: dict) -> str:
    cols = [k for k in ("acc", "iou", "miou", "box_iou") if k in summary]
    head = "| evaluated | missing | " + " | ".join(c.upper().replace("_", " ") for c in cols) + " |"
    body = f"| {summary['evaluated']} | {summary['missing']} | " + " | ".join(f"{100 * summary[c]:.1f}" for c in cols) + " |"
    return "\n".join([head, "|---" * (len(cols) + 2) + "|", body])


def run_evaluate(pred_dir: Path, spec: str, split: str, out: Path | None, protocol: str = "paper", size: int = PAPER_SIZE) -> dict:
    report = evaluate_predictions(pred_dir, spec, split, protocol, size)
    write_json(out or Path(pred_dir) / "evaluation.json", report)
    return report
