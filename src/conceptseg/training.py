"""What the training commands (finetune, train-t2i, train-seg) share: the process's one
Accelerator, mixed precision per trainer, the optimiser step (`OptimiserSteps`: gradient
accumulation, clipping, EMA; a step is one optimiser update), checkpoints (`Checkpoints`: checked
against the run's settings before they resume, adapter-only for LoRA, the same decision on every
process, pruned), per-step data order, the training log.

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

from conceptseg.io import write_json


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

    def unscale(self, optimizer) -> None:
        """Gradients back to their true size before clipping (fp16 scales them up)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def state(self) -> dict:
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_state(self, state: dict) -> None:
        if self.scaler and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


class OptimiserSteps:
    """The optimiser side of every trainer's loop, one definition. A training step is one optimiser
    update, as in diffusers' scripts: `accumulation` micro-batches, each run inside
    `micro_batch(i, models)` and passed to `backward` (scaled under fp16; accelerate divides it by
    the accumulation), then `update()`: gradients unscaled (fp16), clipped to `max_grad_norm`
    (diffusers' default 1.0; None: not clipped), the optimiser and the learning-rate schedule step,
    gradients zeroed, the EMA follows. A micro-batch whose loss was not finite adds no gradient; an
    update with none that did is skipped."""

    def __init__(self, accelerator: Accelerator, precision: Precision, optimizer, params: list, accumulation: int = 1,
                 max_grad_norm: float | None = None, ema=None, lr_scheduler=None):
        if accumulation < 1:
            raise ValueError(f"gradient accumulation must be at least 1, got {accumulation}")
        self.accelerator, self.precision, self.optimizer, self.params = accelerator, precision, optimizer, params
        self.accumulation, self.max_grad_norm, self.ema, self.lr_scheduler = accumulation, max_grad_norm, ema, lr_scheduler
        self.accelerator.gradient_accumulation_steps = accumulation
        self.pending = False

    def micro_batch(self, i: int, *models):
        """Micro-batch `i` (0-based) of an update: gradients sync (DDP) at the last one."""
        if i == 0:
            self.accelerator.step = 0  # accelerate syncs when its counter reaches the accumulation
        return self.accelerator.accumulate(*models)

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.backward(self.accelerator, loss)
        self.pending = True

    def update(self) -> bool:
        """The end of an accumulation; whether the optimiser stepped."""
        if not self.accelerator.sync_gradients:
            raise RuntimeError(f"update() after a micro-batch that does not end an accumulation of {self.accumulation}")
        stepped = self.pending
        if stepped:
            if self.max_grad_norm is not None:
                self.precision.unscale(self.optimizer)
                self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
            self.precision.step(self.optimizer)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        self.optimizer.zero_grad()
        if stepped and self.ema is not None:
            self.ema.step(self.params)
        self.pending = False
        return stepped


def with_ema_weights(ema, params: list, fn) -> None:
    """`fn()` with the EMA weights in the trained parameters, then the trained weights back."""
    ema.store(params)
    ema.copy_to(params)
    try:
        fn()
    finally:
        ema.restore(params)


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


class CheckpointMismatch(ValueError):
    """A checkpoint in OUT was made with settings that change what training gives."""


# settings a checkpoint is not checked against: `steps` may grow (the run continues), `out` may move
UNCHECKED_SETTINGS = ("steps", "out")
_DIGEST_OVER = 2000  # characters of JSON: a longer value (a pipeline's sample list) is recorded as its digest


def checkpoint_settings(config, out: Path, after_training: tuple[str, ...] = (), **resolved) -> dict:
    """What a checkpoint records and a resume compares: the config's output settings
    (`settings.output_settings`, the one definition of what changes outputs), with the values the
    trainer resolved (`resolved`: a default learning rate, the model's source) in place, paths
    relative to the folder holding OUT, less `UNCHECKED_SETTINGS` and the settings of what is made
    `after_training` from the checkpoints (a sample grid, say)."""
    import hashlib

    from conceptseg.settings import stage_settings

    unchecked = set(UNCHECKED_SETTINGS) | set(after_training)
    settings = {k: v for k, v in stage_settings(config, out, **resolved).items() if k not in unchecked}
    for k, v in settings.items():
        text = json.dumps(v, sort_keys=True, default=str)
        if len(text) > _DIGEST_OVER:
            settings[k] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return json.loads(json.dumps(settings, default=str))  # as state.json will read back


