"""The paper's Table 2 on the toy world as mean and standard deviation over seeds, and concept vs saliency.

For every toy-world seed (the images: train split D, held-out test split) the demo's pipeline runs
once up to stage 4; for every segmenter seed the four U-Nets (stage 5) are retrained and scored
(stage 6). Each (world, segmenter seed) pair is its own run folder, OUT/world<W>-seg<S>; the folders
of segmenter seeds after the first start as copies of the first's stages 1-4, which the pipeline's
fingerprints then skip, so only the segmenters are redone. A finished folder is not rerun.

Beside Table 2, every U-Net is applied to held-out toy scenes holding the concept AND another
object (fresh scenes per world seed), and scored against the concept's mask alone ("concept") and
against the union of both objects ("all objects"); "other object marked" is the fraction of the
other object's pixels predicted as foreground. A segmenter of the concept scores high on the first
and marks little of the other object; a saliency detector scores high on the second.

    python benchmarks/table2.py --threads 1                              # demo's reduced settings, CPU
    python benchmarks/table2.py --full --device cuda --json benchmarks/results/table2-full-cuda.json

Writes JSON (every run's rows, precision / recall of M_pre and M, timings, the aggregates) to
`--json` (default benchmarks/results/table2-<reduced|full>-<device>.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np

SHARED_STAGES = ("data", "prelim", "finetune", "refine", "crop", "untuned", "synth")  # what segmenter seeds share
SCENE_SEED_TAG = 31  # scene k of world W is drawn from default_rng([W, 31, k]): never a toy-world row


# ---------------------------------------------------------------- scoring helpers

def pooled_counts(pred_dir: Path, samples, protocol: str, size: int):
    """Pooled confusion counts of pred_dir's masks against the samples' truth, by the run's protocol
    (a missing prediction counts as empty, as in `evaluate_samples`)."""
    from conceptseg.data.readers import load_mask
    from conceptseg.evaluate import centre_crop_view, prediction_path
    from conceptseg.geometry import load_mask_file
    from conceptseg.metrics import PooledCounts

    counts = PooledCounts()
    for s in samples:
        truth = load_mask(s)
        path = prediction_path(Path(pred_dir), s)
        pred = load_mask_file(path) if path is not None else np.zeros_like(truth)
        if protocol == "paper":
            pred, truth = centre_crop_view(pred, size), centre_crop_view(truth, size)
        counts.add(pred, truth)
    return counts


def precision_recall(counts) -> dict:
    return {"precision": counts.tp / max(counts.tp + counts.fp, 1), "recall": counts.tp / max(counts.tp + counts.fn, 1)}


def concept_scenes(folder: Path, concept: str, world_seed: int, num: int, size: int = 64, world: str = "v1") -> list[dict]:
    """`num` held-out scenes of the concept and one other class (random class, random drawing order),
    written once as PNGs; returns [{image, concept, other}] paths."""
    from conceptseg.data.toyworld import CLASSES, render_scene
    from conceptseg.io import save_mask_png, save_png

    others = [c for c in CLASSES if c != concept]
    scenes = []
    for k in range(num):
        paths = {name: folder / name / f"{k:04d}.png" for name in ("image", "concept", "other")}
        if not all(p.exists() for p in paths.values()):
            rng = np.random.default_rng([world_seed, SCENE_SEED_TAG, k])
            classes = [concept, str(rng.choice(others))]
            if rng.random() < 0.5:
                classes.reverse()
            scene = render_scene(rng, classes, size, world=world)
            save_mask_png(paths["concept"], scene.object_masks[classes.index(concept)])
            save_mask_png(paths["other"], scene.object_masks[1 - classes.index(concept)])
            save_png(paths["image"], scene.image)  # written last: its presence marks a complete scene
        scenes.append(paths)
    return scenes


def score_concept_scenes(segmenter_folder: Path, scenes: list[dict], device: str) -> dict:
    """A U-Net on the two-object scenes: IoU against the concept alone and against both objects."""
    from conceptseg.geometry import load_mask_file, load_rgb
    from conceptseg.metrics import PooledCounts
    from conceptseg.segmenter.predict import load_segmenter

    seg = load_segmenter(segmenter_folder, device=device)
    concept, union = PooledCounts(), PooledCounts()
    other_marked, other_total = 0, 0
    for i in range(0, len(scenes), 32):
        batch = scenes[i : i + 32]
        for paths, pred in zip(batch, seg.masks([load_rgb(p["image"]) for p in batch])):
            c, o = load_mask_file(paths["concept"]), load_mask_file(paths["other"])
            concept.add(pred, c)
            union.add(pred, c | o)
            other_marked, other_total = other_marked + int((pred & o).sum()), other_total + int(o.sum())
    return {"iou_concept": concept.iou, "iou_all_objects": union.iou, "other_object_marked": other_marked / max(other_total, 1),
            "concept_precision": concept.tp / max(concept.tp + concept.fp, 1)}


# ---------------------------------------------------------------- one run folder

def _seed_config(out: Path, world: int, seg: int, args):
    from conceptseg.config import override_config
    from conceptseg.demo import demo_config

    cfg = demo_config(out, args.concept, full=args.full, model=args.model, device=args.device, seed=world, num_images=args.num_images,
                      world=args.world)
    return override_config(cfg, [*(args.set or []), f"segmenter.seed={seg}"])


def _copy_shared_stages(src: Path, dst: Path) -> None:
    """Stages 1-4 of the world's first run folder into a new one; the segmenters' ledger entries are
    left out (they are the other seed's)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SHARED_STAGES:
        if (src / name).exists():
            shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
    ledger = json.loads((src / "stages.json").read_text())
    (dst / "stages.json").write_text(json.dumps({k: v for k, v in ledger.items() if "/" not in k}, indent=2))
    shutil.copy(src / "manifest.json", dst / "manifest.json")  # keeps the shared stages' timings


# settings added after these runs began; at these values they are the old behaviour, so a record
# written before they existed still matches
ADDED_DEFAULTS = {"synth": {"filter": "none"}, "refine": {"difference": "color", "window": 5, "aggregate": "mean"}}


def _config_key(config: dict) -> dict:
    return {k: {n: v for n, v in section.items() if ADDED_DEFAULTS.get(k, {}).get(n, object()) != v}
            if isinstance(section, dict) else section for k, section in config.items()}


def run_one(out: Path, world: int, seg: int, first: Path | None, args, scenes: list[dict]) -> dict:
    """One (world, segmenter seed) run folder: pipeline, Table 2 rows, precision / recall of M_pre and
    M, concept-scene scores; cached in OUT/table2_run.json against the run's config."""
    from conceptseg.data.readers import list_samples
    from conceptseg.pipeline import Run

    if first is not None and not (out / "stages.json").exists():
        _copy_shared_stages(first, out)
    cfg = _seed_config(out, world, seg, args)
    record = out / "table2_run.json"
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if record.exists():
        cached = json.loads(record.read_text())
        if _config_key(cached["config"]) == _config_key(config) and cached["scenes"] == len(scenes):
            return cached

    def ledger():
        return json.loads((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}

    def stage_times():
        return json.loads((out / "manifest.json").read_text()).get("timings_s", {}) if (out / "manifest.json").exists() else {}

    before, earlier = ledger(), stage_times()
    t0 = time.perf_counter()
    metrics = Run(cfg, progress=args.progress).execute()
    wall = time.perf_counter() - t0
    after, now = ledger(), stage_times()
    # a stage whose fingerprint did not change was skipped (or resumed): its time is the one recorded when it ran
    timings = {k: earlier[k] if k in earlier and before.get(k) == after.get(k) else v for k, v in now.items()}

    test = [s for s in list_samples(cfg.test_images, cfg.test_split) if s.mask is not None]
    quality = {name: precision_recall(pooled_counts(out / folder, test, cfg.eval_protocol, cfg.segmenter.input_size))
               for name, folder in (("prelim", "prelim"), ("refined", "refine"))}
    device = cfg.device or "cpu"
    scene_scores = {name: score_concept_scenes(out / "segmenter" / name / "model", scenes, device)
                    for name in metrics if (out / "segmenter" / name / "model").exists()}
    result = {"world_seed": world, "segmenter_seed": seg, "config": config, "rows": metrics, "mask_quality": quality,
              "concept_scenes": scene_scores, "scenes": len(scenes), "timings_s": timings, "wall_s_this_call": round(wall, 1)}
    record.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- aggregation

def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v), "values": v.tolist()}


