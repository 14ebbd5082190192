"""What the training commands share: checkpoints that resume, EMA export, per-step data order."""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from accelerate import Accelerator

from conceptseg.io import write_json


def step_rng(seed: int, stream: int, step: int, rank: int) -> np.random.Generator:
    """Randomness that depends only on (seed, stream, step, process): a resumed run draws the same data."""
    return np.random.default_rng([seed, stream, step, rank])


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:06d}"


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (its state.json is written last)."""
    ckpts = [c for c in (Path(out) / "checkpoints").glob("step-*") if (c / "state.json").exists()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1])) if ckpts else None


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, export_model, ema=None, extra: dict | None = None) -> Path:
    """accelerate state (models, optimiser, scheduler, RNG), the EMA weights, the exported model,
    then state.json last (a checkpoint without it is incomplete and ignored)."""
    dest = checkpoint_dir(out, step)
    accelerator.save_state(str(dest / "accelerate"))
    if accelerator.is_main_process:
        state = {"step": step, **(extra or {})}
        if ema is not None:
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, dest / "ema.safetensors")
            state["ema_optimization_step"] = ema.optimization_step
        export_model(dest / "model")
        write_json(dest / "state.json", state)
    accelerator.wait_for_everyone()
    return dest


def resume(accelerator: Accelerator, out: Path, ema=None) -> tuple[int, dict]:
    """Load the newest complete checkpoint, if any: (step to start from, its state.json)."""
    ckpt = last_checkpoint(out)
    if ckpt is None:
        return 0, {}
    accelerator.load_state(str(ckpt / "accelerate"))
    state = json.loads((ckpt / "state.json").read_text())
    if ema is not None:
        shadow = load_file(ckpt / "ema.safetensors")
        ema.shadow_params = [shadow[str(i)].to(accelerator.device) for i in range(len(shadow))]
        ema.optimization_step = state["ema_optimization_step"]
    accelerator.print(f"resumed from {ckpt} at step {state['step']}")
    return state["step"], state


class TrainLog:
    """OUT/train_log.jsonl: one line per step (loss, seconds since this process started training) and
    an end line with peak memory; appended, so a resumed run continues it. With `report_to`
    ("tensorboard", "wandb", ...) the loss also goes to accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, out: Path, project: str, report_to: str | None = None):
        self.accelerator, self.path = accelerator, Path(out) / "train_log.jsonl"
        self.rows: list[dict] = []
        self.start = time.perf_counter()
        self.report_to = report_to
        if report_to:
            accelerator.init_trackers(project)

    def step(self, step: int, **values: float) -> None:
        if self.accelerator.is_main_process:
            self.rows.append({"step": step, "time": round(time.perf_counter() - self.start, 4), **values})
        if self.report_to:
            self.accelerator.log(values, step=step)

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        """An HxWx3 uint8 picture to the trackers that take images (tensorboard, wandb)."""
        for tracker in self.accelerator.trackers if self.report_to else []:
            if hasattr(tracker, "log_images"):
                kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
                tracker.log_images({name: image[None]}, step=step, **kwargs)

    def flush(self) -> None:
        if self.accelerator.is_main_process and self.rows:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
            self.rows = []

    def end(self) -> None:
        peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if torch.cuda.is_available():
            peak["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if self.accelerator.is_main_process:
            self.rows.append({"event": "end", "time": round(time.perf_counter() - self.start, 4), **peak})
        self.flush()
        if self.report_to:
            self.accelerator.end_training()


def publish(src: Path, dest: Path) -> None:
    """Copy a finished folder into place atomically (a reader never sees half of it)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
