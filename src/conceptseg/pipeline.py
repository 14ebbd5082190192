"""`conceptseg run CONFIG.yaml`: every stage in order into one run directory.

    prelim/     stage 1 on the unlabeled images D (and the test images, to score M_pre)
    finetune/   stage 2: the model that inpaints background
    refine/     stage 3: refined masks M (and crop/: the M_crop ablation, on the test images)
    synth/      stage 4: D', D'_m
    segmenter/  stage 5: U-Nets on (D, M_pre), (D, M), (D, M) + (D', D'_m), and on truth if known
    eval/       stage 6: each segmenter applied to the test images, every row scored; metrics.json

A stage whose outputs are complete and whose settings are unchanged is skipped; per-image stages
resume image by image; trainers resume from their last checkpoint. Each stage's fingerprint (its
settings, its input images, and the fingerprints of the stages it reads) is kept in `stages.json`;
a stage whose fingerprint changed is redone, its old folder kept beside it as `<name>.old`, and so
is every stage downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conceptseg import distributed
from conceptseg.io import SettingsChanged, library_versions, list_images, write_json

ROW_NAMES = {
    "prelim": "preliminary masks M_pre",
    "crop": "crop-paste inpainting M_crop",
    "unet_prelim": "U-Net on (D, M_pre)",
    "refined": "refined masks M",
    "unet_real": "U-Net on D_s",
    "unet_real_synth": "U-Net on D_s + D'_s",
    "supervised": "supervised U-Net (true masks)",
}


@dataclass
class PrelimSection:
    steps: int = 40
    batch_size: int = 40
    seed: int = 0


@dataclass
class FinetuneSection:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    method: str = "full"
    lora_rank: int = 8
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    latent_cache: int = 0
    checkpoint_every: int = 250
    seed: int = 0


@dataclass
class RefineSection:
    steps: int = 50
    sampler: str = "ddim"
    samples: int = 1
    postprocess: bool = False
    difference_to: str = "image"  # or "reconstruction" (see RefineConfig)
    batch_size: int = 8
    seed: int = 0


@dataclass
class SynthSection:
    num: int = 0  # 0: no synthetic set (and no D_s + D'_s row)
    steps: int = 50
    guidance: float = 1.0  # the paper: 1; above 1, classifier-free guidance against the empty prompt
    batch_size: int = 8
    seed: int = 0


@dataclass
class SegmenterSection:
    steps: int = 12000
    batch_size: int = 32
    lr: float = 2e-3
    lr_schedule: str = "constant"  # the paper gives none; "cosine" decays to 0 (segmenter/train.py)
    width: int = 64
    input_size: int = 128
    checkpoint_every: int = 1000
    mixed_precision: str = "no"
    train_on_prelim: bool = True  # the "U-Net on (D, M_pre)" row
    supervised: bool = True  # the upper bound, when the images have true masks
    seed: int = 0


@dataclass
class RunConfig:
    concept: list[str]
    images: str  # D: a folder or a dataset spec (with `split`)
    out: str = "runs/run"
    split: str = "train"
    prompt: str | None = None
    model: str | None = None  # default: the embedded toy-world model
    device: str | None = None
    dtype: str = "auto"
    test_images: str | None = None  # a folder or dataset spec segmented and scored at the end
    test_split: str = "test"
    baselines: bool = True  # the M_crop row
    prelim: PrelimSection = field(default_factory=PrelimSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    refine: RefineSection = field(default_factory=RefineSection)
    synth: SynthSection = field(default_factory=SynthSection)
    segmenter: SegmenterSection = field(default_factory=SegmenterSection)

    def __post_init__(self):
        self.concept = [self.concept] if isinstance(self.concept, str) else list(self.concept)


# ---------------------------------------------------------------- config from YAML + overrides

def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        kwargs[name] = _build(type(sub()), value, f"{where}.{name}") if sub and dataclasses.is_dataclass(sub()) else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from YAML, then `key.sub=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
    return _build(RunConfig, _apply_overrides(data, overrides), str(path or "config"))


def override_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` with `key.sub=value` overrides applied (checked as in `load_config`)."""
    return _build(RunConfig, _apply_overrides(dataclasses.asdict(cfg), overrides), "config") if overrides else cfg


def _apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value (e.g. finetune.steps=200)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return data


# ---------------------------------------------------------------- the run

