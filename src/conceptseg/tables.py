"""The table of a run's scores (the paper's Table 2 rows): the rows' names and the markdown table
that `conceptseg run`, `demo`, the run's report and a segmenter's model card show."""

from __future__ import annotations

ROW_NAMES = {
    "prelim": "preliminary masks M_pre",
    "crop": "crop-paste inpainting M_crop",
    "unet_prelim": "U-Net on (D, M_pre)",
    "untuned": "refined masks M, model not fine-tuned",
    "refined": "refined masks M",
    "unet_real": "U-Net on D_s",
    "unet_real_synth": "U-Net on D_s + D'_s",
    "supervised": "supervised U-Net (true masks)",
}


def format_table(metrics: dict) -> str:
    """The rows as a markdown table; `evaluated` / `missing` say what each row was scored on."""
    metrics = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    has_box = any("box_iou" in m for m in metrics.values())
    head = ["method", "ACC", "IoU", "mIoU"] + (["box IoU"] if has_box else []) + ["evaluated", "missing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, m in metrics.items():
        cells = [f"{100 * m[k]:.1f}" if k in m else "-" for k in ("acc", "iou", "miou") + (("box_iou",) if has_box else ())]
        lines.append(f"| {ROW_NAMES.get(key, key)} | " + " | ".join(cells + [str(m.get("evaluated", "-")), str(m.get("missing", "-"))]) + " |")
    return "\n".join(lines)
