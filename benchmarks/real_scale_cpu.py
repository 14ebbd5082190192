"""`conceptseg run` at Stable Diffusion 1.5's size on the CPU: every stage on a few images and steps,
with what the run must keep to checked on the way.

The model folder is SD 1.5 as the hub ships it, with random weights: `model_index.json` lists
`safety_checker` (a StableDiffusionSafetyChecker of the published size, CLIP ViT-L/14 vision tower)
and `feature_extractor` (CLIPImageProcessor), the scheduler is PNDM with SD 1.5's config. The one
change from the published configs is the UNet's and VAE's `sample_size`, set for `--image-size`
(a run takes its images at the model's resolution, so this is the image size; the weights keep
their shapes). The data is CUB's layout (`real_path.write_cub`): 4 train and 2 test images.

It records and checks:
- whether `load_model` builds the safety checker (it needs only vae, unet, text encoder, tokenizer
  and scheduler);
- per stage, the run process's peak resident memory (`manifest.json`'s `peak_rss_mb`, the
  high-water mark reset at each stage's start) beside `conceptseg plan`'s predicted peak device
  memory for the same config and folder. On the CPU the device is RAM, but the plan counts tensors
  only: the process adds the interpreter and libraries (`baseline_rss_mb`: a process that has
  imported them), a model's load (file pages of the weights read, once), and allocator slack. The
  stage-1 model stays resident into fine-tuning when both use its dtype, as `conceptseg run` hands
  it over;
- that at most `checkpoints_total_limit` checkpoints remain in the fine-tune's and each segmenter's
  folder;
- that a second `conceptseg run` rewrites nothing: every file's mtime and sha256 are compared; the
  run-level records every run writes (manifest.json, stages.json, metrics.json, report.html,
  grid_*.png) are listed apart.

Results go to `benchmarks/results/real_scale_cpu-<preset>-<size>.json`.

    python benchmarks/real_scale_cpu.py --preset sd15 --image-size 256   # the real-size check (hours)
    python benchmarks/real_scale_cpu.py --preset tiny --image-size 64    # the same checks in minutes
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_path import ROOT, SCALE, run_config, write_cub  # noqa: E402

# SD 1.5's scheduler/scheduler_config.json on the hub (clip_sample included, which PNDM itself does not take)
SD15_PNDM = dict(_class_name="PNDMScheduler", _diffusers_version="0.6.0", beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                 steps_offset=1, trained_betas=None, clip_sample=False)
# the safety checker's published CLIPConfig (CLIP ViT-L/14; the checker builds the vision tower only)
SAFETY_CHECKER = {
    "sd15": dict(projection_dim=768, text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12),
                 vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                    patch_size=14, image_size=224)),
    "tiny": dict(projection_dim=32, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    patch_size=14, image_size=224)),
}
# 4 train and 2 test images (every other image of a class trains), a few steps of everything
FEW = dict(classes=2, per_class=3, finetune_steps=2, segmenter_steps=4, synth=2, refine_steps=4, prelim_steps=4, batch=2)
RUN_RECORDS = ("manifest.json", "stages.json", "metrics.json", "report.html")  # run-level, written by every run


# ---------------------------------------------------------------- the folder as the hub ships it

def save_hub_form(preset: str, image_size: int, out: Path) -> Path:
    """A random-weight SD 1.x folder laid out as the hub's SD 1.5: safety checker, feature extractor, PNDM."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from conceptseg.models import COMPONENTS
    from conceptseg.modeling import build_components

    parts = build_components(preset, image_size=image_size)
    parts["scheduler"] = PNDMScheduler(**{k: v for k, v in SD15_PNDM.items() if not k.startswith("_") and k != "clip_sample"})
    checker = StableDiffusionSafetyChecker(CLIPConfig(**SAFETY_CHECKER["sd15" if preset == "sd15" else "tiny"])).eval()
    pipe = StableDiffusionPipeline(**{k: parts[k] for k in COMPONENTS}, safety_checker=checker,
                                   feature_extractor=CLIPImageProcessor(), requires_safety_checker=True)
    partial = out.with_name(out.name + ".partial")  # a killed build leaves no folder that looks complete
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    (partial / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_PNDM, indent=2) + "\n")  # the file verbatim
    # the hub's index: CLIPImageProcessor (transformers saves its PIL fallback's name without torchvision), no empty slots
    index = json.loads((partial / "model_index.json").read_text())
    index = {k: v for k, v in index.items() if v != [None, None]} | {"feature_extractor": ["transformers", "CLIPImageProcessor"]}
    (partial / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    partial.rename(out)
    return out


def loader_check(model_dir: Path) -> dict:
    """What `load_model` builds from the folder: whether it instantiates the safety checker."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from conceptseg.models import load_model

    built = []
    init = StableDiffusionSafetyChecker.__init__

    def counted(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)

    index = json.loads((model_dir / "model_index.json").read_text())
    with mock.patch.object(StableDiffusionSafetyChecker, "__init__", counted):
        model = load_model(model_dir, device="cpu", dtype="fp32")
    networks = sorted(model.networks())
    del model
    gc.collect()
    return {"model_index": {k: v for k, v in index.items() if not k.startswith("_")}, "networks_loaded": networks,
            "safety_checker_built": bool(built)}


# ---------------------------------------------------------------- the run and its checks

def scaled_config(model_dir: Path, base: Path, preset: str, limit: int, finetune_precision: str) -> dict:
    """configs/cub.yaml scaled down (`real_path.run_config`) to FEW, every fine-tuning step checkpointed."""
    segmenter = SCALE["tiny" if preset.startswith("tiny") else "sd"]  # the paper's U-Net for the SD-size form
    scale = {**FEW, "segmenter_width": segmenter["segmenter_width"], "segmenter_input": segmenter["segmenter_input"]}
    data = run_config("cub", model_dir, base / "run", scale, "cpu")
    data["prelim"]["batch_size"] = 2 * scale["prelim_steps"]  # two images a pass
    data["finetune"].update(checkpoint_every=1, checkpoints_total_limit=limit, mixed_precision=finetune_precision)
    data["synth"]["batch_size"] = scale["synth"]
    return data


def run(config: Path, sets: list[str], log: Path) -> float:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "conceptseg", "run", str(config)] + [a for kv in sets for a in ("--set", kv)]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"conceptseg run {config} failed; its output is in {log}:\n{log.read_text()[-4000:]}")
    return round(time.perf_counter() - t0, 1)


def baseline_rss_mb() -> float:
    """The resident memory of a process that has imported what `conceptseg run` imports, before any stage."""
    code = ("import torch, diffusers, transformers, conceptseg.pipeline, conceptseg.finetune, conceptseg.prelim, "
            "conceptseg.refine, conceptseg.synth, conceptseg.segmenter.train; from conceptseg.residency import peak_rss_mb; "
            "print(peak_rss_mb())")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**24), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    return {p.relative_to(run_dir).as_posix(): (p.stat().st_mtime_ns, _sha256(p)) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def rewritten(before: dict, after: dict) -> dict[str, list[str]]:
    """Files the second run changed (mtime or content), added or removed: outputs, and run-level records apart."""
    touched = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    record = lambda k: "/" not in k and (k in RUN_RECORDS or k.startswith("grid_"))  # noqa: E731
    return {"outputs": [k for k in touched if not record(k)], "run_records": [k for k in touched if record(k)]}


def checkpoints(run_dir: Path) -> dict[str, int]:
    """Checkpoint folders left in each trainer's folder."""
    trainers = [run_dir / "finetune"] + sorted((run_dir / "segmenter").iterdir())
    return {t.relative_to(run_dir).as_posix(): len(list((t / "checkpoints").glob("step-*"))) for t in trainers}


def plan_stage(name: str) -> str | None:
    """The stage of `conceptseg plan` that predicts a run stage (the crop baseline runs no model: none)."""
    kind = name.split("/")[0]
    return {"untuned": "refine", "crop": None, "segment": "evaluation"}.get(kind, kind)


def stages_beside_plan(manifest: dict, plan) -> dict:
    MiB = 2**20
    out = {}
    for name, seconds in manifest["timings_s"].items():
        p = plan.stages.get(plan_stage(name) or "")
        out[name] = {"seconds": seconds, "peak_rss_mb": manifest["peak_rss_mb"].get(name),
                     "plan_memory_mb": round(p.memory / MiB, 1) if p else None, "plan_peak_phase": p.peak_phase if p else None,
                     "disk_mb": round(manifest["disk_bytes"].get(name, 0) / MiB, 1),
                     # the plan's disk is per stage kind: beside the run stages that are one
                     "plan_disk_mb": round(p.disk_total / MiB, 1) if p and plan_stage(name) == name else None}
    return out


def measure(args, work: Path) -> dict:
    from conceptseg.pipeline import load_config
    from conceptseg.plan import plan_json, plan_run

    model_dir, built_s = work / "models" / f"{args.preset}-{args.image_size}-hub", None
    if not model_dir.exists():
        t0 = time.perf_counter()
        save_hub_form(args.preset, args.image_size, model_dir)
        built_s = round(time.perf_counter() - t0, 1)
        print(f"built {model_dir} in {built_s} s", flush=True)
    loader = loader_check(model_dir)
    base = work / f"cub-{args.preset}-{args.image_size}"
    shutil.rmtree(base, ignore_errors=True)
    write_cub(base / "data", FEW["classes"], FEW["per_class"])
    data = scaled_config(model_dir, base, args.preset, args.checkpoints_total_limit, args.finetune_precision)
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config, args.set)
    plan = plan_run(cfg)  # what `conceptseg plan CONFIG` prints, in bytes
    log = base / "run.log"
    wall = run(config, args.set, log)
    run_dir = base / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    kept = checkpoints(run_dir)
    before = snapshot(run_dir)
    wall_again = run(config, args.set, log)
    again = rewritten(before, snapshot(run_dir))
    manifest_again = json.loads((run_dir / "manifest.json").read_text())
    limits = {name: (cfg.finetune if name == "finetune" else cfg.segmenter).checkpoints_total_limit for name in kept}
    return {"preset": args.preset, "image_size": args.image_size, "set": args.set, "model": {**loader, "built_s": built_s}, "images": manifest["counts"]["images"],
            "finetune_mixed_precision": manifest["config"]["finetune"]["mixed_precision"], "wall_s": wall,
            "baseline_rss_mb": baseline_rss_mb(), "peak_rss_since": manifest.get("peak_rss_since"),
            "plan": plan_json(plan),
            "stages": stages_beside_plan(manifest, plan), "checkpoints_kept": kept, "checkpoints_total_limit": limits,
            "rerun": {"wall_s": wall_again, "rewritten": again, "timings_s": manifest_again["timings_s"],
                      "peak_rss_mb": manifest_again["peak_rss_mb"]},
            "metrics": json.loads((run_dir / "metrics.json").read_text())}


