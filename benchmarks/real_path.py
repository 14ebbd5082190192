"""The real path end to end: `conceptseg run` with `configs/cub.yaml`'s settings, scaled down, on
datasets in CUB's and Stanford Cars' real layouts, with models of the published architectures.

What it builds (in a temporary folder, or `--work`):
- a CUB-200-2011 tree: `images/<class>/<name>.jpg` (non-square JPEGs of CUB's typical sizes),
  `images.txt`, `train_test_split.txt`, `bounding_boxes.txt`, soft grey `segmentations/*.png`;
- a Stanford Cars tree: `cars_train/00001.jpg` and `cars_test/00001.jpg` (the same file names in
  both splits), devkit `.mat` annotations with boxes;
- random-weight models: SD 1.5 (epsilon) and SD 2.1-768 (v-prediction) with `--preset sd`, or the
  `tiny` and `tiny-v` presets with `--preset tiny` (the CPU form, a few minutes).

Then `python -m conceptseg run` for each (model, dataset): every stage (stage 1 on train and test,
fine-tuning in bf16, refinement, M_crop, synthetic data, the four U-Nets in fp32, segmentation,
scoring), the fine-tune in bf16 autocast wherever the device supports it (CPU included). Per stage
it prints items/s, peak GPU memory and disk, and projects the wall time and disk of the full CUB
config (`configs/cub.yaml`: 11,788 images, 20,000 fine-tuning steps, 10,000 synthetic images,
4 x 12,000 segmenter steps) on this device from the measured rates. Rates include each stage's
fixed costs (model loading, first-call compilation), so at these small sizes the projection is an
upper bound. Results go to `benchmarks/results/real_path-<preset>-<device>.json`.

    python benchmarks/real_path.py --preset tiny --device cpu     # the CPU form, minutes
    python benchmarks/real_path.py --preset sd --device cuda      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
CUB_IMAGES, CUB_TRAIN, CUB_TEST = 11788, 5994, 5794
CUB_SIZES = [(500, 375), (500, 333), (375, 500), (500, 400), (333, 500), (500, 347)]  # typical CUB sizes
MODELS = {"tiny": {"sd15-like": "tiny", "sd21-768-like": "tiny-v"}, "sd": {"sd15": "sd15", "sd21-768": "sd21-768"}}
# scaled-down settings per preset: images (classes x per class, half of them test), steps of each trainer; the tiny
# form also shrinks the segmenter (the paper's 64..1024-channel U-Net is the sd form's)
SCALE = {
    "tiny": dict(classes=2, per_class=4, finetune_steps=4, segmenter_steps=4, synth=2, refine_steps=4, prelim_steps=4, batch=2,
                 segmenter_width=8, segmenter_input=64),
    "sd": dict(classes=2, per_class=8, finetune_steps=40, segmenter_steps=100, synth=8, refine_steps=50, prelim_steps=40, batch=4,
               segmenter_width=64, segmenter_input=128),
}


# ---------------------------------------------------------------- datasets in their real layouts

def _object_picture(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """A textured background with an ellipse 'object', and its soft mask (CUB's masks are soft)."""
    w, h = size
    image = Image.fromarray(rng.integers(40, 160, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    box = (int(w * rng.uniform(0.15, 0.35)), int(h * rng.uniform(0.15, 0.35)),
           int(w * rng.uniform(0.6, 0.85)), int(h * rng.uniform(0.6, 0.85)))
    ImageDraw.Draw(image).ellipse(box, fill=tuple(int(c) for c in rng.integers(150, 255, 3)))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, mask.filter(ImageFilter.GaussianBlur(2))


def write_cub(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines, split, boxes = [], [], []
    n = 0
    for c in range(classes):
        folder = f"{c + 1:03d}.Bird_{c + 1}"
        for i in range(per_class):
            n += 1
            rel = f"{folder}/Bird_{c + 1}_{i:04d}_{rng.integers(1e5, 1e6)}.jpg"
            image, mask = _object_picture(rng, CUB_SIZES[n % len(CUB_SIZES)])
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            (root / "segmentations" / folder).mkdir(parents=True, exist_ok=True)
            image.save(root / "images" / rel, quality=90)
            mask.save(root / "segmentations" / Path(rel).with_suffix(".png"))
            ys, xs = np.nonzero(np.asarray(mask) >= 128)
            lines.append(f"{n} {rel}")
            split.append(f"{n} {int(i % 2 == 0)}")  # every other image trains, as CUB's split roughly does
            boxes.append(f"{n} {xs.min()}.0 {ys.min()}.0 {xs.max() - xs.min() + 1}.0 {ys.max() - ys.min() + 1}.0")
    for name, rows in (("images.txt", lines), ("train_test_split.txt", split), ("bounding_boxes.txt", boxes)):
        (root / name).write_text("\n".join(rows) + "\n")
    return root


def write_cars(root: Path, per_split: int, seed: int = 1) -> Path:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    (root / "devkit").mkdir(parents=True)
    for part, annos_name in (("train", "cars_train_annos.mat"), ("test", "cars_test_annos_withlabels.mat")):
        (root / f"cars_{part}").mkdir()
        rows = []
        for i in range(per_split):
            name = f"{i + 1:05d}.jpg"  # the same names in both splits, as in the download
            image, mask = _object_picture(rng, CUB_SIZES[(i + 3) % len(CUB_SIZES)])
            image.save(root / f"cars_{part}" / name, quality=90)
            ys, xs = np.nonzero(np.asarray(mask) >= 128)
            rows.append((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()), 1, name))
        dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
        savemat(root / "devkit" / annos_name, {"annotations": np.array(rows, dtype=dtype)})
    return root


# ---------------------------------------------------------------- runs

def run_config(dataset: str, model_dir: Path, out: Path, scale: dict, device: str) -> dict:
    """configs/<dataset>.yaml with its settings scaled down (stage kinds and precisions unchanged)."""
    from conceptseg.pipeline import load_config

    cfg = load_config(ROOT / "configs" / f"{dataset}.yaml")
    data = yaml.safe_load((ROOT / "configs" / f"{dataset}.yaml").read_text())
    data.update(model=str(model_dir), out=str(out), device=device, dtype="bf16" if device != "cpu" else "fp32")
    data["images"] = data["test_images"] = f"{dataset if dataset == 'cub' else 'cars'}:{out.parent / 'data'}"
    data["prelim"] = {"steps": scale["prelim_steps"]}
    data["finetune"] = {**data.get("finetune", {}), "steps": scale["finetune_steps"], "batch_size": scale["batch"],
                        "checkpoint_every": max(1, scale["finetune_steps"] // 2), "mixed_precision": cfg.finetune.mixed_precision}
    data["refine"] = {"steps": scale["refine_steps"]}
    data["synth"] = {"num": scale["synth"], "steps": scale["refine_steps"]}
    data["segmenter"] = {**data.get("segmenter", {}), "steps": scale["segmenter_steps"], "batch_size": scale["batch"] * 2,
                         "width": scale["segmenter_width"], "input_size": scale["segmenter_input"],
                         "checkpoint_every": max(1, scale["segmenter_steps"] // 2), "mixed_precision": cfg.segmenter.mixed_precision}
    return data


def stage_items(data: dict, train: int, test: int, rows: list[str]) -> dict[str, int]:
    """What each stage of one run processes: images, or samples for the trainers."""
    items = {"prelim": train + test, "finetune": data["finetune"]["steps"] * data["finetune"]["batch_size"],
             "refine": train + test, "crop": test, "synth": data["synth"]["num"]}
    for row in rows:
        items[f"segmenter/{row}"] = data["segmenter"]["steps"] * data["segmenter"]["batch_size"]
        items[f"segment/{row}"] = test
    return items


def full_cub_items() -> dict[str, int]:
    from conceptseg.pipeline import load_config

    cfg = load_config(ROOT / "configs" / "cub.yaml")
    items = {"prelim": CUB_IMAGES, "finetune": cfg.finetune.steps * cfg.finetune.batch_size, "refine": CUB_IMAGES,
             "crop": CUB_TEST, "synth": cfg.synth.num}
    for row in ("unet_real", "unet_real_synth", "unet_prelim", "supervised"):
        items[f"segmenter/{row}"] = cfg.segmenter.steps * cfg.segmenter.batch_size
        items[f"segment/{row}"] = CUB_TEST
    return items


PER_ITEM_DISK = ("prelim", "refine", "crop", "synth")  # disk grows with the images; trainers keep a bounded number of checkpoints


def measure(dataset: str, model_name: str, preset: str, work: Path, scale: dict, device: str) -> dict:
    from conceptseg.models import save_model
    from conceptseg.modeling import build_components

    model_dir = work / "models" / model_name
    if not model_dir.exists():
        save_model(build_components(preset), model_dir)
    base = work / f"{dataset}-{model_name}"
    shutil.rmtree(base, ignore_errors=True)
    if dataset == "cub":
        write_cub(base / "data", scale["classes"], scale["per_class"])
    else:
        write_cars(base / "data", scale["per_class"])
    data = run_config(dataset, model_dir, base / "run", scale, device)
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "conceptseg", "run", str(config)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"conceptseg run failed for {dataset} / {model_name}:\n{done.stderr[-4000:]}")
    manifest = json.loads((base / "run" / "manifest.json").read_text())
    metrics = json.loads((base / "run" / "metrics.json").read_text())
    counts = manifest["counts"]["images"]
    rows = [k.split("/", 1)[1] for k in manifest["timings_s"] if k.startswith("segmenter/")]
    items = stage_items(data, counts["train"], counts["test"], rows)
    stages = {}
    for name, seconds in manifest["timings_s"].items():
        stages[name] = {"seconds": seconds, "items": items.get(name), "items_per_s": round(items[name] / seconds, 3) if items.get(name) else None,
                        "peak_cuda_mb": manifest.get("peak_cuda_mb", {}).get(name), "disk_mb": round(manifest["disk_bytes"].get(name, 0) / 2**20, 2)}
    return {"dataset": dataset, "model": model_name, "preset": preset, "wall_s": round(wall, 1), "stages": stages,
            "metrics": metrics, "images": counts}


def project(result: dict) -> dict:
    """The full CUB config's wall time and disk on this device, stage by stage, from one run's rates."""
    full, per_stage, seconds, disk = full_cub_items(), {}, 0.0, 0.0
    for name, items in full.items():
        stage = result["stages"].get(name) or result["stages"].get(name.replace("supervised", "unet_real"))
        if not stage or not stage["items_per_s"]:
            continue
        s = items / stage["items_per_s"]
        d = stage["disk_mb"] * (items / stage["items"] if name.split("/")[0] in PER_ITEM_DISK else 1)
        per_stage[name] = {"hours": round(s / 3600, 3), "disk_gb": round(d / 1024, 3)}
        seconds += s
        disk += d
    return {"stages": per_stage, "hours": round(seconds / 3600, 2), "disk_gb": round(disk / 1024, 2)}


def table(result: dict) -> str:
    lines = [f"### {result['dataset']} layout, {result['model']} ({result['images']['train']} train / {result['images']['test']} test images, "
             f"{result['wall_s']} s)", "", "| stage | items | s | items/s | peak GPU MB | disk MB |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in result["stages"].items():
        lines.append(f"| {name} | {s['items'] or '-'} | {s['seconds']} | {s['items_per_s'] or '-'} | {s['peak_cuda_mb'] or '-'} | {s['disk_mb']} |")
    rows = {k: v for k, v in result["metrics"].items() if isinstance(v, dict)}
    scores = ", ".join(f"{k} {100 * v.get('iou', v.get('box_iou', 0)):.1f}" for k, v in rows.items())
    return "\n".join(lines + ["", f"scores (random weights, so only a check that every row is produced): {scores}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(MODELS), default="tiny")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--datasets", nargs="+", default=["cub", "cars"], choices=["cub", "cars"])
    p.add_argument("--models", nargs="+", help="a subset of the preset's models (tiny: sd15-like sd21-768-like; sd: sd15 sd21-768)")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/real_path-<preset>-<device>.json")
    args = p.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix="real_path-"))
    scale = SCALE[args.preset]
    results = []
    try:
        models = {k: v for k, v in MODELS[args.preset].items() if not args.models or k in args.models}
        if not models:
            p.error(f"--models: none of {args.models} in preset {args.preset} ({sorted(MODELS[args.preset])})")
        for model_name, preset in models.items():
            for dataset in args.datasets:
                result = measure(dataset, model_name, preset, work, scale, device)
                if dataset == "cub":
                    result["projected_full_cub"] = project(result)
                results.append(result)
                print(table(result), flush=True)
                if "projected_full_cub" in result:
                    pr = result["projected_full_cub"]
                    caveat = "" if args.preset == "sd" else " (tiny models and a tiny segmenter: the arithmetic only, not a forecast)"
                    print(f"\nprojected full CUB config ({CUB_IMAGES} images) on {device}: {pr['hours']} h, {pr['disk_gb']} GB{caveat}\n",
                          flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    report = {"device": name, "torch": torch.__version__, "preset": args.preset, "scale": scale, "results": results}
    path = args.json or ROOT / "benchmarks" / "results" / f"real_path-{args.preset}-{'cuda' if device.startswith('cuda') else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
