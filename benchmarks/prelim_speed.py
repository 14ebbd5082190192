#!/usr/bin/env python
"""Stage-1 speed: `conceptseg.prelim.attention_maps` against a naive reference implementation.

Both variants compute the same thing (prelim.py's module docstring): for each image and each of
the T0 timesteps, one conditional UNet pass on z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and
the concept token's head-averaged cross-attention, nearest-upsampled to the latent grid and
averaged over every `attn2` layer and every timestep.

* ours  -- `attention_maps`: capture processor on attn2 only (token columns reduced inside the
           layer), self-attention keeps the model's fused SDPA processor, the (image, timestep)
           rows of all images share UNet batches of `--batch-size` rows.
* naive -- what the paper's reference code does: one timestep per forward pass, batch 1,
           diffusers' non-fused `AttnProcessor` (explicit probabilities) on every attn1 layer and
           a processor on every attn2 layer that materialises the full softmax(QK^T/sqrt(d))
           probabilities and keeps the whole (B, heads, N, 77) tensor of every layer in a list;
           after each forward pass the token column is taken, head-averaged, upsampled and averaged.

Model: the `sd15` preset (Stable Diffusion v1.5's UNet / CLIP-L-sized text encoder, random
weights). Latents are random (N, 4, image_size/8, image_size/8) tensors (the UNet is
size-agnostic); noise per (image, t) comes from `conceptseg.prelim.image_noise`, shared by both.
Each variant is warmed up with one UNet pass, then timed `--repeats` times, alternating naive and
ours so both see the same load on a shared machine; the fastest wall time counts. On CPU the
process CPU time is reported too (it does not depend on what else runs on the machine).

    python benchmarks/prelim_speed.py --threads 1            # CPU: 128 px, 2 images, batch 8
    python benchmarks/prelim_speed.py --device cuda          # GPU: 512 px, 4 images, batch 40, bf16
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import diffusers
from diffusers.models.attention_processor import AttnProcessor

from conceptseg.attention import capture_cross_attention
from conceptseg.modeling import build_components
from conceptseg.models import from_components, resolve_dtype
from conceptseg.prelim import attention_maps, image_noise, timestep_grid
from conceptseg.tokenizer import concept_token_positions

PROMPT = "a photo of a bird"
CONCEPT = "bird"
ROOT = Path(__file__).resolve().parent

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is optional
    psutil = None


# --------------------------------------------------------------------------------------------
# naive reference
# --------------------------------------------------------------------------------------------


class NaiveCrossAttnProcessor:
    """diffusers' `AttnProcessor` (explicit probabilities via `attn.get_attention_scores`) that also
    appends the full (B, heads, N, 77) probability tensor of its layer to a shared list."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        b, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, b)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, N, 77)
        self.store.append(probs.view(b, attn.heads, probs.shape[1], probs.shape[2]))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def naive_layer_mean(store: list, token_groups, latent_hw) -> torch.Tensor:
    """(B, G, h, w) float32: the stored layers' token columns, head-averaged, upsampled, averaged."""
    total = None
    for probs in store:
        probs = probs.float()
        b, _, n, _ = probs.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} attention queries are not a square grid")
        maps = torch.stack([probs[..., g].mean(-1).mean(1) for g in token_groups], dim=1)  # (B, G, N)
        maps = F.interpolate(maps.view(b, len(token_groups), side, side), size=latent_hw, mode="nearest")
        total = maps if total is None else total + maps
    if total is None:
        raise RuntimeError("no cross-attention layer ran")
    return total / len(store)


def set_naive_processors(unet, store: list) -> None:
    naive = NaiveCrossAttnProcessor(store)
    unet.set_attn_processor({name: naive if name.endswith("attn2.processor") else AttnProcessor()
                             for name in unet.attn_processors})


