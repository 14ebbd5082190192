"""Stage 3 settings against each other on a finished run: quality (pooled ACC/IoU/mIoU of M on the
run's test images, against the truth) and speed (images/s), in one process so the ratios compare.

    python benchmarks/refine_variants.py runs/demo        # after `conceptseg demo --out runs/demo`
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "DDIM 50 (paper)": dict(steps=50),
    "DDIM 25": dict(steps=25),
    "DPM-Solver++ 10": dict(steps=10, sampler="dpm++"),
    "DDIM 25, K=3 samples": dict(steps=25, samples=3),
    "DDIM 25, vs reconstruction": dict(steps=25, difference_to="reconstruction"),
    "M_crop (no model)": dict(inpainter="crop"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run folder with prelim/, finetune/model and a test split")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import tempfile

    import torch

    from conceptseg.data.readers import read_dataset
    from conceptseg.evaluate import evaluate_samples
    from conceptseg.models import load_model
    from conceptseg.refine import RefineConfig, run_refine

    manifest = json.loads((args.run / "manifest.json").read_text())["config"]
    samples = read_dataset(manifest["test_images"], manifest["test_split"])
    model = load_model(args.run / "finetune" / "model", device="cpu")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "_")
            t0 = time.perf_counter()
            run_refine(model if settings.get("inpainter") != "crop" else None, [s.image for s in samples], args.run / "prelim",
                       out, RefineConfig(batch_size=16, **settings), progress=False, resolution=model.resolution)
            seconds = time.perf_counter() - t0
            scores = evaluate_samples(out, samples)["summary"]
            results.append({"variant": name, "images_per_s": len(samples) / seconds, **{k: scores[k] for k in ("acc", "iou", "miou")}})
    print(f"\nstage 3 on {len(samples)} test images of {args.run}, CPU ({torch.get_num_threads()} threads)\n")
    print("| variant | ACC | IoU | mIoU | images/s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {100 * r['acc']:.1f} | {100 * r['iou']:.1f} | {100 * r['miou']:.1f} | {r['images_per_s']:.2f} |")
    path = args.json or Path(__file__).parent / "results" / "refine_variants-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": str(args.run), "images": len(samples), "results": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
