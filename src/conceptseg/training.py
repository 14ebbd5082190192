"""What the training commands share: the process's one Accelerator, mixed precision per trainer,
the diffusion target, checkpoints that resume (the newest loadable one) and are pruned, per-step
data order, the training log.

accelerate keeps one `AcceleratorState` per process and refuses a second `Accelerator` with another
mixed precision, yet `conceptseg run` fine-tunes in bf16 and trains segmenters in fp32 in one
process. So every trainer borrows the one Accelerator (`trainer_accelerator`: its device, DDP,
gradient accumulation and checkpoint state, with the previous trainer's objects released) and
brings its own `Precision` (autocast, and a gradient scaler for fp16).
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from accelerate import Accelerator

from conceptseg.io import publish, write_folder, write_json  # noqa: F401  (trainers import them from here)


@lru_cache(maxsize=1)
def _process_accelerator() -> Accelerator:
    # mixed precision "no" whatever `accelerate launch` says: each trainer autocasts by its own setting
    return Accelerator(mixed_precision="no")


@contextlib.contextmanager
def trainer_accelerator(gradient_accumulation: int = 1) -> Iterator[Accelerator]:
    """The process's Accelerator for one trainer, holding none of another trainer's models or
    optimisers (so its checkpoints hold only this trainer's state)."""
    accelerator = _process_accelerator()
    accelerator.free_memory()
    accelerator.gradient_accumulation_steps = gradient_accumulation
    try:
        yield accelerator
    finally:
        accelerator.free_memory()


MIXED_PRECISION = ("no", "fp16", "bf16")


class Precision:
    """One trainer's mixed precision: autocast of its forward passes (weights stay fp32, as with
    accelerate's native AMP) and, for fp16, a gradient scaler whose state goes into checkpoints."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in MIXED_PRECISION:
            raise ValueError(f"mixed precision must be one of {MIXED_PRECISION}, not {mode!r}")
        self.mode, self.device = mode, torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type) if mode == "fp16" else None

    def autocast(self):
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.mode == "bf16" else torch.float16)

    def backward(self, accelerator: Accelerator, loss: torch.Tensor) -> None:
        accelerator.backward(self.scaler.scale(loss) if self.scaler else loss)

    def step(self, optimizer) -> None:
        """The optimiser step; call it only when gradients are synced (the end of an accumulation)."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state(self) -> dict:
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_state(self, state: dict) -> None:
        if self.scaler and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) in the form for the model's prediction type."""
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    clipped = torch.clamp(snr, max=gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1)}.get(prediction_type, clipped)


NONFINITE_LOSS = ("stop", "skip")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


def check_finite(loss: torch.Tensor, step: int, out: Path, policy: str, accelerator: Accelerator) -> bool:
    """Whether this batch's loss is finite on every process. If not: with policy "skip", say so and
    return False (the caller skips the batch); with "stop", raise naming the step and the last good
    checkpoint, before a NaN reaches the weights."""
    finite = torch.isfinite(loss.detach()).reshape(1)
    if accelerator.num_processes > 1:  # every process must skip together, or DDP waits forever
        finite = accelerator.gather(finite)
    if bool(finite.all()):
        return True
    if policy == "skip":
        accelerator.print(f"step {step}: loss is {loss.item()}, batch skipped")
        return False
    ckpt = last_checkpoint(out)
    raise NonFiniteLoss(f"step {step}: the loss is {loss.item()} (not finite); last good checkpoint: {ckpt or 'none'}. "
                        "A rerun resumes there; lower the learning rate, use bf16 or fp32 instead of fp16, or set "
                        "nonfinite_loss to 'skip' to drop such batches")


def step_rng(seed: int, stream: int, step: int, rank: int) -> np.random.Generator:
    """Randomness that depends only on (seed, stream, step, process): a resumed run draws the same data."""
    return np.random.default_rng([seed, stream, step, rank])


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (their state.json is written last), oldest first."""
    found = [c for c in (Path(out) / "checkpoints").glob("step-*") if (c / "state.json").exists() and c.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def last_checkpoint(out: Path) -> Path | None:
    ckpts = complete_checkpoints(out)
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, ema=None, extra: dict | None = None,
                    total_limit: int | None = 2) -> Path:
    """accelerate state (models, optimiser, scheduler, RNG), the EMA weights, then state.json last (a
    checkpoint without it is incomplete and ignored); then only the `total_limit` newest are kept
    (diffusers' `checkpoints_total_limit`; None keeps all). The model itself is exported once, at the end."""
    dest = checkpoint_dir(out, step)
    if accelerator.is_main_process:
        shutil.rmtree(dest, ignore_errors=True)  # a half-written one from a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(dest / "accelerate"))
    if accelerator.is_main_process:
        state = {"step": step, **(extra or {})}
        if ema is not None:
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, dest / "ema.safetensors")
            state["ema_optimization_step"] = ema.optimization_step
        write_json(dest / "state.json", state)
        prune_checkpoints(out, total_limit)
    accelerator.wait_for_everyone()
    return dest