def all_ranks(accelerator: Accelerator, ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return ok
    return bool(accelerator.gather(torch.tensor([int(ok)], device=accelerator.device)).min())


ADAPTERS_FILE = "adapters.safetensors"


@contextlib.contextmanager
def adapter_checkpoints(accelerator: Accelerator, module: torch.nn.Module) -> Iterator[None]:
    """While open, accelerate's checkpoints hold `module`'s peft adapters (ADAPTERS_FILE) in place of
    the whole module: its frozen base is the model it was loaded from, and each resume loads it from
    there again (diffusers' LoRA scripts register the same save and load hooks). The optimiser, EMA
    and gradient-scaler states cover the trainable parameters alone, the adapters."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    def ours(models) -> list[int]:
        return [i for i, m in enumerate(models) if accelerator.unwrap_model(m) is module]

    def save(models, weights, output_dir):
        for i in reversed(ours(models)):
            weights.pop(i)
            if accelerator.is_main_process:
                adapters = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}
                save_file(adapters, Path(output_dir) / ADAPTERS_FILE)

    def load(models, input_dir):
        for i in reversed(ours(models)):
            models.pop(i)
            path = Path(input_dir) / ADAPTERS_FILE
            saved, expected = load_file(path), get_peft_model_state_dict(module)
            if saved.keys() != expected.keys():
                raise ValueError(f"{path}: its adapters are not this model's ({len(saved)} tensors, {len(expected)} expected)")
            set_peft_model_state_dict(module, saved)

    handles = [accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Checkpoints:
    """OUT/checkpoints/step-N of one trainer: accelerate's state (models, optimiser, scheduler, RNG;
    for LoRA the adapters alone: `adapter_checkpoints`), the EMA weights, then state.json last (a
    checkpoint without it is incomplete and ignored), recording `settings`. A resume validates the
    newest checkpoint against this run's settings before loading it, and a load that fails on any
    process fails on all of them. Only the `total_limit` newest are kept (diffusers'
    `checkpoints_total_limit`; None keeps all). The model itself is exported once, at the end."""

    def __init__(self, accelerator: Accelerator, out: Path, settings: dict, ema=None, total_limit: int | None = 2):
        self.accelerator, self.out, self.settings, self.ema, self.total_limit = accelerator, Path(out), settings, ema, total_limit

    def save(self, step: int, extra: dict | None = None) -> Path:
        accelerator, dest = self.accelerator, checkpoint_dir(self.out, step)
        if accelerator.is_main_process:
            shutil.rmtree(dest, ignore_errors=True)  # a half-written one from a killed run
        accelerator.wait_for_everyone()
        accelerator.save_state(str(dest / "accelerate"))
        if accelerator.is_main_process:
            state = {"step": step, "settings": self.settings, **(extra or {})}
            if self.ema is not None:
                save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)},
                          dest / "ema.safetensors")
                state["ema_optimization_step"] = self.ema.optimization_step
            write_json(dest / "state.json", state)
            prune_checkpoints(self.out, self.total_limit)
        accelerator.wait_for_everyone()
        return dest

    def check(self, ckpt: Path, state: dict, steps: int) -> None:
        """Refuse a checkpoint made with other settings, or past the run's last step."""
        fix = f"use another output folder, or remove {ckpt.parent} to train from the start"
        if state["step"] > steps:
            raise CheckpointMismatch(f"checkpoint {ckpt} is at step {state['step']}, past this run's steps={steps}: "
                                     f"raise steps to at least {state['step']}, or {fix}")
        recorded = state.get("settings")
        if recorded is None:  # made before checkpoints recorded their settings: nothing to compare
            return
        changed = sorted(k for k in set(recorded) | set(self.settings) if recorded.get(k) != self.settings.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {recorded.get(k)!r} there, {self.settings.get(k)!r} now" for k in changed)
            raise CheckpointMismatch(f"checkpoint {ckpt} was made with other settings ({diffs}): it cannot continue "
                                     f"this run; go back to those settings, or {fix}")

    def _load(self, ckpt: Path, state: dict) -> str | None:
        """Load one checkpoint on this process; what went wrong, or None."""
        try:
            self.accelerator.load_state(str(ckpt / "accelerate"))
            if self.ema is not None:
                shadow = load_file(ckpt / "ema.safetensors")
                self.ema.shadow_params = [shadow[str(i)].to(self.accelerator.device) for i in range(len(shadow))]
                self.ema.optimization_step = state["ema_optimization_step"]
        except Exception as e:  # safetensors, torch and accelerate each raise their own types for a bad file
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    def resume(self, steps: int) -> tuple[int, dict]:
        """Load the newest checkpoint that loads, if any: (step to start from, its state.json). It
        must have been made with this run's settings (`steps` may have grown: the run continues).
        A damaged one (truncated weights, missing state) is named, set aside as `<name>.damaged`, and
        the one before it is used; if none loads, this stops (a partly loaded model must not train on)."""
        accelerator, damaged = self.accelerator, []
        for ckpt in reversed(complete_checkpoints(self.out)):
            try:
                state = json.loads((ckpt / "state.json").read_text())
            except (OSError, ValueError) as e:
                problem = f"state.json: {e}"
            else:
                self.check(ckpt, state, steps)
                problem = self._load(ckpt, state)
            if all_ranks(accelerator, problem is None):
                accelerator.print(f"resumed from {ckpt} at step {state['step']}")
                return state["step"], state
            accelerator.print(f"checkpoint {ckpt} is damaged ({problem or 'on another process'}); using the one before it")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                ckpt.rename(ckpt.with_name(ckpt.name + ".damaged"))
            accelerator.wait_for_everyone()
            damaged.append(str(ckpt))
        if damaged:
            raise RuntimeError(f"no checkpoint in {self.out / 'checkpoints'} loads (damaged: {', '.join(damaged)}); "
                               "remove that folder to train from the start")
        return 0, {}


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
