"""Stage 3's difference |x - x_bg| against alternatives, judged by M's precision and recall against truth.

On a finished run (its fine-tuned model and M_pre), each image is inpainted K times (stage 3 as the
run made it, with refine seeds 0..K-1; seed 0's inpainting is the run's own), once, and M is then
made from those backgrounds in several ways:

- color, K=1: the paper (per-pixel mean over RGB of |x - x_bg|), the run's own M;
- color, mean of K: `refine.samples=K` (difference maps of K inpaintings averaged);
- color, min of K: a pixel differs only if it differs from every inpainting (none reproduces it);
- local_stats (window w), K=1 or mean of K: `refine.difference=local_stats`, the difference of local
  mean and standard deviation, where one texture swapped for a like one is not a change.

Everything else is stage 3 as published (M = up(M_pre) * GMM threshold + orphan filter).

    python benchmarks/refine_difference.py runs/table2/reduced/world1234-seg0 --images 160 --samples 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run folder of `conceptseg demo` / `run` (prelim/, finetune/model, truth)")
    p.add_argument("--images", type=int, default=160, help="the test split first, then train images, up to this many")
    p.add_argument("--samples", type=int, default=3, help="K inpaintings per image")
    p.add_argument("--windows", type=int, nargs="+", default=[3, 5, 7])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "refine_difference-cpu.json")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from conceptseg.data.readers import list_samples, load_mask
    from conceptseg.geometry import Canvas, load_image_and_mask
    from conceptseg.metrics import PooledCounts
    from conceptseg.models import load_model
    from conceptseg.refine import (
        RefineConfig,
        Refiner,
        difference_map,
        latent_mask,
        upsample,
    )
    from conceptseg.thresholding import binarize

    config = json.loads((args.run / "manifest.json").read_text())["config"]
    test = list_samples(config["test_images"], config["test_split"])
    train = list_samples(config["images"], config["split"])
    samples = (test + train)[: args.images]
    model = load_model(args.run / "finetune" / "model", device="cpu")
    steps = config["refine"]["steps"]
    loaded = [load_image_and_mask(s.image, args.run / "prelim" / "masks" / f"{s.key}.png") for s in samples]
    images, prelims, keys = [im for im, _ in loaded], [m for _, m in loaded], [s.key for s in samples]
    truths = [load_mask(s) for s in samples]

    # K backgrounds per image: stage 3 with refine seed k (its first inpainting), in batches of 16
    t0 = time.perf_counter()
    backgrounds, run_masks = [], None
    for k in range(args.samples):
        refiner = Refiner(model, RefineConfig(steps=steps, seed=k))
        results = [r for i in range(0, len(images), 16) for r in refiner(images[i : i + 16], prelims[i : i + 16], keys[i : i + 16])]
        backgrounds.append(np.stack([r.background for r in results]))
        if k == 0:
            run_masks = [r.mask for r in results]
    inpaint_s = time.perf_counter() - t0

    x = np.stack([np.asarray(im) for im in images])
    canvases = [Canvas(im.width, im.height, model.resolution) for im in images]
    regions = [upsample(latent_mask(m, c, model.vae_scale_factor), model.vae_scale_factor) for m, c in zip(prelims, canvases)]

    def refined(diffs: np.ndarray) -> list[np.ndarray]:
        # toy images are the canvas's size: the maps need no placing; M as `Refiner` makes it
        return [c.restore(r & binarize(d, c.valid(model.resolution), seed=0)) for c, r, d in zip(canvases, regions, diffs)]

    def score(masks: list[np.ndarray]) -> dict:
        counts = PooledCounts()
        for m, t in zip(masks, truths):
            counts.add(m, t)
        wrong = counts.fp + counts.fn
        return {"iou": counts.iou, "precision": counts.tp / max(counts.tp + counts.fp, 1),
                "recall": counts.tp / max(counts.tp + counts.fn, 1), "background_share_of_errors": counts.fp / max(wrong, 1)}

    color = np.stack([difference_map(x, b, "color") for b in backgrounds])
    variants = {"M_pre (reference)": score(prelims), "color, K=1 (paper)": score(refined(color[0])),
                f"color, mean of K={args.samples}": score(refined(color.mean(0))),
                f"color, min of K={args.samples}": score(refined(color.min(0)))}
    for w in args.windows:
        local = np.stack([difference_map(x, b, "local_stats", w) for b in backgrounds])
        variants[f"local_stats w={w}, K=1"] = score(refined(local[0]))
        variants[f"local_stats w={w}, mean of K={args.samples}"] = score(refined(local.mean(0)))
    same = all((a == b).all() for a, b in zip(refined(color[0]), run_masks))

    head = (f"stage 3 variants on {len(samples)} images of {args.run} ({len(test)} test first), DDIM {steps}, "
            f"CPU {torch.get_num_threads()} thread(s); {args.samples} inpaintings per image in {inpaint_s:.0f} s")
    lines = [head,
             f"'color, K=1' equals Refiner's own M: {same}", "",
             "| variant | IoU | precision | recall | background share of errors |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {100 * v['iou']:.1f} | {v['precision']:.3f} | {v['recall']:.3f} | {v['background_share_of_errors']:.2f} |"
              for n, v in variants.items()]
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"run": str(args.run), "images": len(samples), "test_images_first": len(test),
                                     "samples": args.samples, "refine_steps": steps, "inpaint_s": round(inpaint_s, 1),
                                     "threads": torch.get_num_threads(), "paper_variant_equals_refiner": same,
                                     "variants": variants, "table": "\n".join(lines)}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
