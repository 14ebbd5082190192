"""Stage-2 fine-tuning speed: samples/s and peak memory for full vs LoRA, with and without latent
caching and gradient checkpointing.

Each variant runs `conceptseg finetune` in its own process (so peak memory is its own) on the same
data: toy-world images with their true masks standing in for M_pre. Steady-state samples/s are
taken from the run's train_log.jsonl after `--warmup` steps; `wall_s` is the whole command,
latent-cache encoding included.

CPU (default): the embedded model's architecture ("toy" preset, random weights: speed does not
depend on the weights), 64x64. GPU: the SD v1.5 architecture at 512x512 (`--preset sd15`).

    python benchmarks/finetune_speed.py                      # CPU
    python benchmarks/finetune_speed.py --preset sd15 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

VARIANTS = {
    "full": [],
    "full + latent cache": ["--latent-cache", "2"],
    "full + grad. checkpointing": ["--gradient-checkpointing"],
    "lora": ["--method", "lora"],
    "lora + latent cache": ["--method", "lora", "--latent-cache", "2"],
}


def make_data(root: Path, preset: str, num: int) -> Path:
    from conceptseg.data.toyworld import render_scene
    from conceptseg.modeling import PRESETS, build_components
    from conceptseg.models import save_model

    size = PRESETS[preset].image_size
    save_model(build_components(preset), root / "model")
    (root / "images").mkdir()
    (root / "prelim" / "masks").mkdir(parents=True)
    for i in range(num):
        rng = np.random.default_rng(i)
        scene = render_scene(rng, ["fish"], size=min(size, 256))
        image = Image.fromarray(scene.image).resize((size, size), Image.Resampling.BICUBIC)
        mask = Image.fromarray(scene.mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
        image.save(root / "images" / f"{i:04d}.png")
        mask.save(root / "prelim" / "masks" / f"{i:04d}.png")
    return root


def run_variant(root: Path, name: str, extra: list[str], args) -> dict:
    out = root / "runs" / name.replace(" ", "_").replace(".", "").replace("+", "")
    cmd = [sys.executable, "-m", "conceptseg", "finetune", "--model", str(root / "model"), "--concept", "fish",
           "--images", str(root / "images"), "--prelim", str(root / "prelim"), "--out", str(out),
           "--steps", str(args.warmup + args.steps), "--batch-size", str(args.batch_size),
           "--checkpoint-every", str(10**9), "--mixed-precision", args.mixed_precision, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else dict(os.environ)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    end = rows[-1]
    t_a = next(r["time"] for r in steps if r["step"] == args.warmup)
    t_b = steps[-1]["time"]
    rate = args.batch_size * (steps[-1]["step"] - args.warmup) / (t_b - t_a)
    shutil.rmtree(out)  # an SD-sized run's final checkpoint is ~20 GB: keep one on disk at a time
    return {"variant": name, "samples_per_s": rate, "wall_s": wall, "peak_rss_mb": end["peak_rss_mb"],
            "peak_cuda_mb": end.get("peak_cuda_mb")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy", help="toy (CPU) or sd15 (GPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for each run (CPU)")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {args.threads or 'default'} threads)"
    with tempfile.TemporaryDirectory() as tmp:
        root = make_data(Path(tmp), args.preset, args.images)
        results = [run_variant(root, name, VARIANTS[name], args) for name in (args.only or VARIANTS)]
    base = results[0]["samples_per_s"]
    print(f"\nfine-tuning speed, preset {args.preset}, batch {args.batch_size}, {args.steps} timed steps, {device}\n")
    print("| variant | samples/s | vs first | wall s (incl. setup) | peak RSS MB | peak CUDA MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        cuda = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] else "-"
        print(f"| {r['variant']} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base:.2f}x | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {cuda} |")
    path = args.json or Path(__file__).parent / "results" / f"finetune_speed-{args.preset}-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, "torch": torch.__version__, "settings": vars(args) | {"json": str(path)},
                                "results": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