def aggregate(runs: list[dict]) -> dict:
    """Mean and sample std over all runs (world x segmenter seeds), and per world seed."""
    from conceptseg.pipeline import ROW_NAMES

    worlds = sorted({r["world_seed"] for r in runs})
    rows = {}
    for key in ROW_NAMES:
        have = [r for r in runs if key in r["rows"]]
        if not have:
            continue
        rows[key] = {m: _stats([r["rows"][key][m] for r in have]) for m in ("acc", "iou", "miou")}
        rows[key]["iou_per_world"] = {w: _stats([r["rows"][key]["iou"] for r in have if r["world_seed"] == w]) for w in worlds}
    ratios = {}
    for key in ("unet_real", "unet_real_synth"):
        if key in rows and "supervised" in rows:
            ratios[key] = _stats([r["rows"][key]["iou"] / r["rows"]["supervised"]["iou"] for r in runs])
            ratios[key]["ratio_of_means"] = rows[key]["iou"]["mean"] / rows["supervised"]["iou"]["mean"]
    quality = {k: {m: _stats([r["mask_quality"][k][m] for r in runs]) for m in ("precision", "recall")} for k in ("prelim", "refined")}
    scenes = {k: {m: _stats([r["concept_scenes"][k][m] for r in runs if k in r["concept_scenes"]])
                  for m in ("iou_concept", "iou_all_objects", "other_object_marked", "concept_precision")}
              for k in ROW_NAMES if any(k in r["concept_scenes"] for r in runs)}
    mean = {k: v["iou"]["mean"] for k, v in rows.items()}
    order = [mean.get(k) for k in ("prelim", "refined", "unet_real", "unet_real_synth")]
    bar = {"M_pre < M < U-Net D_s <= U-Net D_s + D'_s": None if None in order else bool(order[0] < order[1] < order[2] <= order[3])}
    for key in ratios:
        bar[f"{key} / supervised (mean of ratios) >= 0.85"] = bool(ratios[key]["mean"] >= 0.85)

    # compute time: stages 1-4 once per world, the segmenters (stage 5) and their segmentation (6) per run
    shared = {w: sum(t for k, t in next(r for r in runs if r["world_seed"] == w)["timings_s"].items() if "/" not in k) for w in worlds}
    per_seed = [sum(t for k, t in r["timings_s"].items() if "/" in k) for r in runs]
    timing = {"stages_1_4_per_world_s": shared, "stages_5_6_per_run_s": _stats(per_seed),
              "compute_total_s": sum(shared.values()) + sum(per_seed)}
    return {"rows": rows, "ratios_to_supervised": ratios, "mask_quality": quality, "concept_scenes": scenes, "bar": bar, "timing": timing}