def check(result: dict) -> list[str]:
    """What the run must keep to; each broken promise as a sentence."""
    problems = [f"{name}: {n} checkpoints left, more than checkpoints_total_limit={result['checkpoints_total_limit'][name]}"
                for name, n in result["checkpoints_kept"].items()
                if result["checkpoints_total_limit"][name] is not None and n > result["checkpoints_total_limit"][name]]
    if result["rerun"]["rewritten"]["outputs"]:
        problems.append(f"the second run rewrote {result['rerun']['rewritten']['outputs']}")
    if result["model"]["safety_checker_built"]:
        problems.append("load_model built the safety checker")
    return problems


def table(result: dict) -> str:
    base = result["baseline_rss_mb"]
    lines = [f"### {result['preset']} at {result['image_size']} px on the CPU ({result['images']['train']} train / "
             f"{result['images']['test']} test images, fine-tune autocast {result['finetune_mixed_precision']}, {result['wall_s']} s)",
             "", f"peak RSS: this process, from each stage's start; plan: predicted tensors (RAM on the CPU). "
             f"A process with the libraries imported holds {base:.0f} MB.", "",
             "| stage | s | peak RSS MB | plan MB (peak phase) | RSS - imports - plan MB | disk MB | plan disk MB |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for name, s in result["stages"].items():
        plan = f"{s['plan_memory_mb']} ({s['plan_peak_phase']})" if s["plan_memory_mb"] is not None else "-"
        gap = round(s["peak_rss_mb"] - base - s["plan_memory_mb"]) if s["plan_memory_mb"] is not None and s["peak_rss_mb"] else "-"
        disk = "-" if s["plan_disk_mb"] is None else s["plan_disk_mb"]
        lines.append(f"| {name} | {s['seconds']} | {s['peak_rss_mb']} | {plan} | {gap} | {s['disk_mb']} | {disk} |")
    re = result["rerun"]
    lines += ["", f"checkpoints left: {result['checkpoints_kept']} (limits {result['checkpoints_total_limit']})",
              f"second run: {re['wall_s']} s, outputs rewritten: {re['rewritten']['outputs'] or 'none'}; "
              f"run-level records written again: {re['rewritten']['run_records']}",
              f"safety checker built by load_model: {result['model']['safety_checker_built']} "
              f"(loaded: {', '.join(result['model']['networks_loaded'])})"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["sd15", "tiny"], default="tiny")
    p.add_argument("--image-size", type=int, default=None, help="the folder's resolution (default: 256 for sd15, 64 for tiny)")
    p.add_argument("--finetune-precision", choices=["bf16", "no"], default="bf16", help="the fine-tune's autocast")
    p.add_argument("--checkpoints-total-limit", type=int, default=1, help="the fine-tune's (it checkpoints every step)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the run config, as `conceptseg run --set` takes it (repeatable; the plan sees it too)")
    p.add_argument("--work", type=Path, help="working folder, kept (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/real_scale_cpu-<preset>-<size>.json")
    args = p.parse_args()
    args.image_size = args.image_size or (256 if args.preset == "sd15" else 64)
    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="real_scale_cpu-"))
    try:
        result = measure(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["problems"] = check(result)
    print(table(result), flush=True)
    report = {"device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
              "threads": torch.get_num_threads(), "torch": torch.__version__, **result}
    path = args.json or ROOT / "benchmarks" / "results" / f"real_scale_cpu-{args.preset}-{args.image_size}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    if result["problems"]:
        sys.exit("\n".join(["broken:"] + result["problems"]))


if __name__ == "__main__":
    main()