@torch.no_grad()
def naive_attention_maps(model, latents, cond, token_groups, timesteps, noise, store: list, limit: int | None = None) -> torch.Tensor:
    """Reference loop; processors must already be set with `set_naive_processors(unet, store)`.
    `limit` stops after that many forward passes (warm-up)."""
    n, t_count = latents.shape[0], len(timesteps)
    hw = tuple(latents.shape[-2:])
    abar = model.alphas_cumprod.to(latents.device, torch.float32)
    total = torch.zeros(n, len(token_groups), *hw, device=latents.device)
    passes = 0
    for i in range(n):
        for j, step in enumerate(timesteps):
            if limit is not None and passes >= limit:
                return total
            t = torch.tensor([step], device=latents.device)
            a = abar[t].view(-1, 1, 1, 1)
            eps = noise[i : i + 1, j].to(latents.device, torch.float32)
            zt = a.sqrt() * latents[i : i + 1].float() + (1 - a).sqrt() * eps
            store.clear()
            model.unet(zt.to(model.dtype), t, cond).sample
            total[i] += naive_layer_mean(store, token_groups, hw)[0]
            store.clear()
            passes += 1
    return total / t_count


# --------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc) so the RSS baseline of the next phase is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    """Peak memory of a block above the level at its start."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated() minus memory_allocated() at the start"
        elif psutil is not None:
            self.method = (f"psutil RSS sampled every {interval * 1000:g} ms in a background thread, "
                           "peak minus RSS at the start (after malloc_trim)")
        else:
            self.method = ("resource.getrusage ru_maxrss (process high-water mark; cannot be reset, so the delta "
                           "is against the previous high-water mark and reads 0 if an earlier phase peaked higher)")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            malloc_trim()
            if psutil is not None:
                proc = psutil.Process()
                self.base = self._peak = proc.memory_info().rss
                self._stop = threading.Event()

                def sample():
                    while not self._stop.wait(self.interval):
                        self._peak = max(self._peak, proc.memory_info().rss)

                self._thread = threading.Thread(target=sample, daemon=True)
                self._thread.start()
            else:
                self.base = _maxrss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif psutil is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak, psutil.Process().memory_info().rss)
        else:
            self.peak = _maxrss_bytes()
        self.delta = max(0, self.peak - self.base)
        return False