def format_tables(agg: dict) -> str:
    from conceptseg.pipeline import ROW_NAMES

    def pm(s, scale=100, digits=1):
        return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"

    worlds = list(next(iter(agg["rows"].values()))["iou_per_world"])
    n = next(iter(agg["rows"].values()))["iou"]["n"]
    head = ["method", f"IoU (all {n} runs)"] + [f"IoU, world {w}" for w in worlds] + ["ACC", "mIoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in agg["rows"].items():
        cells = [pm(r["iou"])] + [pm(r["iou_per_world"][w]) for w in worlds] + [pm(r["acc"]), pm(r["miou"])]
        lines.append(f"| {ROW_NAMES[key]} | " + " | ".join(cells) + " |")
    for key, s in agg["ratios_to_supervised"].items():
        lines.append(f"\n{ROW_NAMES[key]} / supervised IoU: {pm(s)}% (mean ± std of per-run ratios; "
                     f"ratio of means {100 * s['ratio_of_means']:.1f}%)")
    q = agg["mask_quality"]
    lines.append("\n| masks | precision | recall |\n|---|---|---|")
    lines += [f"| {ROW_NAMES[k]} | {pm(q[k]['precision'], 1, 3)} | {pm(q[k]['recall'], 1, 3)} |" for k in q]
    lines.append("\n| U-Net (two-object scenes) | IoU vs concept | IoU vs all objects | other object marked | precision vs concept |")
    lines.append("|---|---|---|---|---|")
    for key, s in agg["concept_scenes"].items():
        lines.append(f"| {ROW_NAMES[key]} | {pm(s['iou_concept'])} | {pm(s['iou_all_objects'])} | "
                     f"{pm(s['other_object_marked'])}% | {pm(s['concept_precision'])} |")
    t = agg["timing"]
    lines.append(f"\nbar: {json.dumps(agg['bar'])}\ncompute: stages 1-4 per world {t['stages_1_4_per_world_s']} s; "
                 f"stages 5-6 per run {t['stages_5_6_per_run_s']['mean']:.0f} s; total {t['compute_total_s'] / 60:.1f} min")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point

def measure(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from conceptseg.demo import demo_world

    t0 = time.perf_counter()
    runs = []
    for world in args.world_seeds:
        scenes = concept_scenes(args.out / f"scenes-world{world}", args.concept, world, args.scenes,
                                world=args.world or demo_world(args.model))
        # stages 1-4 come from the base seed's folder once it has run (`--base-seed` lets seeds run in several processes)
        base = args.out / f"world{world}-seg{args.base_seed if args.base_seed is not None else args.seg_seeds[0]}"
        for seg in args.seg_seeds:
            folder = args.out / f"world{world}-seg{seg}"
            first = base if folder != base and (base / "table2_run.json").exists() else None
            source = args.reuse_from / folder.name if args.reuse_from else None
            if source and not folder.exists() and (source / "table2_run.json").exists():
                # a lever's runs start as copies of the baseline's: the pipeline redoes only what the lever changes
                shutil.copytree(source, folder, ignore=shutil.ignore_patterns("checkpoints", "table2_run.json", "*.old"))
                first = None
            runs.append(run_one(folder, world, seg, first, args, scenes))
    agg = aggregate(runs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = {
        "command": args.command_line, "settings": "full" if args.full else "reduced", "overrides": args.set or [],
        "world_seeds": args.world_seeds, "segmenter_seeds": args.seg_seeds, "concept": args.concept, "scenes": args.scenes,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "wall_s_this_invocation": round(time.perf_counter() - t0, 1), "aggregate": agg, "runs": runs,
        "table": format_tables(agg),
    }
    path = args.json or Path(__file__).parent / "results" / f"table2-{report['settings']}-{'cuda' if device.startswith('cuda') else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(report["table"])
    print(f"\nwrote {path}")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="run folders (default runs/table2/<reduced|full>)")
    p.add_argument("--world-seeds", type=int, nargs="+", default=[1234, 1235], help="toy-world seeds (1234: the demo's)")
    p.add_argument("--seg-seeds", type=int, nargs="+", default=[0, 1, 2], help="segmenter seeds")
    p.add_argument("--base-seed", type=int, default=None,
                   help="the segmenter seed whose finished folder the others copy stages 1-4 from (default: the first)")
    p.add_argument("--reuse-from", type=Path, default=None,
                   help="another --out whose finished folders new ones start from (a lever measured against the baseline)")
    p.add_argument("--full", action="store_true", help="the paper's settings (demo --full) instead of the demo's reduced ones")
    p.add_argument("--num-images", type=int, default=None, help="toy-world images per world seed (default: the demo's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a pipeline override for every run (repeatable)")
    p.add_argument("--concept", default="fish")
    p.add_argument("--scenes", type=int, default=200, help="two-object scenes per world seed for concept vs saliency")
    p.add_argument("--model", default=None, help="default: the embedded toy-world model (embedded:toy-v2: world v2)")
    p.add_argument("--world", choices=["v1", "v2"], default=None, help="toy world (default: the one the embedded model knows)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    import sys

    args = parser().parse_args(argv)
    args.out = args.out or Path("runs/table2") / ("full" if args.full else "reduced")
    args.command_line = "python benchmarks/table2.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return measure(args)


if __name__ == "__main__":
    main()
