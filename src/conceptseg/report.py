"""Pictures of what a stage did: grids of image | map | mask | truth, as PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from conceptseg.pictures import picture_grid


def _load_mask(path) -> np.ndarray | None:
    from pathlib import Path

    from conceptseg.geometry import load_mask_file

    return load_mask_file(path) if Path(path).exists() else None


def run_report(run_dir, samples, metrics: dict, timings: dict, row_names: dict, segmenter: str | None = None,
               model_resolution: int | None = None, count: int = 6, protocol: str = "") -> None:
    """report.html (self-contained: pictures embedded) and the same grids as PNG, in the run folder.

    Grids: image | attention | M_pre | inpainted background | M | segmenter | truth, for the best
    and the worst test images by IoU of M.
    """
    import base64
    import html
    import io
    from pathlib import Path

    from conceptseg.data.readers import load_mask
    from conceptseg.geometry import Canvas, load_rgb
    from conceptseg.io import save_png, write_text

    run = Path(run_dir)
    scored = []
    for s in samples:
        refined = _load_mask(run / "refine" / "masks" / f"{s.key}.png")
        if refined is None or s.mask is None:
            continue
        truth = load_mask(s)
        union = (refined | truth).sum()
        scored.append(((refined & truth).sum() / union if union else 1.0, s, truth))
    scored.sort(key=lambda x: x[0])
    titles = ["image", "attention", "M_pre", "background", "M", "segmenter", "truth"]

    def grid(items) -> np.ndarray:
        rows = []
        for _, s, truth in items:
            image = load_rgb(s.image)
            stem = s.key
            attn_path = run / "prelim" / "attention" / f"{stem}.npy"
            attention = np.load(attn_path) if attn_path.exists() else np.zeros((8, 8), np.float32)
            if model_resolution:
                attention = Canvas(image.width, image.height, model_resolution).restore(attention)
            background = run / "refine" / "background" / f"{stem}.png"
            blank = np.zeros(truth.shape, bool)
            rows.append([np.asarray(image), attention,
                         _load_mask(run / "prelim" / "masks" / f"{stem}.png"),
                         np.asarray(load_rgb(background)) if background.exists() else np.asarray(image),
                         _load_mask(run / "refine" / "masks" / f"{stem}.png"),
                         (_load_mask(run / "eval" / segmenter / "masks" / f"{stem}.png") if segmenter else None),
                         truth])
            rows[-1] = [x if x is not None else blank for x in rows[-1]]
        return picture_grid(rows, titles)

    sections = {"best": scored[::-1][:count], "worst": scored[:count]}
    pictures = {}
    for name, items in sections.items():
        if items:
            pictures[name] = grid(items)
            save_png(run / f"grid_{name}.png", pictures[name])

    if (run / "untuned" / "background").is_dir():  # stage 2's ablation: the same holes, filled before and after fine-tuning
        pictures["stage 2 ablation"] = _ablation_grid(run, [item for item in sorted(scored, key=lambda x: x[1].key)][:count])
        save_png(run / "grid_ablation.png", pictures["stage 2 ablation"])

    def embed(a: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    rows = "".join(
        f"<tr><td>{html.escape(row_names.get(k, k))}</td>" + "".join(
            f"<td>{100 * m[c]:.1f}</td>" if c in m else "<td>-</td>" for c in ("acc", "iou", "miou", "box_iou"))
        + f"<td>{m.get('evaluated', '-')}</td><td>{m.get('missing', '-')}</td></tr>"
        for k, m in metrics.items())
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in timings.items())
    captions = {"stage 2 ablation": "stage 2 ablation: the first test images, inpainted by the model before and after fine-tuning"}
    grids = "".join(f"<h2>{captions.get(name, f'{name} test images by IoU of M')}</h2><img src='{embed(a)}'>"
                    for name, a in pictures.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>conceptseg run</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%;image-rendering:pixelated}}</style></head><body>
<h1>conceptseg run: {html.escape(str(run))}</h1>
<h2>Results on the test images (%; pooled over all pixels; box IoU averaged over images)</h2>
<p>{html.escape(protocol)}</p>
<table><tr><th>method</th><th>ACC</th><th>IoU</th><th>mIoU</th><th>box IoU</th><th>evaluated</th><th>missing</th></tr>{rows}</table>
{grids}
<h2>Timings (s)</h2><table>{timing_rows}</table></body></html>"""
    write_text(run / "report.html", page)


def _ablation_grid(run, items) -> np.ndarray:
    """image | M_pre | inpainting by the untuned model | its M | inpainting by the fine-tuned model | M."""
    from conceptseg.geometry import load_rgb

    rows = []
    for _, s, truth in items:
        image = np.asarray(load_rgb(s.image))
        row = [image, _load_mask(run / "prelim" / "masks" / f"{s.key}.png")]
        for stage in ("untuned", "refine"):
            background = run / stage / "background" / f"{s.key}.png"
            row += [np.asarray(load_rgb(background)) if background.exists() else image,
                    _load_mask(run / stage / "masks" / f"{s.key}.png")]
        rows.append([x if x is not None else np.zeros(truth.shape, bool) for x in row])
    return picture_grid(rows, ["image", "M_pre", "untuned inpainting", "M, untuned", "tuned inpainting", "M"])


def line_plot(xs: list[float], series: dict[str, list[float]], title: str, width: int = 480, height: int = 300,
              y_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """A small line chart (no plotting library needed), e.g. a metric against training steps."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 40, width - 10, 24, height - 30
    lo, hi = y_range
    x0, x1 = min(xs), max(xs)

    def px(x: float, y: float) -> tuple[float, float]:
        fx = (x - x0) / ((x1 - x0) or 1)
        return left + fx * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for k in range(6):
        y = lo + k * (hi - lo) / 5
        draw.text((4, px(x0, y)[1] - 5), f"{y:.1f}", fill=(0, 0, 0))
        draw.line([left, px(x0, y)[1], right, px(x0, y)[1]], fill=(225, 225, 225))
    for x in xs:
        draw.text((px(x, lo)[0] - 10, bottom + 4), f"{x:g}", fill=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0))
    for i, (name, ys) in enumerate(series.items()):
        c = colours[i % len(colours)]
        pts = [px(x, y) for x, y in zip(xs, ys)]
        draw.line(pts, fill=c, width=2)
        for p in pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
        draw.text((right - 150, top + 6 + 12 * i), name, fill=c)
    return np.asarray(img)