class Run:
    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out)
        self.timings: dict[str, float] = {}
        self.counts: dict[str, Any] = {}
        self._model = None
        ledger = self.out / "stages.json"
        self.fingerprints: dict[str, str] = json.loads(ledger.read_text()) if ledger.exists() else {}

    @property
    def model(self):
        from conceptseg.models import load_model

        if self._model is None:
            self._model = load_model(self.cfg.model, device=self.cfg.device or distributed.device(), dtype=self.cfg.dtype,
                                     sd_only="the full pipeline")
        return self._model

    def _stage(self, name: str, fn, folder: Path, settings: dict, upstream: tuple[str, ...] = ()):
        """Run one stage into `folder`. If its fingerprint (settings + upstream stages' fingerprints)
        differs from the last run's, the folder is moved aside first: the stage starts over."""
        fingerprint = _digest({"settings": settings, "upstream": [self.fingerprints[u] for u in upstream]})
        old = self.fingerprints.get(name)
        self.fingerprints[name] = fingerprint
        if distributed.is_main():
            print(f"\n== {name}", flush=True)
            if old is not None and old != fingerprint and folder.exists():
                print(f"{name}: settings or inputs changed, redoing it (the old outputs are in {folder.name}.old)")
                shutil.rmtree(folder.with_name(folder.name + ".old"), ignore_errors=True)
                folder.rename(folder.with_name(folder.name + ".old"))
            write_json(self.out / "stages.json", self.fingerprints)  # before running: an interrupted stage resumes
        distributed.barrier()
        t0 = time.perf_counter()
        result = fn()
        distributed.barrier()
        self.timings[name] = round(time.perf_counter() - t0, 2)
        if result is not None:
            self.counts[name] = result
        if distributed.is_main():
            self._write_manifest()
        return result

    def _write_manifest(self) -> None:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        write_json(self.out / "manifest.json", {"config": asdict(self.cfg), "versions": library_versions(),
                                                 "git_commit": commit.stdout.strip() or None,
                                                 "timings_s": self.timings, "counts": self.counts})

    @staticmethod
    def _per_image(run_stage, **kwargs):
        """A per-image stage, sharded over processes: resume; redo everything when its settings changed."""
        kwargs["shard"] = distributed.shard()
        try:
            result = run_stage(**kwargs)
        except SettingsChanged as e:
            print(f"settings changed, redoing: {e}")
            result = run_stage(**kwargs, overwrite=True)
        distributed.finish_per_image_stage(kwargs["out"])
        return result

    @staticmethod
    def _trainer(out: Path, train):
        """A trainer: skip when finished, else train (resuming from its last checkpoint, if any)."""
        return out / "model" if (out / "model").exists() else train()

    def execute(self) -> dict:
        from conceptseg.data.readers import Sample, read_dataset
        from conceptseg.finetune import FinetuneConfig, finetune
        from conceptseg.models import load_model
        from conceptseg.prelim import PrelimConfig, run_prelim
        from conceptseg.refine import RefineConfig, run_refine
        from conceptseg.segmenter.predict import load_segmenter, run_segment
        from conceptseg.segmenter.train import TrainSegConfig, train_segmenter
        from conceptseg.synth import SynthConfig

        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        train_files = list_images(cfg.images, cfg.split)
        test_samples = read_dataset(cfg.test_images, cfg.test_split) if cfg.test_images else []
        test_files = [s.image for s in test_samples]
        all_files = train_files + [p for p in test_files if p not in set(train_files)]
        self.counts["images"] = {"train": len(train_files), "test": len(test_files)}

        prelim_cfg = PrelimConfig(cfg.concept, prompt=cfg.prompt, **asdict(cfg.prelim))
        train_list, test_list = _file_list(train_files), _file_list(test_files)  # (name, size): inputs to fingerprints
        base = {"model": cfg.model, "dtype": cfg.dtype, "images": _file_list(all_files)}
        self._stage("prelim", lambda: self._per_image(run_prelim, model=self.model, images=all_files, out=out / "prelim",
                                                      config=prelim_cfg, progress=self.progress),
                    out / "prelim", {**base, **_without(asdict(prelim_cfg), "batch_size")})
        ft = cfg.finetune
        ft_cfg = FinetuneConfig(cfg.concept, images=train_files, prelim=out / "prelim", out=out / "finetune", model=cfg.model,
                                prompt=cfg.prompt, progress=self.progress, **asdict(ft))
        tuned_dir = self._stage("finetune", lambda: self._trainer(out / "finetune", lambda: finetune(ft_cfg)), out / "finetune",
                                {**_without(asdict(ft_cfg), "images", "prelim", "out", "progress"),
                                 "images": train_list}, upstream=("prelim",))
        tuned = load_model(tuned_dir, device=self.model.device, dtype=self.model.dtype)
        rf = cfg.refine
        refine_cfg = RefineConfig(**asdict(rf))
        self._stage("refine", lambda: self._per_image(run_refine, model=tuned, images=all_files, prelim_dir=out / "prelim",
                                                      out=out / "refine", config=refine_cfg, progress=self.progress),
                    out / "refine", _without(asdict(refine_cfg), "batch_size"), upstream=("prelim", "finetune"))
        if cfg.baselines and test_files:
            crop_cfg = dataclasses.replace(refine_cfg, inpainter="crop")
            self._stage("crop", lambda: self._per_image(run_refine, model=None, images=test_files, prelim_dir=out / "prelim",
                                                        out=out / "crop", config=crop_cfg, progress=self.progress,
                                                        resolution=tuned.resolution),
                        out / "crop", _without(asdict(crop_cfg), "batch_size"), upstream=("prelim",))
        if cfg.synth.num > 0:
            sy = cfg.synth
            synth_cfg = SynthConfig(cfg.concept, num=sy.num, prompt=cfg.prompt, steps=sy.steps, guidance=sy.guidance,
                                    refine=refine_cfg, prelim_steps=cfg.prelim.steps, batch_size=sy.batch_size, seed=sy.seed)
            # grows by index: a larger `num` keeps the images made so far
            self._stage("synth", lambda: self._synth(tuned, synth_cfg), out / "synth",
                        _without(asdict(synth_cfg), "num", "batch_size"), upstream=("finetune",))

        # stage 5: one U-Net per training set
        def pairs(mask_dir: Path) -> list[Sample]:
            return [Sample(key=p.stem, image=p, mask=mask_dir / f"{p.stem}.png", box=None, label=None) for p in train_files]

        # name: (training data, the stages whose masks it trains on, what else decides the data)
        train_sets = {"unet_real": ([pairs(out / "refine" / "masks")], ("refine",), {})}
        if cfg.synth.num > 0:
            train_sets["unet_real_synth"] = ([pairs(out / "refine" / "masks"), str(out / "synth")], ("refine", "synth"),
                                             {"synth_num": cfg.synth.num})
        if cfg.segmenter.train_on_prelim:
            train_sets["unet_prelim"] = ([pairs(out / "prelim" / "masks")], ("prelim",), {})
        if cfg.segmenter.supervised and ":" in cfg.images:
            truth = [s for s in read_dataset(cfg.images, cfg.split) if s.mask is not None]
            if truth:
                train_sets["supervised"] = ([truth], (), {"masks": _file_list([s.mask for s in truth])})
        sg = cfg.segmenter
        seg_dirs = {}
        for name, (data, upstream, data_settings) in train_sets.items():
            seg_cfg = TrainSegConfig(data=data, out=out / "segmenter" / name, steps=sg.steps, batch_size=sg.batch_size, lr=sg.lr, lr_schedule=sg.lr_schedule,
                                     width=sg.width, input_size=sg.input_size, checkpoint_every=sg.checkpoint_every,
                                     mixed_precision=sg.mixed_precision, seed=sg.seed, progress=self.progress)
            settings = {**_without(asdict(seg_cfg), "data", "out", "progress"), **data_settings, "images": train_list}
            seg_dirs[name] = self._stage(f"segmenter/{name}", lambda c=seg_cfg: self._trainer(c.out, lambda: train_segmenter(c)),
                                         seg_cfg.out, settings, upstream=upstream)

        if not test_samples:
            return {}
        # stage 6: segment the test images, score every row
        for name, folder in seg_dirs.items():
            seg = load_segmenter(folder, device=self.model.device)
            self._stage(f"segment/{name}", lambda s=seg, n=name: self._per_image(
                run_segment, segmenter=s, images=test_files, out=out / "eval" / n, progress=self.progress),
                out / "eval" / name, {"images": test_list}, upstream=(f"segmenter/{name}",))
        metrics = {}
        if distributed.is_main():  # scoring and the report are one process's job
            from conceptseg.report import run_report

            metrics = self.evaluate(test_samples, seg_dirs)
            best = "unet_real_synth" if "unet_real_synth" in seg_dirs else "unet_real"
            run_report(out, test_samples, metrics, self.timings, ROW_NAMES, segmenter=best, model_resolution=tuned.resolution)
        distributed.barrier()
        return metrics

    def _synth(self, model, config) -> str:
        from conceptseg.synth import run_synth, write_metadata

        out = self.out / "synth"
        self._per_image(run_synth, model=model, out=out, config=config, progress=self.progress)
        if distributed.is_main():
            write_metadata(out, config)
        return str(out)

    def evaluate(self, samples, seg_dirs: dict) -> dict:
        from conceptseg.evaluate import evaluate_samples

        rows = {"prelim": self.out / "prelim", "crop": self.out / "crop", "refined": self.out / "refine"}
        rows.update({name: self.out / "eval" / name for name in seg_dirs})
        metrics = {}
        for key in ROW_NAMES:
            if key in rows and rows[key].exists():
                metrics[key] = evaluate_samples(rows[key], samples)["summary"]
        write_json(self.out / "metrics.json", {k: {m: v[m] for m in ("acc", "iou", "miou", "box_iou") if m in v}
                                               for k, v in metrics.items()})
        return metrics


def format_table(metrics: dict) -> str:
    has_box = any("box_iou" in m for m in metrics.values())
    lines = ["| method | ACC | IoU | mIoU |" + (" box IoU |" if has_box else ""), "|---|---|---|---|" + ("---|" if has_box else "")]
    for key, m in metrics.items():
        cells = [f"{100 * m[k]:.1f}" if k in m else "-" for k in ("acc", "iou", "miou")]
        if has_box:
            cells.append(f"{100 * m['box_iou']:.1f}" if "box_iou" in m else "-")
        lines.append(f"| {ROW_NAMES.get(key, key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _without(settings: dict, *keys: str) -> dict:
    return {k: v for k, v in settings.items() if k not in keys}


def _file_list(paths) -> list[tuple[str, int]]:
    """Input files as (name, size): moving a run's folder keeps its fingerprints, new content changes them."""
    return [(Path(p).name, Path(p).stat().st_size if Path(p).exists() else -1) for p in paths]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
