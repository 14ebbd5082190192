"""`conceptseg run CONFIG.yaml`: every stage in order into one run directory.

    prelim/     stage 1 on the unlabeled images D (and the test images, to score M_pre)
    finetune/   stage 2: the model that inpaints background
    refine/     stage 3: refined masks M (and crop/: the M_crop ablation, on the test images)
    synth/      stage 4: D', D'_m
    segmenter/  stage 5: U-Nets on (D, M_pre), (D, M), (D, M) + (D', D'_m), and on truth if known
    eval/       stage 6: each segmenter applied to the test images, every row scored; metrics.json

The run is a graph of declared stages (`Stage`: its config, the values the run resolved, its inputs
and the stages it reads). A stage whose outputs are complete and whose fingerprint is unchanged is
skipped; per-image stages resume image by image; trainers resume from their last checkpoint. One
function (`fingerprint`) computes a stage's fingerprint from the same resolved settings its manifest
records (the model's content identity, the dtype `auto` became on this device; `settings`), its
input files and the fingerprints of the stages it reads; `stages.json` keeps them. A stage whose
fingerprint changed is redone, and so is every stage downstream of it; its old folder is kept
beside it as `<name>.old` (one per stage: the next redo replaces it; `run --clean` removes them).

Models: the run holds one diffusion model at a time (`LoadedModel`), loads each at most once and
releases it when no later stage needs it: the stage-1 model for prelim and the untuned row (both
before fine-tuning), handed to fine-tuning when it trains in the same dtype; the fine-tuned model
(a LoRA fine-tune: its base with the adapters attached) for refine and synth. A per-image stage
whose outputs are all there loads nothing, and neither does a finished fine-tune.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from conceptseg import distributed, models
from conceptseg.config import apply_overrides, build_config, field_default
from conceptseg.data.readers import Sample, keyed_apart, list_samples
from conceptseg.finetune import FinetuneConfig, training_dtypes
from conceptseg.io import SettingsChanged, library_versions, write_json
from conceptseg.prelim import PrelimConfig
from conceptseg.refine import RefineConfig, prelim_geometry
from conceptseg.residency import free_device_memory, peak_rss_mb, reset_peak_rss
from conceptseg.segmenter.train import TrainSegConfig
from conceptseg.settings import resolved_settings
from conceptseg.synth import SynthConfig
from conceptseg.tables import ROW_NAMES


@dataclass
class PrelimSection:
    steps: int = field_default(PrelimConfig, "steps")
    batch_size: int = field_default(PrelimConfig, "batch_size")
    seed: int = field_default(PrelimConfig, "seed")


@dataclass
class FinetuneSection:
    steps: int = field_default(FinetuneConfig, "steps")
    batch_size: int = field_default(FinetuneConfig, "batch_size")
    lr: float = field_default(FinetuneConfig, "lr")
    method: str = field_default(FinetuneConfig, "method")
    lora_rank: int = field_default(FinetuneConfig, "lora_rank")
    mixed_precision: str = field_default(FinetuneConfig, "mixed_precision")
    gradient_accumulation: int = field_default(FinetuneConfig, "gradient_accumulation")
    max_grad_norm: float | None = field_default(FinetuneConfig, "max_grad_norm")
    gradient_checkpointing: bool = field_default(FinetuneConfig, "gradient_checkpointing")
    optimizer: str = field_default(FinetuneConfig, "optimizer")
    latent_cache: int = field_default(FinetuneConfig, "latent_cache")
    checkpoint_every: int = field_default(FinetuneConfig, "checkpoint_every")
    checkpoints_total_limit: int | None = field_default(FinetuneConfig, "checkpoints_total_limit")
    nonfinite_loss: str = field_default(FinetuneConfig, "nonfinite_loss")
    seed: int = field_default(FinetuneConfig, "seed")


@dataclass
class RefineSection:
    steps: int = field_default(RefineConfig, "steps")
    sampler: str = field_default(RefineConfig, "sampler")
    samples: int = field_default(RefineConfig, "samples")
    postprocess: bool = field_default(RefineConfig, "postprocess")
    difference_to: str = field_default(RefineConfig, "difference_to")
    overlay: bool = field_default(RefineConfig, "overlay")
    difference: str = field_default(RefineConfig, "difference")
    window: int = field_default(RefineConfig, "window")
    aggregate: str = field_default(RefineConfig, "aggregate")
    batch_size: int = field_default(RefineConfig, "batch_size")
    seed: int = field_default(RefineConfig, "seed")


@dataclass
class SynthSection:
    num: int = 0  # 0: no synthetic set (and no D_s + D'_s row)
    steps: int = field_default(SynthConfig, "steps")
    guidance: float = field_default(SynthConfig, "guidance")
    batch_size: int = field_default(SynthConfig, "batch_size")
    seed: int = field_default(SynthConfig, "seed")
    # which pairs the D_s + D'_s U-Net trains on: "none" = all (the paper); "plausible" = those whose
    # mask looks like one object of a size M has on D (synth_filter.py, a named deviation)
    filter: str = "none"


@dataclass
class SegmenterSection:
    steps: int = field_default(TrainSegConfig, "steps")
    batch_size: int = field_default(TrainSegConfig, "batch_size")
    lr: float = field_default(TrainSegConfig, "lr")
    lr_schedule: str = field_default(TrainSegConfig, "lr_schedule")
    width: int = field_default(TrainSegConfig, "width")
    input_size: int = field_default(TrainSegConfig, "input_size")
    checkpoint_every: int = field_default(TrainSegConfig, "checkpoint_every")
    checkpoints_total_limit: int | None = field_default(TrainSegConfig, "checkpoints_total_limit")
    mixed_precision: str = field_default(TrainSegConfig, "mixed_precision")
    nonfinite_loss: str = field_default(TrainSegConfig, "nonfinite_loss")
    train_on_prelim: bool = True  # the "U-Net on (D, M_pre)" row
    supervised: bool = True  # the upper bound, when the images have true masks
    seed: int = field_default(TrainSegConfig, "seed")


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
    test_images: str | None = None  # a folder or dataset spec segmented (and scored, where it has truth) at the end
    test_split: str = "test"
    eval_protocol: str = "paper"  # "paper": short side to segmenter.input_size, centre crop (METHOD.md §5); "full": whole image
    baselines: bool = True  # the M_crop row
    # the ablation that shows stage 2: M with the model BEFORE fine-tuning (same prompt, sampler and
    # seeds as M), on the test images; its inpaintings sit in untuned/background beside refine/'s
    untuned_row: bool = False
    prelim: PrelimSection = field(default_factory=PrelimSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    refine: RefineSection = field(default_factory=RefineSection)
    synth: SynthSection = field(default_factory=SynthSection)
    segmenter: SegmenterSection = field(default_factory=SegmenterSection)

    def __post_init__(self):
        self.concept = [self.concept] if isinstance(self.concept, str) else list(self.concept)


# ---------------------------------------------------------------- config from YAML + overrides

def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from YAML, then `key.sub=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
    return build_config(RunConfig, apply_overrides(data, overrides), str(path or "config"))


# ---------------------------------------------------------------- the stage graph

@dataclass
class Stage:
    """One stage of `conceptseg run`, as the run declares it.

    What decides its outputs: `config`'s output settings and `resolved`, the values the run resolved
    (the model, the dtype `auto` became), both recorded as its manifest records them
    (`settings.resolved_settings`); `inputs` (its input files' keys and sizes, ...); and `upstream`,
    the stages whose outputs it reads. `run` makes its outputs in `folder`, resuming what is there."""

    name: str
    folder: Path
    run: Callable[[], Any]
    config: Any = None
    resolved: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    upstream: tuple[str, ...] = ()


def fingerprint(stage: Stage, run_folder: Path, upstream: list[str | None]) -> str:
    """The one definition of what a stage depends on: its resolved settings (paths relative to the
    run folder, so a moved run keeps them), its inputs and its upstream stages' fingerprints."""
    settings = resolved_settings(stage.config, run_folder, **stage.resolved)
    return _digest({"settings": settings, "inputs": stage.inputs, "upstream": upstream})


STALE = "stale"  # the ledger's mark on a stage downstream of a redone one: it matches no fingerprint


class Ledger:
    """`stages.json`: per stage, its fingerprint, its folder (relative to the run) and the stages it
    reads. A redone stage marks every stage downstream of it stale, on disk at once, so they are
    redone too, even by a later run if this one is interrupted."""

    def __init__(self, run_folder: Path):
        self.path = run_folder / "stages.json"
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        # a bare string is the entry of a run made before folders and upstream stages were recorded
        self.entries: dict[str, dict] = {name: e if isinstance(e, dict) else {"fingerprint": e} for name, e in data.items()}

    def fingerprint(self, name: str) -> str | None:
        return self.entries.get(name, {}).get("fingerprint")

    def record(self, name: str, fingerprint: str, folder: str, upstream: tuple[str, ...]) -> None:
        self.entries[name] = {"fingerprint": fingerprint, "folder": folder, "upstream": list(upstream)}

    def downstream(self, name: str) -> list[str]:
        """Every recorded stage that reads `name`, directly or through others."""
        found: list[str] = []
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for other, entry in self.entries.items():
                if current in entry.get("upstream", ()) and other not in found:
                    found.append(other)
                    frontier.append(other)
        return found

    def mark_downstream_stale(self, name: str) -> None:
        for other in self.downstream(name):
            self.entries[other]["fingerprint"] = STALE
        self.save()

    def folders(self) -> list[str]:
        return [e["folder"] for e in self.entries.values() if "folder" in e]

    def save(self) -> None:
        write_json(self.path, self.entries)


# ---------------------------------------------------------------- the run

class LoadedModel:
    """The one diffusion model a run holds: `get` loads a model (source, device, dtype) at most once
    while it is held, releasing the one held before; `take` hands it to a stage that changes it
    (fine-tuning trains it in place), so it is not held any more; `free` releases it."""

    def __init__(self):
        self.key: tuple | None = None
        self.model = None

    def get(self, source, device: torch.device, dtype: torch.dtype):
        key = (str(source) if source is not None else None, torch.device(device), dtype)
        if key != self.key:
            self.free()
            self.model = models.load_model(source, device=device, dtype=dtype)
            self.key = key
        return self.model

    def take(self, source, device: torch.device, dtype: torch.dtype):
        model = self.get(source, device, dtype)
        self.key, self.model = None, None
        return model

    def free(self) -> None:
        if self.model is not None:
            device = self.model.device
            self.model.release()
            self.key, self.model = None, None
            free_device_memory(device)


class Run:
    """`conceptseg run`: the stages of one config into its run folder. `clean`: once the run has
    finished, remove the `<stage>.old` folders that redone stages left."""

    def __init__(self, cfg: RunConfig, progress: bool = True, clean: bool = False):
        self.cfg, self.progress, self.clean = cfg, progress, clean
        self.out = Path(cfg.out)
        self.timings: dict[str, float] = {}
        self.counts: dict[str, Any] = {}
        self.folders: dict[str, Path] = {}
        self.peak_cuda_mb: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}  # this process's resident memory, each stage from its start
        self.rss_since = "stage start"  # or "process start", where the high-water mark cannot be reset
        self.models = LoadedModel()
        self._current = ""  # the stage running now
        self._unchanged = False  # whether the stage running now kept its recorded fingerprint
        self.ledger = Ledger(self.out)
        # resolved once, here: what the stages run on and what their fingerprints record
        self.device = torch.device(cfg.device or distributed.device())
        self.dtype = models.resolve_dtype(cfg.dtype, self.device)

    def _stage(self, stage: Stage):
        """Run one stage into its folder. A fingerprint that differs from the ledger's (or an entry
        marked stale) means the stage starts over: its folder is moved aside, and every stage
        downstream of it is marked stale."""
        fp = fingerprint(stage, self.out, [self.ledger.fingerprint(u) for u in stage.upstream])
        old = self.ledger.fingerprint(stage.name)
        self.folders[stage.name] = stage.folder
        if distributed.is_main():
            print(f"\n== {stage.name}", flush=True)
            if old is not None and old != fp:
                if stage.folder.exists():
                    self._set_aside(stage.name, stage.folder, "a stage it reads was redone" if old == STALE
                                    else "settings or inputs changed")
                self.ledger.mark_downstream_stale(stage.name)
            self.ledger.record(stage.name, fp, stage.folder.relative_to(self.out).as_posix(), stage.upstream)
            self.ledger.save()  # before running: an interrupted stage resumes
        distributed.barrier()
        self._current, self._unchanged = stage.name, old == fp
        free_device_memory()  # what earlier stages released goes back before this stage's peak counts
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if not reset_peak_rss():
            self.rss_since = "process start"
        t0 = time.perf_counter()
        result = stage.run()
        distributed.barrier()
        self.timings[stage.name] = round(time.perf_counter() - t0, 2)
        if cuda:
            self.peak_cuda_mb[stage.name] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if (rss := peak_rss_mb()) is not None:
            self.peak_rss_mb[stage.name] = rss
        if result is not None:
            self.counts[stage.name] = result
        if distributed.is_main():
            self._write_manifest()
        return result

    def _set_aside(self, name: str, folder: Path, reason: str) -> None:
        _move_aside(folder)
        print(f"{name}: {reason}; redoing it. Its previous outputs are in {folder.name}.old (one per stage: the next "
              f"redo replaces it; `conceptseg run --clean` removes it)", flush=True)

    def _write_manifest(self) -> None:
        write_json(self.out / "manifest.json", {"config": asdict(self.cfg), "versions": library_versions(),
                                                 "git_commit": _git_commit(), "timings_s": self.timings, "counts": self.counts,
                                                 "disk_bytes": {k: _disk_use(f) for k, f in self.folders.items()},
                                                 "peak_cuda_mb": self.peak_cuda_mb, "peak_rss_mb": self.peak_rss_mb,
                                                 "peak_rss_since": self.rss_since})

    def _per_image(self, run_stage, **kwargs):
        """A per-image stage, sharded over processes. Its manifest's settings and the stage's
        fingerprint are one definition, so a folder holding other settings means the ledger was
        lost or edited: the folder is moved aside and the stage redone, and so is all downstream."""
        kwargs["shard"] = distributed.shard()
        out = Path(kwargs["out"])
        try:
            result = run_stage(**kwargs)
        except SettingsChanged as e:
            distributed.barrier()
            if distributed.is_main():
                self._set_aside(self._current, out, str(e).split(";")[0])
                self.ledger.mark_downstream_stale(self._current)
            distributed.barrier()
            result = run_stage(**kwargs)
        distributed.finish_per_image_stage(out)
        return result

    def _with_model(self, run_stage, source, done: Callable[[Any], bool], items: list, **kwargs):
        """A per-image stage that runs `source` at the run's dtype: nothing is loaded when its
        fingerprint is unchanged and every item's outputs are there (`done`), as `run_stage` would
        find them; else `_per_image` with the model (loaded, or the one held)."""
        out = Path(kwargs["out"])
        mine = items[distributed.shard()[0] :: distributed.shard()[1]]
        if (self._unchanged and (out / "manifest.json").exists() and not any(out.glob("manifest.shard-*.json"))
                and all(done(i) for i in items)):
            return {"images": len(mine), "processed": 0, "skipped_done": len(mine), "failed": 0}
        return self._per_image(run_stage, model=self.models.get(source, self.device, self.dtype), **kwargs)

    @staticmethod
    def _trainer(out: Path, train):
        """A trainer: skip when finished, else train (resuming from its last checkpoint, if any)."""
        return out / "model" if (out / "model").exists() else train()

    def execute(self) -> dict:
        """Every stage in order, each skipped, resumed or redone as its fingerprint says; the rows
        scored where the test images have truth (the metrics returned; {} when none is scored)."""
        from conceptseg.plan import check_fits

        check_fits(self.cfg)  # a config whose plan exceeds the visible GPU is refused up front, naming the knobs
        self.out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            _remove_temporaries(self.out)
        distributed.barrier()
        train, test = self._samples()
        self._stages_1_to_4(train, test)
        seg_dirs = self._segmenters(train)
        metrics = self._segment_and_score(test, seg_dirs) if test else {}
        if self.clean and distributed.is_main():
            self.remove_old_outputs()
        distributed.barrier()
        return metrics

    def remove_old_outputs(self) -> list[Path]:
        """Delete the `<stage>.old` folders that redone stages left (`conceptseg run --clean`)."""
        removed = [self.out / f"{folder}.old" for folder in self.ledger.folders() if (self.out / f"{folder}.old").is_dir()]
        for old in removed:
            shutil.rmtree(old)
        if removed:
            print(f"removed the previous outputs of redone stages: {', '.join(p.relative_to(self.out).as_posix() for p in removed)}")
        return removed

    def _samples(self) -> tuple[list[Sample], list[Sample]]:
        """D and the test images, keyed apart where their file names collide (`readers.keyed_apart`)."""
        cfg = self.cfg
        train = list_samples(cfg.images, cfg.split)
        test = keyed_apart(train, list_samples(cfg.test_images, cfg.test_split)) if cfg.test_images else []
        self.counts["images"] = {"train": len(train), "test": len(test)}
        return train, test

    def _stages_1_to_4(self, train: list[Sample], test: list[Sample]) -> None:
        """prelim and the untuned row (the stage-1 model), finetune, refine, crop, synth (the fine-tuned
        model); each model released once no later stage needs it."""
        from conceptseg import prelim, refine, synth
        from conceptseg.finetune import finetune

        cfg, out = self.cfg, self.out
        train_keys = {s.key for s in train}
        both = train + [s for s in test if s.key not in train_keys]  # a key shared by both is one file
        images, train_list, test_list = {"images": _file_list(both)}, {"images": _file_list(train)}, {"images": _file_list(test)}
        run_dtype = {"dtype": self.dtype}  # the stages that run a model at the run's dtype

        def done(module, folder: str):
            return lambda s: module.outputs_done(out / folder, s.key)

        prelim_cfg = PrelimConfig(cfg.concept, prompt=cfg.prompt, **asdict(cfg.prelim))
        self._stage(Stage("prelim", out / "prelim", lambda: self._with_model(
            prelim.run_prelim, cfg.model, done(prelim, "prelim"), both, images=both, out=out / "prelim", config=prelim_cfg,
            progress=self.progress), prelim_cfg, {"model": cfg.model, **run_dtype}, images))
        refine_cfg = RefineConfig(**asdict(cfg.refine))
        if cfg.untuned_row and test:  # the same refinement with the model before fine-tuning, while it is held
            self._stage(Stage("untuned", out / "untuned", lambda: self._with_model(
                refine.run_refine, cfg.model, done(refine, "untuned"), test, images=test, prelim_dir=out / "prelim",
                out=out / "untuned", config=refine_cfg, progress=self.progress),
                refine_cfg, {"model": cfg.model, **run_dtype}, test_list, ("prelim",)))
        ft_cfg = FinetuneConfig(cfg.concept, images=train, prelim=out / "prelim", out=out / "finetune", model=cfg.model,
                                prompt=cfg.prompt, progress=self.progress, **asdict(cfg.finetune))
        # the stage-1 model is handed over (no second copy) when it already is in the denoiser's training dtype
        train_ft = lambda: finetune(ft_cfg, self.models.take(cfg.model, distributed.device(), training_dtypes(ft_cfg)[0]))  # noqa: E731
        tuned_dir = self._stage(Stage("finetune", out / "finetune", lambda: self._trainer(out / "finetune", train_ft),
                                      dataclasses.replace(ft_cfg, images=[]), {"model": cfg.model}, train_list, ("prelim",)))
        self.models.free()  # no later stage runs the model before fine-tuning
        self._stage(Stage("refine", out / "refine", lambda: self._with_model(
            refine.run_refine, tuned_dir, done(refine, "refine"), both, images=both, prelim_dir=out / "prelim",
            out=out / "refine", config=refine_cfg, progress=self.progress), refine_cfg, run_dtype, images, ("prelim", "finetune")))
        if cfg.baselines and test:
            crop_cfg = dataclasses.replace(refine_cfg, inpainter="crop")
            self._stage(Stage("crop", out / "crop", lambda: self._per_image(
                refine.run_refine, model=None, images=test, prelim_dir=out / "prelim", out=out / "crop", config=crop_cfg,
                progress=self.progress), crop_cfg, {}, test_list, ("prelim",)))
        if cfg.synth.num > 0:
            sy = cfg.synth
            synth_cfg = SynthConfig(cfg.concept, num=sy.num, prompt=cfg.prompt, steps=sy.steps, guidance=sy.guidance,
                                    refine=refine_cfg, prelim_steps=cfg.prelim.steps, batch_size=sy.batch_size, seed=sy.seed)
            # grows by index: a larger `num` keeps the images made so far (num is not an output setting)
            self._stage(Stage("synth", out / "synth", lambda: self._synth(tuned_dir, synth_cfg), synth_cfg, run_dtype,
                              upstream=("finetune",)))
        self.models.free()  # the segmenters and the evaluation run no diffusion model

    def _segmenters(self, train: list[Sample]) -> dict[str, Path]:
        """Stage 5: one U-Net per training set; their folders by row name."""
        from conceptseg.segmenter.train import train_segmenter

        cfg, out = self.cfg, self.out

        def pairs(mask_dir: Path) -> list[Sample]:
            return [dataclasses.replace(s, mask=mask_dir / f"{s.key}.png") for s in train]

        # name: (training data, the stages whose masks it trains on, what else decides the data)
        train_sets = {"unet_real": ([pairs(out / "refine" / "masks")], ("refine",), {})}
        if cfg.synth.num > 0:
            synthetic, chosen = str(out / "synth"), {"synth_num": cfg.synth.num}
            if cfg.synth.filter != "none":  # a fingerprint input only when set: the paper's runs keep theirs
                synthetic = self._filtered_synth(train)
                chosen.update(synth_filter=cfg.synth.filter, synth_kept=[s.key for s in synthetic])
            train_sets["unet_real_synth"] = ([pairs(out / "refine" / "masks"), synthetic], ("refine", "synth"), chosen)
        if cfg.segmenter.train_on_prelim:
            train_sets["unet_prelim"] = ([pairs(out / "prelim" / "masks")], ("prelim",), {})
        truth = [s for s in train if s.mask is not None]
        if cfg.segmenter.supervised and truth:
            train_sets["supervised"] = ([truth], (), {"masks": _file_list([dataclasses.replace(s, image=s.mask) for s in truth])})
        sg = {k: v for k, v in asdict(cfg.segmenter).items() if k not in ("train_on_prelim", "supervised")}
        seg_dirs = {}
        for name, (data, upstream, data_inputs) in train_sets.items():
            seg_cfg = TrainSegConfig(data=data, out=out / "segmenter" / name, progress=self.progress, **sg)
            seg_dirs[name] = self._stage(Stage(f"segmenter/{name}", seg_cfg.out,
                                               lambda c=seg_cfg: self._trainer(c.out, lambda: train_segmenter(c)),
                                               dataclasses.replace(seg_cfg, data=[]), {},
                                               {**data_inputs, "images": _file_list(train)}, upstream))
        return seg_dirs

    def _segment_and_score(self, test: list[Sample], seg_dirs: dict[str, Path]) -> dict:
        """Stage 6: segment the test images, score every row that has truth to score against."""
        from conceptseg.segmenter.predict import load_segmenter, run_segment

        cfg, out = self.cfg, self.out
        for name, folder in seg_dirs.items():
            seg = load_segmenter(folder, device=self.device)
            self._stage(Stage(f"segment/{name}", out / "eval" / name, lambda s=seg, n=name: self._per_image(
                run_segment, segmenter=s, images=test, out=out / "eval" / n, progress=self.progress),
                inputs={"images": _file_list(test)}, upstream=(f"segmenter/{name}",)))
        metrics = {}
        scorable = [s for s in test if s.mask is not None or s.box is not None]
        if distributed.is_main() and scorable:  # scoring and the report are one process's job
            from conceptseg.report import run_report

            metrics = self.evaluate(scorable, seg_dirs)
            best = "unet_real_synth" if "unet_real_synth" in seg_dirs else "unet_real"
            # stage 1's canvas, as its manifest records it: the report needs no model loaded
            run_report(out, scorable, metrics, self.timings, ROW_NAMES, segmenter=best,
                       model_resolution=prelim_geometry(out / "prelim")[0], protocol=self._protocol())
        elif distributed.is_main():
            print(f"the test images ({cfg.test_images}) have no masks or boxes: segmented into {out / 'eval'}, not scored")
        distributed.barrier()
        return metrics

    def _synth(self, source, config) -> str:
        from conceptseg.synth import outputs_done, run_synth, write_metadata

        out = self.out / "synth"
        self._with_model(run_synth, source, lambda i: outputs_done(out, i), list(range(config.num)), out=out, config=config,
                         progress=self.progress)
        if distributed.is_main():
            write_metadata(out, config)
        return str(out)

    def _filtered_synth(self, train: list[Sample]) -> list[Sample]:
        from conceptseg.synth_filter import FILTERS, plausible

        if self.cfg.synth.filter not in FILTERS:
            raise ValueError(f"synth.filter must be one of {FILTERS}, not {self.cfg.synth.filter!r}")
        synthetic = list_samples(self.out / "synth", "all")
        kept = plausible(synthetic, [self.out / "refine" / "masks" / f"{s.key}.png" for s in train])
        self.counts["synth_filter"] = {"kept": len(kept), "of": len(synthetic)}
        if distributed.is_main():
            print(f"synth.filter={self.cfg.synth.filter}: training on {len(kept)} of {len(synthetic)} synthetic pairs")
        return kept

    def _protocol(self) -> str:
        from conceptseg.evaluate import describe_protocol

        return describe_protocol(self.cfg.eval_protocol, self.cfg.segmenter.input_size)

    def evaluate(self, samples, seg_dirs: dict) -> dict:
        """Every row on the same test images (a missing prediction counts as an empty mask), by the
        run's protocol; metrics.json holds the rows, what each was scored on, and the protocol."""
        from conceptseg.evaluate import evaluate_samples

        rows = {"prelim": self.out / "prelim", "crop": self.out / "crop", "untuned": self.out / "untuned",
                "refined": self.out / "refine"}
        rows.update({name: self.out / "eval" / name for name in seg_dirs})
        metrics = {}
        for key in ROW_NAMES:
            if key in rows and rows[key].exists():
                summary = evaluate_samples(rows[key], samples, self.cfg.eval_protocol, self.cfg.segmenter.input_size)["summary"]
                metrics[key] = {m: summary[m] for m in ("acc", "iou", "miou", "box_iou", "evaluated", "missing") if m in summary}
        write_json(self.out / "metrics.json", {"protocol": self._protocol(), **metrics})
        return metrics


def _file_list(samples: list[Sample]) -> list[tuple[str, int]]:
    """Input files as (key, size): moving a run's folder keeps its fingerprints, new content changes them."""
    return [(s.key, s.image.stat().st_size if s.image.exists() else -1) for s in samples]


def _move_aside(folder: Path) -> None:
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    folder.rename(old)


def _remove_temporaries(run: Path) -> None:
    """What a killed run left half-written (io's `.name.*.tmp` files, `.folder.tmp` exports): never
    read, and removed before the run goes on."""
    for p in sorted(run.rglob(".*.tmp"), key=lambda p: len(p.parts), reverse=True):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _disk_use(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else 0


def _git_commit() -> str | None:
    """The commit of the installed code, where it is a git checkout and git is installed."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