def prune_checkpoints(out: Path, total_limit: int | None) -> None:
    """Remove all but the `total_limit` newest complete checkpoints, and incomplete ones older than the newest."""
    complete = complete_checkpoints(out)
    if not complete:
        return
    newest = int(complete[-1].name[5:])
    stale = [c for c in (Path(out) / "checkpoints").glob("step-*") if c not in complete and c.name[5:].isdigit() and int(c.name[5:]) < newest]
    if total_limit is not None:
        stale += complete[: max(0, len(complete) - max(1, total_limit))]
    for c in stale:
        shutil.rmtree(c, ignore_errors=True)


def resume(accelerator: Accelerator, out: Path, ema=None) -> tuple[int, dict]:
    """Load the newest checkpoint that loads, if any: (step to start from, its state.json). A
    damaged one (truncated weights, missing state) is named, set aside as `<name>.damaged`, and the
    one before it is used; if none loads, this stops (a partly loaded model must not train on)."""
    damaged = []
    for ckpt in reversed(complete_checkpoints(out)):
        try:
            accelerator.load_state(str(ckpt / "accelerate"))
            state = json.loads((ckpt / "state.json").read_text())
            if ema is not None:
                shadow = load_file(ckpt / "ema.safetensors")
                ema.shadow_params = [shadow[str(i)].to(accelerator.device) for i in range(len(shadow))]
                ema.optimization_step = state["ema_optimization_step"]
        except Exception as e:  # safetensors, torch and accelerate each raise their own types for a bad file
            accelerator.print(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "using the one before it")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                ckpt.rename(ckpt.with_name(ckpt.name + ".damaged"))
            accelerator.wait_for_everyone()
            damaged.append(str(ckpt))
            continue
        accelerator.print(f"resumed from {ckpt} at step {state['step']}")
        return state["step"], state
    if damaged:
        raise RuntimeError(f"no checkpoint in {Path(out) / 'checkpoints'} loads (damaged: {', '.join(damaged)}); "
                           "remove that folder to train from the start")
    return 0, {}


class TrainLog:
    """OUT/train_log.jsonl: one line per step (loss, seconds since this process started training) and
    an end line with peak memory; appended, so a resumed run continues it. With `report_to`
    ("tensorboard", "wandb", ...: accelerate's tracker classes) the values also go to that tracker,
    on the main process, logging into OUT."""

    def __init__(self, accelerator: Accelerator, out: Path, project: str, report_to: str | None = None):
        self.accelerator, self.path = accelerator, Path(out) / "train_log.jsonl"
        self.rows: list[dict] = []
        self.start = time.perf_counter()
        self.tracker = None
        if report_to and accelerator.is_main_process:
            from accelerate.tracking import LOGGER_TYPE_TO_CLASS

            if report_to not in LOGGER_TYPE_TO_CLASS:
                raise ValueError(f"unknown tracker {report_to!r}; accelerate knows {sorted(LOGGER_TYPE_TO_CLASS)}")
            cls = LOGGER_TYPE_TO_CLASS[report_to]
            self.tracker = cls(project, str(out)) if cls.requires_logging_directory else cls(project)
            self.tracker.start()

    def step(self, step: int, **values: float) -> None:
        if self.accelerator.is_main_process:
            self.rows.append({"step": step, "time": round(time.perf_counter() - self.start, 4), **values})
        if self.tracker:
            self.tracker.log(values, step=step)

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        """An HxWx3 uint8 picture to a tracker that takes images (tensorboard, wandb)."""
        if self.tracker and hasattr(self.tracker, "log_images"):
            kwargs = {"dataformats": "NHWC"} if self.tracker.name == "tensorboard" else {}
            self.tracker.log_images({name: image[None]}, step=step, **kwargs)

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
        if self.tracker:
            self.tracker.finish()
