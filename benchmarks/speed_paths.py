#!/usr/bin/env python
"""Every fast path against today's implementation, in one run: the speed ratio and the output difference.

* stage 1 (`prelim.attention_maps`, random latents, the prompt "a photo of a bird"):
  today = eager at the first `--batch-sizes` entry; the other batch sizes (a sweep); channels_last;
  `torch.compile` of the pass with the capture (`prelim.compiled_rows_maps`, static padded batches)
  in each `--compile-modes` mode, with channels_last where `--compile-channels-last`. First-call
  seconds (compilation) are reported apart from the steady state (best of `--repeats`). Maps are
  compared with today's (max abs difference); when the dtype is not fp32, the compiled path is
  also checked against eager in fp32 on one image.
* GMM threshold (`thresholding`): sklearn per map (today) against the torch EM per map on the CPU
  and batched on the device, on stage-1-sized maps and stage-3 difference maps (`--gmm-size`):
  synthetic ones shaped like the method's, or a run folder's real ones (`--maps-from RUN`, e.g.
  `conceptseg demo`'s). Threshold difference (relative to the map's range) and differing mask pixels.
* segmenter: `train-seg` and `segment` with data loading in the main process (today) against
  `--workers` DataLoader workers, on a generated toy world; samples/s, and whether weights / masks
  are equal.

    python benchmarks/speed_paths.py --threads 1      # CPU: tiny preset at its 32 px (see --help for the sizes)
    python benchmarks/speed_paths.py --device cuda    # GPU: sd15 preset, 512 px, bf16 (benchmarks/gpu_speed.sh)

Prints a Markdown table per part and writes JSON to benchmarks/results/speed_paths-<device>.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from prelim_speed import count_flops, device_name, matmul_peak, sync

from conceptseg.modeling import build_components
from conceptseg.models import from_components, resolve_dtype
from conceptseg.prelim import (
    attention_maps,
    compiled_rows_maps,
    image_noise,
    timestep_grid,
)
from conceptseg.thresholding import (
    binarize,
    binarize_maps,
    gmm_threshold,
    gmm_thresholds_torch,
)
from conceptseg.tokenizer import concept_token_positions

PROMPT, CONCEPT = "a photo of a bird", "bird"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--parts", nargs="+", default=["prelim", "gmm", "segmenter"], choices=["prelim", "gmm", "segmenter"])
    p.add_argument("--preset", default=None, help="model preset (default sd15 on CUDA, tiny on CPU)")
    p.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default: the preset's resolution: 512 for sd15, 32 for tiny)")
    p.add_argument("--images", type=int, default=None, help="stage-1 images (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--steps", type=int, default=40, help="T0")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="stage-1 batch sweep; the first is today's and the compiled runs' (default 40 80 160 on CUDA, 40 80 on CPU)")
    p.add_argument("--compile-modes", nargs="*", default=None,
                   help="torch.compile modes (default: default reduce-overhead on CUDA, default on CPU; none: skip)")
    p.add_argument("--compile-channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled runs in channels_last (default on CUDA)")
    p.add_argument("--compile-backend", default="inductor", help="aot_eager for a quick smoke run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gmm-maps", type=int, default=None, help="maps per kind (default 16 on CUDA, 8 on CPU)")
    p.add_argument("--gmm-size", type=int, default=None, help="side of the stage-3 difference maps (default 512 on CUDA, 128 on CPU)")
    p.add_argument("--gmm-map-side", type=int, default=None, help="side of the stage-1 maps (default 64 on CUDA, 32 on CPU)")
    p.add_argument("--maps-from", type=Path, default=None, help="a run folder: its prelim/attention/*.npy and refine difference maps")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--seg-steps", type=int, default=None, help="train-seg steps (default 100 on CUDA, 20 on CPU)")
    p.add_argument("--seg-width", type=int, default=None, help="segmenter width (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--seg-images", type=int, default=None, help="toy images for train-seg and segment (default 256 on CUDA, 48 on CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = a.device.type == "cuda"
    a.preset = a.preset or ("sd15" if gpu else "tiny")
    a.dtype = resolve_dtype(a.dtype or ("bf16" if gpu else "fp32"), a.device)
    a.images = a.images or (4 if gpu else 2)
    a.batch_sizes = a.batch_sizes or ([40, 80, 160] if gpu else [40, 80])
    a.compile_modes = (["default", "reduce-overhead"] if gpu else ["default"]) if a.compile_modes is None else a.compile_modes
    a.compile_channels_last = gpu if a.compile_channels_last is None else a.compile_channels_last
    a.gmm_maps = a.gmm_maps or (16 if gpu else 8)
    a.gmm_size = a.gmm_size or (512 if gpu else 128)
    a.gmm_map_side = a.gmm_map_side or (64 if gpu else 32)
    a.workers = a.workers or (8 if gpu else 2)
    a.seg_steps = a.seg_steps or (100 if gpu else 20)
    a.seg_width = a.seg_width or (64 if gpu else 16)
    a.seg_images = a.seg_images or (256 if gpu else 48)
    a.json = a.json or ROOT / "results" / f"speed_paths-{a.device.type}.json"
    return a


def timed(fn, device, repeats: int) -> tuple[object, float, list[float]]:
    """(result, first-call seconds, later calls' seconds): the first call includes any compilation."""
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, times[0], times[1:]


# ------------------------------------------------------------------------------------ stage 1


def bench_prelim(a, checkpoint) -> dict:
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):  # one entry per (mode, layout, dtype, batch) is expected
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    t0 = time.perf_counter()
    model = from_components(build_components(a.preset, seed=0), a.device, a.dtype, source=f"{a.preset} (random weights)")
    print(f"built {a.preset} in {time.perf_counter() - t0:.1f} s", flush=True)
    a.image_size = a.image_size or model.resolution
    lat = a.image_size // model.vae_scale_factor
    groups = concept_token_positions(model.tokenizer, PROMPT, [CONCEPT])
    cond = model.encode_prompts([PROMPT])
    ts = timestep_grid(a.steps)
    latents = torch.randn(a.images, 4, lat, lat, generator=torch.Generator().manual_seed(0)).to(a.device, a.dtype)
    noise = torch.stack([image_noise(0, f"bench-{i}", (len(ts), 4, lat, lat)) for i in range(a.images)])
    rows = a.images * len(ts)
    today_batch = a.batch_sizes[0]

    with torch.no_grad():  # FLOPs of one eager row (the compiled graph drops the layers after the last attn2: fewer)
        b = min(today_batch, rows)
        zt = torch.randn(b, 4, lat, lat, device=a.device, dtype=a.dtype)
        flops_row = count_flops(lambda: model.unet(zt, torch.full((b,), ts[0], device=a.device), cond.expand(b, -1, -1))) / b
    peak = matmul_peak(a.device, a.dtype, 8192 if a.device.type == "cuda" else 1024)

    def run(batch, forward=None, channels_last=False):
        pad = min(batch, rows) if forward is not None else None
        return lambda: attention_maps(model, latents, cond, groups, ts, noise, batch, forward=forward, pad_to=pad,
                                      channels_last=channels_last)

    variants = [(f"today (eager, batch {today_batch})", today_batch, None, False)]
    variants += [(f"eager, batch {b}", b, None, False) for b in a.batch_sizes[1:]]
    variants.append((f"eager channels_last, batch {today_batch}", today_batch, None, True))
    for mode in a.compile_modes:
        cl = a.compile_channels_last
        variants.append((f"compiled {mode}{' channels_last' if cl else ''}, batch {today_batch}", today_batch,
                         compiled_rows_maps(None if mode == "default" else mode, a.compile_backend), cl))

    results, reference = [], None
    for name, batch, forward, cl in variants:
        if cl:
            model.unet.to(memory_format=torch.channels_last)
        maps, first, later = timed(run(batch, forward, cl), a.device, a.repeats)
        if cl:
            model.unet.to(memory_format=torch.contiguous_format)
        reference = maps if reference is None else reference
        best = min(later)
        row = {"variant": name, "batch": batch, "first_call_s": round(first, 3), "best_s": round(best, 4),
               "rows_per_s": round(rows / best, 2), "images_per_s": round(a.images / best, 3),
               "pct_matmul_peak": round(100 * flops_row * rows / best / peak, 2),
               "max_abs_diff_to_today": float((maps - reference).abs().max()), "max_abs_map": float(reference.abs().max())}
        results.append(row)
        row["ratio_vs_today"] = round(results[0]["best_s"] / best, 3)
        print(f"  {name}: first call {first:.1f} s, best {best:.3f} s, {rows / best:.1f} rows/s, "
              f"max |diff| {row['max_abs_diff_to_today']:.2e}", flush=True)
        checkpoint({"variants": results})  # a run cut short keeps what it measured

    fp32 = None
    if a.dtype != torch.float32 and a.compile_modes:  # the compiled path against eager in fp32, one image
        import dataclasses

        for part in (model.unet, model.text_encoder):
            part.float()
        m32 = dataclasses.replace(model, dtype=torch.float32)
        c32 = m32.encode_prompts([PROMPT])
        b = min(today_batch, len(ts))
        eager = attention_maps(m32, latents[:1].float(), c32, groups, ts, noise[:1], b)
        comp = attention_maps(m32, latents[:1].float(), c32, groups, ts, noise[:1], b, pad_to=b,
                              forward=compiled_rows_maps(None, a.compile_backend))
        fp32 = {"rows": len(ts), "mode": "default", "max_abs_diff": float((comp - eager).abs().max()),
                "max_abs_map": float(eager.abs().max())}
        print(f"  fp32 check: compiled vs eager max |diff| {fp32['max_abs_diff']:.2e}", flush=True)
    return {"preset": a.preset, "dtype": str(a.dtype).removeprefix("torch."), "image_size": a.image_size, "latent": lat,
            "images": a.images, "steps": len(ts), "rows": rows, "flops_per_row_eager": flops_row,
            "matmul_peak_flops": peak, "compile_backend": a.compile_backend, "variants": results, "fp32_check": fp32}


