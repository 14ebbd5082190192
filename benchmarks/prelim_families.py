#!/usr/bin/env python
"""Stage-1 speed and peak memory per model family: SDXL, SD 3.5 medium and FLUX.1-dev.

What is timed is stage 1 end to end as `conceptseg prelim` runs it (`prelim.PrelimRunner`): VAE
encoding of the images on the family's canvas, T0 noised copies per image with the family's
noise levels (DDIM timesteps for SDXL; the default sampler's sigmas for SD 3.5 and FLUX), one
conditional forward pass per (image, level) row in batches of `--batch-size` rows, the capture of
the concept's attention (SDXL: every `attn2`; SD 3.5: every joint block's image-to-text
attention; FLUX: every double- and single-stream block), and the GMM threshold. The prompt is
encoded once per run, outside the timing.

Models: `--preset full` builds the published architectures (SDXL base; SD 3.5 medium with its
13 dual-attention blocks; FLUX.1-dev, 19 double + 38 single blocks) with random weights directly
on the device in the benchmark dtype, text encoders included (CLIP-L, OpenCLIP bigG, T5-XXL), at
their native 1024 px. `--preset tiny` builds the test-sized models (32/64 px) so the script runs on
a CPU; those numbers only show that the script works.

    python benchmarks/prelim_families.py                                  # GPU: full sizes, bf16, 1024 px
    python benchmarks/prelim_families.py --preset tiny --device cpu --threads 1
    python benchmarks/prelim_families.py --device meta                    # no timing: shapes at full size

`--device meta` builds the published architectures without memory and runs one forward pass of
two rows per family under the capture: it checks (without a GPU) that the capture path works at
the real sizes and reports parameters, captured layers, map grid, text tokens and noise levels.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prelim_speed import PeakMemory, device_name, gib, sync

from conceptseg.families import family_from_components
from conceptseg.modeling.presets import build_family_components
from conceptseg.models import resolve_dtype
from conceptseg.prelim import PrelimConfig, PrelimRunner

ROOT = Path(__file__).resolve().parent
CONCEPT = "bird"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["sdxl", "sd3.5", "flux"], choices=["sdxl", "sd3", "sd3.5", "flux", "flux2", "qwenimage"])
    p.add_argument("--preset", default="full", choices=["full", "tiny"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--images", type=int, default=None, help="images per family (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--steps", type=int, default=40, help="T0 noise levels per image (default 40)")
    p.add_argument("--batch-size", type=int, default=None, help="forward-pass rows (default 20 on CUDA, 8 on CPU)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per family; the fastest counts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None,
                   help="default benchmarks/results/prelim_families-<preset>-<device>.json")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.images = args.images or (4 if gpu else 2)
    args.batch_size = args.batch_size or (20 if gpu else 8)
    args.dtype = resolve_dtype(args.dtype, args.device) if args.device.type != "meta" else torch.float32
    args.json = args.json or ROOT / "results" / f"prelim_families-{args.preset}-{args.device.type}.json"
    return args


def images_for(model, count: int, seed: int) -> list[Image.Image]:
    """Random photos-sized images at the family's own canvas size (no resizing cost hides in them)."""
    rng = np.random.default_rng(seed)
    r = model.resolution
    return [Image.fromarray(rng.integers(0, 256, (r, r, 3), dtype=np.uint8)) for _ in range(count)]