def count_flops(fn) -> int:
    """Matmul/conv/attention FLOPs of `fn()` (FlopCounterMode; CPU fused SDPA added by hand)."""
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):
        b, h, sq, d = q
        return 2 * b * h * sq * k[-2] * d + 2 * b * h * sq * k[-2] * v[-1]

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # not in torch's own registry
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n @ n x n matmul, after two warm-up runs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    inner = 10 if device.type == "cuda" else 1
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gib(x: float) -> float:
    return x / 2**30


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--image-size", type=int, default=None, help="pixels; latents are size/8 (default 512 on CUDA, 128 on CPU)")
    p.add_argument("--steps", type=int, default=40, help="T0, timesteps per image (default 40)")
    p.add_argument("--images", type=int, default=None, help="images (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="UNet rows per pass for ours (default 40 on CUDA, 8 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--check-steps", type=int, default=4,
                   help="when dtype is not fp32: timesteps of the extra fp32 equality check on 1 image (0 = skip)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per variant, alternating naive/ours; the fastest (wall) counts (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/prelim_speed-<device>.json")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.image_size = args.image_size or (512 if gpu else 128)
    args.images = args.images or (4 if gpu else 2)
    args.batch_size = args.batch_size or (40 if gpu else 8)
    args.dtype = resolve_dtype(args.dtype, args.device)
    args.json = args.json or ROOT / "results" / f"prelim_speed-{args.device.type}.json"
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.image_size % 8:
        p.error("--image-size must be a multiple of 8")
    return args


def compare_fp32(model, args, groups) -> dict:
    """Both variants in fp32 on one image and `--check-steps` timesteps (for non-fp32 benchmarks)."""
    for part in (model.unet, model.text_encoder):
        part.float()
    model32 = dataclasses.replace(model, dtype=torch.float32)
    cond = model32.encode_prompts([PROMPT])
    steps = timestep_grid(args.check_steps)
    lat = args.image_size // 8
    latents = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(args.seed + 1)).to(args.device)
    noise = image_noise(args.seed, "check", (len(steps), 4, lat, lat))[None]
    store: list = []
    original = dict(model.unet.attn_processors)
    set_naive_processors(model.unet, store)
    naive = naive_attention_maps(model32, latents, cond, groups, steps, noise, store)
    model.unet.set_attn_processor(dict(original))
    ours = attention_maps(model32, latents, cond, groups, steps, noise, args.batch_size)
    return {"images": 1, "steps": len(steps), "max_abs_diff": float((ours - naive).abs().max()),
            "max_abs_map": float(naive.abs().max())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(args.threads)
        except RuntimeError:
            pass
    device, dtype = args.device, args.dtype
    lat = args.image_size // 8
    timesteps = timestep_grid(args.steps)
    rows = args.images * len(timesteps)
    print(f"device {device_name(device)} ({device}), dtype {str(dtype).removeprefix('torch.')}, "
          f"torch threads {torch.get_num_threads()}, {args.images} images x T0={len(timesteps)} at "
          f"{args.image_size} px (latents {lat}x{lat}), batch {args.batch_size}", flush=True)

    start = time.perf_counter()
    model = from_components(build_components("sd15", seed=args.seed), device, dtype, source="sd15 (random weights)")
    print(f"built sd15 in {time.perf_counter() - start:.1f} s", flush=True)
    fused = sorted({type(p).__name__ for n, p in model.unet.attn_processors.items() if not n.endswith("attn2.processor")})
    groups = concept_token_positions(model.tokenizer, PROMPT, [CONCEPT])
    cond = model.encode_prompts([PROMPT])
    latents = torch.randn(args.images, 4, lat, lat, generator=torch.Generator().manual_seed(args.seed)).to(device, dtype)
    noise = torch.stack([image_noise(args.seed, f"bench-{i}", (len(timesteps), 4, lat, lat)) for i in range(args.images)])

    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 2048)
    print(f"matmul peak ({8192 if device.type == 'cuda' else 2048}^2, {str(dtype).removeprefix('torch.')}): "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)

    original = dict(model.unet.attn_processors)
    store: list = []

    def naive():
        set_naive_processors(model.unet, store)
        try:
            return naive_attention_maps(model, latents, cond, groups, timesteps, noise, store)
        finally:
            store.clear()
            model.unet.set_attn_processor(dict(original))

    def ours():
        return attention_maps(model, latents, cond, groups, timesteps, noise, args.batch_size)

    # warm-up: one UNet pass of each variant at its batch size
    set_naive_processors(model.unet, store)
    naive_attention_maps(model, latents, cond, groups, timesteps, noise, store, limit=1)
    store.clear()
    model.unet.set_attn_processor(dict(original))
    attention_maps(model, latents[:1], cond, groups, timesteps[: args.batch_size], noise[:1, : args.batch_size], args.batch_size)
    sync(device)

    # timed runs, alternating so that both variants see the same load on a shared machine
    variants = {"naive": naive, "ours": ours}
    runs = {name: [] for name in variants}
    maps, peaks = {}, {name: (0, 0) for name in variants}
    for rep in range(args.repeats):
        for name, fn in variants.items():
            with PeakMemory(device) as mem:
                cpu0, t0 = time.process_time(), time.perf_counter()
                maps[name] = fn()
                sync(device)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            runs[name].append({"seconds": wall, "cpu_seconds": cpu})
            peaks[name] = max(peaks[name], (mem.delta, mem.peak))
            print(f"{name} run {rep + 1}/{args.repeats}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

    # FLOPs of one forward pass of each variant (not timed)
    with torch.no_grad():
        zt = torch.randn(1, 4, lat, lat, device=device, dtype=dtype)
        set_naive_processors(model.unet, store)
        flops_naive = count_flops(lambda: model.unet(zt, torch.tensor([timesteps[0]], device=device), cond).sample)
        store.clear()
        model.unet.set_attn_processor(dict(original))
        b = min(args.batch_size, rows)
        zt = torch.randn(b, 4, lat, lat, device=device, dtype=dtype)
        with capture_cross_attention(model.unet, groups, (lat, lat)):
            flops_ours = count_flops(lambda: model.unet(zt, torch.full((b,), timesteps[0], device=device),
                                                        cond.expand(b, -1, -1)).sample)

    results = {}
    for name, flops_row, passes, batch in (("naive", flops_naive, rows, 1),
                                           ("ours", flops_ours / b, math.ceil(rows / args.batch_size), args.batch_size)):
        best = min(runs[name], key=lambda r: r["seconds"])
        results[name] = dict(seconds=best["seconds"], cpu_seconds=best["cpu_seconds"],
                             min_cpu_seconds=min(r["cpu_seconds"] for r in runs[name]), runs=runs[name],
                             passes=passes, batch=batch, flops_per_row=flops_row,
                             peak_bytes=peaks[name][0], peak_abs_bytes=peaks[name][1])

    for r in results.values():
        r["images_per_s"] = args.images / r["seconds"]
        r["rows_per_s"] = rows / r["seconds"]
        r["flops_per_s"] = r["flops_per_row"] * rows / r["seconds"]
        r["fraction_of_peak"] = r["flops_per_s"] / peak
    speedup = results["naive"]["seconds"] / results["ours"]["seconds"]
    speedup_cpu = results["naive"]["min_cpu_seconds"] / results["ours"]["min_cpu_seconds"]
    diff = float((maps["ours"] - maps["naive"]).abs().max())
    max_map = float(maps["naive"].abs().max())
    check = {"dtype": str(dtype).removeprefix("torch."), "images": args.images, "steps": len(timesteps),
             "max_abs_diff": diff, "max_abs_map": max_map}
    check32 = check if dtype == torch.float32 else None
    if dtype != torch.float32 and args.check_steps > 0:
        print(f"fp32 equality check: 1 image, {args.check_steps} steps", flush=True)
        check32 = {"dtype": "float32", **compare_fp32(model, args, groups)}

    # ---- report --------------------------------------------------------------------------
    on_cpu = device.type == "cpu"
    head = "| variant | images/s | UNet rows/s | passes x batch | peak mem (GiB) | GFLOP/row | achieved GFLOP/s | % of matmul peak |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if on_cpu:  # CPU time does not depend on what else runs on a shared machine
        head += " CPU s/row | % of peak by CPU time |"
        rule += "---:|---:|"
    lines = [head, rule]
    for name, r in results.items():
        r["cpu_fraction_of_peak"] = r["flops_per_row"] * rows / r["min_cpu_seconds"] / peak
        line = (f"| {name} | {r['images_per_s']:.4g} | {r['rows_per_s']:.4g} | {r['passes']} x {r['batch']} | "
                f"{gib(r['peak_bytes']):.3f} | {r['flops_per_row'] / 1e9:.2f} | {r['flops_per_s'] / 1e9:.1f} | "
                f"{100 * r['fraction_of_peak']:.1f} |")
        if on_cpu:
            line += f" {r['min_cpu_seconds'] / rows:.3f} | {100 * r['cpu_fraction_of_peak']:.1f} |"
        lines.append(line)
    table = "\n".join(lines)
    print()
    print(table)
    print()
    print(f"speed-up ours/naive: {speedup:.2f}x (wall, best of {args.repeats})"
          + (f", {speedup_cpu:.2f}x (process CPU time)" if on_cpu else ""))
    print(f"max |ours - naive| ({check['dtype']}, {args.images} images x {len(timesteps)} steps): {diff:.3g} "
          f"(max map value {max_map:.3g})")
    if check32 is not check and check32 is not None:
        print(f"max |ours - naive| (float32, {check32['images']} image x {check32['steps']} steps): "
              f"{check32['max_abs_diff']:.3g} (max map value {check32['max_abs_map']:.3g})")
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s; peak memory: {PeakMemory(device).method}")

    report = {
        "benchmark": "prelim_speed",
        "device": str(device),
        "device_name": device_name(device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "settings": {"model": "sd15 (random weights)", "dtype": str(dtype).removeprefix("torch."),
                     "image_size": args.image_size, "latent_size": lat, "steps": len(timesteps), "images": args.images,
                     "batch_size": args.batch_size, "threads": torch.get_num_threads(), "prompt": PROMPT,
                     "token_groups": groups, "seed": args.seed, "self_attention_processor_ours": fused,
                     "repeats": args.repeats, "check_steps": args.check_steps,
                     "command": " ".join(["python", "benchmarks/prelim_speed.py", *(sys.argv[1:] if argv is None else argv)])},
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_size": 8192 if device.type == "cuda" else 2048,
        "memory_method": PeakMemory(device).method,
        "flop_method": "torch.utils.flop_counter.FlopCounterMode on one forward pass (matmul, conv, attention; "
                       "CPU fused SDPA counted by hand), times the rows",
        "timing_method": "wall clock of the fastest of `repeats` alternating runs per variant (CUDA synchronised); "
                         "cpu_seconds = time.process_time() of that run; min_cpu_seconds over all runs",
        "results": results,
        "speedup_ours_over_naive": speedup,
        "speedup_ours_over_naive_cpu_time": speedup_cpu if on_cpu else None,
        "max_abs_diff": check,
        "max_abs_diff_fp32": check32,
        "markdown": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
