#!/usr/bin/env python
"""Stages 2 and 3 per model family: fine-tuning samples/s and peak memory (full and LoRA), and
RePaint background inpainting images/s, for SDXL, SD 3.5 medium and FLUX.1-dev.

What is timed is the code `conceptseg finetune` and `conceptseg refine` run, on latents already
encoded (image loading and VAE encoding are not in the figure):

- **fine-tune step**: `finetune.trainable_parameters` (the whole denoiser, or LoRA rank
  `--lora-rank` on every to_q/to_k/to_v/to_out.0), `finetune.make_optimizer` (AdamW, fused on
  CUDA), the family's `objective.training_batch` (DDPM epsilon for SDXL; rectified-flow velocity
  with logit-normal (SD 3.5) or uniform (FLUX) timesteps), half of the rows with the background
  prompt and a background box as loss mask, `finetune.denoising_loss` under bf16 autocast,
  backward, optimiser step. Weights are fp32, as `finetune` loads them. `--gradient-checkpointing`
  as the option of that name. A configuration that does not fit is reported as "out of memory".
- **inpainting**: `inpaint.inpaint_background` with the family's sampler (DDIM for SDXL, the flow
  Euler solver for SD 3.5 and FLUX) at `--inpaint-steps` (the paper: 50), a central square to fill,
  `--inpaint-batch` images per call, in the benchmark dtype.

Models: `--preset full` builds the published architectures with random weights directly on the
device (see `modeling.presets.PRESETS`); `--preset tiny` the test-sized ones, so the script runs on
a CPU (those numbers only show that it works).

    python benchmarks/distill_families.py                                      # GPU: full sizes, 1024 px
    python benchmarks/distill_families.py --preset tiny --device cpu --threads 1
    python benchmarks/distill_families.py --device meta                        # no timing: the path at full size

`--device meta` builds the published architectures without memory and runs one training forward
and backward pass per family and method: it checks, without a GPU, that the fine-tuning path works
at the real sizes (LoRA targets, FLUX's packing at a 128 x 128 latent, the masked loss) and counts
the trainable parameters. The samplers' steps look values up by timestep, which the meta device
cannot, so inpainting is not run there.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prelim_speed import PeakMemory, device_name, gib, sync

from conceptseg.families import family_from_components
from conceptseg.families.base import select_rows
from conceptseg.finetune import FinetuneConfig, background_box_mask, denoising_loss, make_optimizer, trainable_parameters
from conceptseg.inpaint import BACKGROUND_PROMPT, inpaint_background
from conceptseg.modeling.presets import build_family_components
from conceptseg.models import resolve_dtype
from conceptseg.training import Precision

ROOT = Path(__file__).resolve().parent
PROMPT = "a photo of a bird"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["sdxl", "sd3.5", "flux"], choices=["sdxl", "sd3", "sd3.5", "flux", "flux2", "qwenimage"])
    p.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["full", "lora"])
    p.add_argument("--preset", default="full", choices=["full", "tiny"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch (default 2 on CUDA, 2 on CPU)")
    p.add_argument("--train-steps", type=int, default=None, help="timed fine-tuning steps (default 6 on CUDA, 2 on CPU)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--inpaint-steps", type=int, default=None, help="sampler steps (default 50 on CUDA, 4 on CPU)")
    p.add_argument("--inpaint-batch", type=int, default=None, help="images per inpainting call (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/distill_families-<preset>-<device>.json")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.batch_size = args.batch_size or 2
    args.train_steps = args.train_steps or (6 if gpu else 2)
    args.inpaint_steps = args.inpaint_steps or (50 if gpu else 4)
    args.inpaint_batch = args.inpaint_batch or (4 if gpu else 2)
    args.dtype = resolve_dtype(None, args.device) if args.device.type != "meta" else torch.float32  # bf16 on CUDA
    args.json = args.json or ROOT / "results" / f"distill_families-{args.preset}-{args.device.type}.json"
    return args


def _model(family: str, args, dtype: torch.dtype):
    parts = build_family_components(family, args.preset, seed=args.seed, device=args.device, dtype=dtype)
    return family_from_components(family, parts, args.device, dtype, source=f"{family} {args.preset} (random weights)")


def _loss_masks(model, n: int, rng: np.random.Generator) -> torch.Tensor:
    """Half the rows: the whole latent (concept prompt); half: a background box around a central object."""
    side = model.latent_resolution
    fg = np.zeros((side, side), bool)
    fg[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = True
    masks = [np.ones((side, side), bool) if i % 2 == 0 else background_box_mask(fg, rng) for i in range(n)]
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def bench_finetune(family: str, method: str, args) -> dict:
    """Timed optimiser steps of one method; "out of memory" where it does not fit."""
    model = _model(family, args, torch.float32)  # finetune trains fp32 weights under autocast
    cfg = FinetuneConfig("bird", [], Path("."), Path("."), method=method, lora_rank=args.lora_rank,
                         gradient_checkpointing=args.gradient_checkpointing, optimizer="adamw-fused")
    denoiser = model.denoiser
    params = trainable_parameters(denoiser, cfg)
    optimizer = make_optimizer(params, cfg, args.device)
    precision = Precision("bf16" if args.device.type == "cuda" else "no", args.device)
    objective, cond = model.objective, model.conditioning([PROMPT, BACKGROUND_PROMPT])
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    b, side = args.batch_size, model.latent_resolution
    latents = torch.randn(b, model.latent_channels, side, side, generator=gen).to(args.device)
    masks = _loss_masks(model, b, rng).to(args.device)
    rows = select_rows(cond, torch.arange(b) % 2)

    def step() -> float:
        batch = objective.training_batch(latents, gen)
        with precision.autocast():
            loss = denoising_loss(model, denoiser, batch, rows, masks).mean()
        loss.backward()  # bf16 autocast (no fp16 scaler): what Precision.backward does without accelerate
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    trainable = sum(p.numel() for p in params)
    if args.device.type == "meta":  # the path at full size, no numbers
        batch = objective.training_batch(latents, gen)
        denoising_loss(model, denoiser, batch, rows, masks).mean().backward()
        return {"family": family, "method": method, "trainable_parameters": trainable, "samples_per_s": None,
                "shapes_checked": True}
    try:
        step()  # warm-up: kernels, allocator, optimiser state
        sync(args.device)
        with PeakMemory(args.device) as mem:
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                loss = step()
            sync(args.device)
            wall = time.perf_counter() - t0
        result = {"samples_per_s": b * args.train_steps / wall, "seconds_per_step": wall / args.train_steps,
                  "peak_bytes": mem.peak, "loss": float(loss)}
    except torch.OutOfMemoryError:
        result = {"samples_per_s": None, "seconds_per_step": None, "peak_bytes": None, "loss": None, "out_of_memory": True}
    del model, denoiser, params, optimizer
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"family": family, "method": method, "trainable_parameters": trainable, **result}


def bench_inpaint(family: str, args) -> dict:
    model = _model(family, args, args.dtype)
    side = model.latent_resolution
    gen = torch.Generator().manual_seed(args.seed)
    z0 = torch.randn(args.inpaint_batch, model.latent_channels, side, side, generator=gen)
    region = torch.zeros(args.inpaint_batch, side, side)
    region[:, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
    inpaint_background(model, z0, region, steps=2, generator=gen)  # warm-up
    sync(args.device)
    with PeakMemory(args.device) as mem:
        t0 = time.perf_counter()
        inpaint_background(model, z0, region, steps=args.inpaint_steps, generator=gen)
        sync(args.device)
        wall = time.perf_counter() - t0
    del model
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"family": family, "images_per_s": args.inpaint_batch / wall, "seconds": wall, "peak_bytes": mem.peak}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device_name(args.device)} ({args.device}), preset {args.preset}", flush=True)
    finetunes, inpaints = [], []
    for family in args.families:
        for method in args.methods:
            finetunes.append(bench_finetune(family, method, args))
            r = finetunes[-1]
            said = "shapes checked (meta)" if r.get("shapes_checked") else f"{r['samples_per_s'] or 'out of memory'} samples/s"
            print(f"{family} {method}: {said}", flush=True)
        if args.device.type != "meta":
            inpaints.append(bench_inpaint(family, args))
            print(f"{family} inpainting: {inpaints[-1]['images_per_s']:.4g} images/s", flush=True)

    lines = ["| family | fine-tune | trainable params (M) | samples/s | s/step | peak mem (GiB) |", "|---|---|---:|---:|---:|---:|"]
    for r in finetunes:
        speed = (f"{r['samples_per_s']:.4g} | {r['seconds_per_step']:.4g} | {gib(r['peak_bytes']):.2f}" if r["samples_per_s"]
                 else "shapes checked (meta) | - | -" if r.get("shapes_checked") else "out of memory | - | -")
        lines.append(f"| {r['family']} | {r['method']} | {r['trainable_parameters'] / 1e6:.3g} | {speed} |")
    lines += [] if not inpaints else ["", f"| family | inpainting images/s ({args.inpaint_steps} steps, batch {args.inpaint_batch}) | peak mem (GiB) |",
              "|---|---:|---:|"]
    lines += [f"| {r['family']} | {r['images_per_s']:.4g} | {gib(r['peak_bytes']):.2f} |" for r in inpaints]
    table = "\n".join(lines)
    print("\n" + table)
    report = {
        "benchmark": "distill_families", "device": str(args.device), "device_name": device_name(args.device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, (Path, torch.device, torch.dtype)) else v) for k, v in vars(args).items()},
        "command": " ".join(["python", "benchmarks/distill_families.py", *(sys.argv[1:] if argv is None else argv)]),
        "finetune": finetunes, "inpaint": inpaints, "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