def bench_family(family: str, args) -> dict:
    device, dtype = args.device, args.dtype
    start = time.perf_counter()
    parts = build_family_components(family, args.preset, seed=args.seed, device=device, dtype=dtype)
    model = family_from_components(family, parts, device, dtype, source=f"{family} {args.preset} (random weights)")
    sync(device)
    built = time.perf_counter() - start
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items() if isinstance(v, torch.nn.Module)}
    denoiser_params = params["unet" if model.family == "sdxl" else "transformer"]
    print(f"{family}: built in {built:.1f} s; {denoiser_params / 1e9:.2f} B "
          f"denoiser parameters; canvas {model.resolution} px, map grid {model.attention_resolution}", flush=True)
    cfg = PrelimConfig(CONCEPT, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    runner = PrelimRunner(model, cfg)
    images = images_for(model, args.images, args.seed)
    keys = [f"bench-{i}" for i in range(args.images)]

    # warm-up: one image at two noise levels (kernels, allocator)
    PrelimRunner(model, PrelimConfig(CONCEPT, steps=2, batch_size=2, seed=args.seed))(images[:1], keys[:1])
    sync(device)
    runs, peak = [], (0, 0)
    for rep in range(args.repeats):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            results = runner(images, keys)
            sync(device)
            wall = time.perf_counter() - t0
        runs.append(wall)
        peak = max(peak, (mem.delta, mem.peak))
        print(f"  run {rep + 1}/{args.repeats}: {wall:.2f} s", flush=True)
    best = min(runs)
    rows = args.images * len(runner.timesteps)
    return {
        "family": family, "label": model.label, "denoiser_parameters": denoiser_params,
        "parameters": params, "canvas_px": model.resolution, "map_grid": model.attention_resolution,
        "captured_layers": _captured_layers(model, runner), "text_tokens": _text_tokens(runner), "noise_levels": runner.timesteps,
        "token_groups": runner.token_groups, "seconds": best, "runs": runs, "images_per_s": args.images / best,
        "rows_per_s": rows / best, "peak_bytes": peak[0], "peak_abs_bytes": peak[1], "build_seconds": built,
        "foreground_fraction": [float(r.mask.mean()) for r in results],
    }


def _text_tokens(runner) -> int:
    cond = runner.cond
    return int((cond if isinstance(cond, torch.Tensor) else cond.prompt_embeds).shape[1])


def _captured_layers(model, runner) -> int:
    """How many layers add a map in one forward pass (one row at the smallest noise level)."""
    lat = model.latent_resolution
    z = torch.zeros(1, model.latent_channels, lat, lat, device=model.device, dtype=model.dtype)
    level = torch.tensor(runner.timesteps[:1], device=model.device)
    with torch.no_grad(), model.capture_attention(runner.token_groups) as store:
        model.denoise(z, level, runner.cond)
        return store.num_layers


def shapes_on_meta(family: str, args) -> dict:
    """One forward pass of two rows under the capture on the meta device: shapes, no numbers."""
    parts = build_family_components(family, args.preset, seed=args.seed, device="meta")
    model = family_from_components(family, parts, "meta", torch.float32, source=f"{family} {args.preset} (meta)")
    runner = PrelimRunner(model, PrelimConfig(CONCEPT, steps=args.steps))
    lat = model.latent_resolution
    z = torch.zeros(2, model.latent_channels, lat, lat, device="meta")
    levels = torch.tensor(runner.timesteps[-2:], device="meta")
    with torch.no_grad(), model.capture_attention(runner.token_groups) as store:
        model.denoise(model.add_noise(z, torch.zeros_like(z), levels), levels, runner.cond)
        layers, maps = store.num_layers, store.pop_mean()
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items() if isinstance(v, torch.nn.Module)}
    return {"family": family, "label": model.label, "parameters": params, "canvas_px": model.resolution,
            "latent": lat, "map_grid": model.attention_resolution, "map_shape": list(maps.shape),
            "captured_layers": layers, "text_tokens": _text_tokens(runner), "token_groups": runner.token_groups,
            "noise_levels": runner.timesteps}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.type == "meta":
        results = [shapes_on_meta(family, args) for family in args.families]
        for r in results:
            print(f"{r['family']}: {r['captured_layers']} layers captured, maps {r['map_shape']}, "
                  f"{r['text_tokens']} text tokens, concept at {r['token_groups']}", flush=True)
        report = {"benchmark": "prelim_families", "device": "meta", "settings": {"preset": args.preset, "steps": args.steps},
                  "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
        return report
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, args.dtype
    print(f"device {device_name(device)} ({device}), dtype {str(dtype).removeprefix('torch.')}, preset {args.preset}, "
          f"{args.images} images x T0={args.steps}, batch {args.batch_size}", flush=True)
    results = []
    for family in args.families:
        results.append(bench_family(family, args))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    head = "| family | canvas px | map grid | captured layers | text tokens | images/s | rows/s | peak mem (GiB) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['family']} | {r['canvas_px']} | {r['map_grid']}x{r['map_grid']} | {r['captured_layers']} | "
                     f"{r['text_tokens']} | {r['images_per_s']:.4g} | {r['rows_per_s']:.4g} | {gib(r['peak_bytes']):.3f} |")
    table = "\n".join(lines)
    print()
    print(table)
    report = {
        "benchmark": "prelim_families",
        "device": str(device),
        "device_name": device_name(device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "settings": {"preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "images": args.images,
                     "steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
                     "threads": torch.get_num_threads(), "seed": args.seed, "concept": CONCEPT,
                     "command": " ".join(["python", "benchmarks/prelim_families.py", *(sys.argv[1:] if argv is None else argv)])},
        "memory_method": PeakMemory(device).method,
        "timing_method": "wall clock of PrelimRunner on all images (VAE encode, T0 rows, capture, GMM), fastest of "
                         "`repeats` runs after a warm-up; the prompt encoding is outside",
        "results": results,
        "markdown": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