# ------------------------------------------------------------------------------------ GMM


def synthetic_maps(n: int, side: int, kind: str, seed: int = 0) -> list[np.ndarray]:
    """Stage-1-like maps (a smooth blob over a skewed background) or stage-3-like difference maps (a
    region of large differences over small ones, means of 3 rounded channel differences)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.35)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        if kind == "attention":
            out.append((0.02 + 0.05 * blob + rng.gamma(2.0, 0.004, (side, side))).astype(np.float32))
        else:
            fg = blob > 0.5
            diff = np.where(fg[..., None], rng.normal(60, 25, (side, side, 3)), np.abs(rng.normal(0, 8, (side, side, 3))))
            out.append(np.clip(np.round(diff), 0, 255).mean(-1).astype(np.float32))
    return out


def real_maps(run: Path, n: int) -> dict[str, list[np.ndarray]]:
    from PIL import Image

    att = [np.load(p) for p in sorted(glob.glob(str(run / "prelim" / "attention" / "*.npy")))[:n]]
    diffs = []
    for p in sorted(glob.glob(str(run / "refine" / "background" / "*.png")))[:n]:
        image = next(iter(glob.glob(str(run / "data" / "images" / (Path(p).stem + ".*")))))
        x = np.asarray(Image.open(image).convert("RGB"), np.float32)
        diffs.append(np.abs(x - np.asarray(Image.open(p).convert("RGB"), np.float32)).mean(-1))
    return {"stage-1 maps": att, "stage-3 difference maps": diffs}


def bench_gmm(a, checkpoint) -> dict:
    if a.maps_from:
        sets = real_maps(a.maps_from, a.gmm_maps)
        source = f"real maps from {a.maps_from}"
    else:
        sets = {"stage-1 maps": synthetic_maps(a.gmm_maps, a.gmm_map_side, "attention"),
                "stage-3 difference maps": synthetic_maps(a.gmm_maps, a.gmm_size, "difference", seed=1)}
        source = "synthetic"
    results = []
    for kind, maps in sets.items():
        stack = np.stack(maps)
        t0 = time.perf_counter()
        ref = np.array([gmm_threshold(m) for m in maps])
        ref_masks = np.stack([binarize(m) for m in maps])
        sk = time.perf_counter() - t0
        variants = [("today: sklearn, per map (CPU)", sk, ref, ref_masks)]
        t0 = time.perf_counter()
        th = np.array([gmm_thresholds_torch(torch.from_numpy(m.ravel())[None]).item() for m in maps])
        masks = np.stack([binarize(m, method="torch") for m in maps])
        variants.append(("torch EM, per map (CPU)", time.perf_counter() - t0, th, masks))
        if a.device.type == "cuda":
            dev = torch.from_numpy(stack).to(a.device)
            binarize_maps(dev[:1], method="torch")  # CUDA context and kernels warm
            sync(a.device)
            t0 = time.perf_counter()
            th = gmm_thresholds_torch(dev.reshape(len(maps), -1)).cpu().numpy()
            masks = binarize_maps(dev, method="torch")
            sync(a.device)
            variants.append((f"torch EM, batched ({a.device.type})", time.perf_counter() - t0, th, masks))
        ranges = np.ptp(stack.reshape(len(maps), -1), axis=1)
        for name, seconds, th, masks in variants:
            # both fits run twice in each timing (the threshold, then binarize): halve for s/map
            results.append({"maps": kind, "side": int(stack.shape[-1]), "count": len(maps), "variant": name,
                            "s_per_map": round(seconds / 2 / len(maps), 5),
                            "max_rel_threshold_diff": float(np.max(np.abs(th - ref) / ranges)),
                            "differing_mask_pixels": int((masks != ref_masks).sum())})
        for r in results[-len(variants):]:
            r["ratio_vs_today"] = round(results[-len(variants)]["s_per_map"] / r["s_per_map"], 2)
            print(f"  {kind} {r['side']}px: {r['variant']}: {r['s_per_map'] * 1000:.1f} ms/map, x{r['ratio_vs_today']}, "
                  f"threshold diff {r['max_rel_threshold_diff']:.1e}, {r['differing_mask_pixels']} mask pixels differ", flush=True)
    return {"source": source, "variants": results}


# ------------------------------------------------------------------------------------ segmenter


def bench_segmenter(a, checkpoint) -> dict:
    from safetensors.torch import load_file

    from conceptseg.data.toyworld import ToyWorldConfig, generate
    from conceptseg.segmenter.predict import load_segmenter, run_segment
    from conceptseg.segmenter.train import TrainSegConfig, train_segmenter

    gpu = a.device.type == "cuda"
    size, batch = (128, 32) if gpu else (64, 8)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = generate(tmp / "toy", a.seg_images, seed=0, config=ToyWorldConfig(size=int(size * 1.25)), progress=False,
                        workers=a.workers)  # the rows do not depend on the worker count
        print(f"  toy world of {a.seg_images} images in {time.perf_counter() - t0:.1f} s", flush=True)
        train, weights = [], []
        for workers in (0, a.workers):
            cfg = TrainSegConfig(data=[str(data)], out=tmp / f"seg{workers}", steps=a.seg_steps, batch_size=batch,
                                 width=a.seg_width, input_size=size, checkpoint_every=a.seg_steps, progress=False,
                                 num_workers=workers)
            t0 = time.perf_counter()
            folder = train_segmenter(cfg)
            seconds = time.perf_counter() - t0
            weights.append(load_file(folder / "model.safetensors"))
            train.append({"variant": "today (main process)" if workers == 0 else f"{workers} workers", "workers": workers,
                          "seconds": round(seconds, 2), "samples_per_s": round(a.seg_steps * batch / seconds, 1)})
            print(f"  train-seg, {workers} workers: {seconds:.1f} s, {train[-1]['samples_per_s']} samples/s", flush=True)
        for r in train:
            r["ratio_vs_today"] = round(train[0]["seconds"] / r["seconds"], 3)
        same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        results["train_seg"] = {"steps": a.seg_steps, "batch": batch, "input_size": size, "width": a.seg_width,
                                "note": "seconds: the whole call, image reading included", "variants": train,
                                "weights_equal": same}
        seg = load_segmenter(folder, device=a.device)
        images = data / "images" if (data / "images").is_dir() else data
        masks, runs = [], []
        for workers in (0, a.workers):
            out = tmp / f"out{workers}"
            run_segment(seg, images, out, batch_size=16, progress=False, num_workers=workers)  # warm-up and outputs
            t0 = time.perf_counter()
            summary = run_segment(seg, images, tmp / f"again{workers}", batch_size=16, progress=False, num_workers=workers)
            seconds = time.perf_counter() - t0
            masks.append({p.name: p.read_bytes() for p in (out / "masks").glob("*.png")})
            runs.append({"variant": "today (main process)" if workers == 0 else f"{workers} workers", "workers": workers,
                         "seconds": round(seconds, 2), "images_per_s": round(summary["processed"] / seconds, 1)})
            print(f"  segment, {workers} workers: {runs[-1]['images_per_s']} images/s", flush=True)
        for r in runs:
            r["ratio_vs_today"] = round(runs[0]["seconds"] / r["seconds"], 3)
        results["segment"] = {"images": a.seg_images, "variants": runs, "masks_equal": masks[0] == masks[1]}
    return results


# ------------------------------------------------------------------------------------ report


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:g}"
    return str(v)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    print(f"device {device_name(a.device)} ({a.device}), torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    report = {"device": device_name(a.device), "device_type": a.device.type, "torch": torch.__version__,
              "python": platform.python_version(), "threads": torch.get_num_threads(),
              "command": " ".join(["python", "benchmarks/speed_paths.py", *(argv if argv is not None else sys.argv[1:])])}
    parts = {"prelim": bench_prelim, "gmm": bench_gmm, "segmenter": bench_segmenter}
    a.json.parent.mkdir(parents=True, exist_ok=True)

    def save(name=None, partial=None):
        if name is not None:
            report[name] = {**partial, "incomplete": True}
        a.json.write_text(json.dumps(report, indent=2) + "\n")

    for name in a.parts:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        report[name] = parts[name](a, lambda partial, name=name: save(name, partial))
        report[name]["part_seconds"] = round(time.perf_counter() - t0, 1)
        save()
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    save()

    if "prelim" in report:
        p = report["prelim"]
        print(f"\n### stage 1: {p['preset']}, {p['dtype']}, {p['image_size']} px, {p['images']} images x T0={p['steps']}\n")
        print(table(p["variants"], ["variant", "first_call_s", "best_s", "rows_per_s", "ratio_vs_today", "pct_matmul_peak",
                                    "max_abs_diff_to_today"]))
        if p["fp32_check"]:
            print(f"\nfp32: compiled vs eager max |diff| {p['fp32_check']['max_abs_diff']:.2e} "
                  f"(maps peak at {p['fp32_check']['max_abs_map']:.3g})")
    if "gmm" in report:
        print(f"\n### GMM threshold ({report['gmm']['source']})\n")
        print(table(report["gmm"]["variants"], ["maps", "side", "variant", "s_per_map", "ratio_vs_today",
                                                "max_rel_threshold_diff", "differing_mask_pixels"]))
    if "segmenter" in report:
        s = report["segmenter"]
        print(f"\n### train-seg ({s['train_seg']['steps']} steps x batch {s['train_seg']['batch']}, "
              f"weights equal: {s['train_seg']['weights_equal']})\n")
        print(table(s["train_seg"]["variants"], ["variant", "seconds", "samples_per_s", "ratio_vs_today"]))
        print(f"\n### segment ({s['segment']['images']} images, masks equal: {s['segment']['masks_equal']})\n")
        print(table(s["segment"]["variants"], ["variant", "seconds", "images_per_s", "ratio_vs_today"]))
    print(f"\n{report['total_seconds']} s in all; JSON: {a.json}")
    return report


if __name__ == "__main__":
    main()
