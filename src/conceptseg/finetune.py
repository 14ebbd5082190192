"""Stage 2: concept distillation, fine-tuning the diffusion model to inpaint background (METHOD.md §2).

Per sample, with probability 0.5: the concept prompt y_f and the denoising loss over the whole
latent (ordinary fine-tuning); otherwise the background prompt y_b and the loss only on the
BACKGROUND pixels of a random rectangle drawn from M_pre with the published rejection rules. The
masked loss is mean over c,h,w of ((pred - target) * m)^2: divided by every position, not by the
mask area. pred and target are the model family's own (`model.objective`): epsilon (or v) on DDPM
timesteps for SD 1.x/2.x and SDXL, the velocity on the flow's sigmas for SD 3.x and FLUX.1.
Images and M_pre are augmented jointly (short side to the model's resolution, random crop, flip;
the mask comes to the latent grid by 8x8 mean-pool + round). The whole denoiser (UNet or
transformer) is trained (the paper) or LoRA adapters (peft); VAE and text encoders are frozen; EMA
on; AdamW 1e-4 constant (a rate that does not depend on `steps`, so a run whose `steps` grows
continues from its last checkpoint); gradients unclipped as in the paper's code (`max_grad_norm`
clips them; diffusers' scripts use 1). A step is one optimiser update (of `gradient_accumulation` micro-batches).

Memory, as diffusers' scripts keep it (`residency`): the frozen VAE and text encoders in the weight
dtype (the mixed-precision dtype, fp32 without); both prompts' conditioning computed once, then the
text encoders leave the device before the first step; activations checkpointed (`gradient_checkpointing`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from conceptseg.geometry import image_size, load_mask_file, load_rgb
from conceptseg.data.readers import list_samples
from conceptseg.io import save_png, write_folder, write_json
from conceptseg.families.base import DiffusionModel, lora_targets, select_rows
from conceptseg.models import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, load_model, resolve_dtype
from conceptseg.pictures import picture_grid
from conceptseg.schedules import TrainingBatch
from conceptseg.settings import added_setting, execution_setting
from conceptseg.training import (NONFINITE_LOSS, Checkpoints, OptimiserSteps, Precision, TrainLog, adapter_checkpoints,
                                 check_finite, checkpoint_settings, step_rng, trainer_accelerator, with_ema_weights)

BACKGROUND_PROMPT = "a photo of a background"
# the attention projections `--method lora` adapts (every family names them so); `plan` counts their parameters


# ---------------------------------------------------------------- the background rectangle

@dataclass(frozen=True)
class BoxRules:
    """The published rejection rules, on a 64x64 latent grid; other grids scale them by side/64."""

    min_side: float = 10  # reject a side <= this
    min_area: float = 16**2
    max_area: float = 32**2
    max_both_sides: float = 32  # reject w > this and h > this
    min_background: float = 2 / 3
    max_tries: int = 100

    def scaled(self, side: int) -> "BoxRules":
        s = side / 64
        return BoxRules(self.min_side * s, self.min_area * s * s, self.max_area * s * s, self.max_both_sides * s,
                        self.min_background, self.max_tries)

    def accepts(self, h: int, w: int, background_share: float) -> bool:
        area = h * w
        return not (h <= self.min_side or w <= self.min_side or area < self.min_area or area > self.max_area
                    or (w > self.max_both_sides and h > self.max_both_sides) or background_share < self.min_background)


def sample_background_box(foreground: np.ndarray, rng: np.random.Generator, rules: BoxRules | None = None) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), inclusive, of a box whose opposite corners are two random background pixels
    and which obeys every rule; None when `max_tries` draws all broke a rule (or there is no background)."""
    bg = ~np.asarray(foreground, dtype=bool)
    rules = (rules or BoxRules()).scaled(bg.shape[0])
    ys, xs = np.nonzero(bg)
    if len(ys) == 0:
        return None
    for _ in range(rules.max_tries):
        a, b = rng.integers(0, len(ys), 2)
        y0, y1 = sorted((int(ys[a]), int(ys[b])))
        x0, x1 = sorted((int(xs[a]), int(xs[b])))
        if rules.accepts(y1 - y0 + 1, x1 - x0 + 1, bg[y0 : y1 + 1, x0 : x1 + 1].mean()):
            return y0, y1, x0, x1
    return None


def background_box_mask(foreground: np.ndarray, rng: np.random.Generator, rules: BoxRules | None = None) -> np.ndarray:
    """The loss mask of the background branch: the background pixels inside a random box, or the
    whole background when no box obeys the rules (the published fallback). Never a foreground pixel."""
    bg = ~np.asarray(foreground, dtype=bool)
    box = sample_background_box(foreground, rng, rules)
    if box is None:
        return bg
    y0, y1, x0, x1 = box
    out = np.zeros_like(bg)
    out[y0 : y1 + 1, x0 : x1 + 1] = bg[y0 : y1 + 1, x0 : x1 + 1]
    return out


def training_targets(foreground: torch.Tensor, rng: np.random.Generator, background_probability: float = 0.5,
                     rules: BoxRules | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Per sample: whether it takes the background branch, and its loss mask (B, 1, h, w): all ones
    for the concept branch, `background_box_mask` for the background branch."""
    n = foreground.shape[0]
    background = rng.random(n) < background_probability
    loss_mask = torch.ones(n, 1, *foreground.shape[-2:])
    for i in np.nonzero(background)[0]:
        loss_mask[i, 0] = torch.from_numpy(background_box_mask(foreground[i].numpy(), rng, rules))
    return background, loss_mask


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample: mean over (c, h, w) of ((pred - target) * mask)^2, divided by ALL positions."""
    return (((pred.float() - target.float()) * mask) ** 2).mean(dim=(1, 2, 3))


def denoising_loss(model: DiffusionModel, module, batch: TrainingBatch, cond, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per sample: `masked_loss` of `module`'s prediction on the batch's noised latents against the
    target of the model's own objective (epsilon or v by the scheduler's `prediction_type` for SD 1.x,
    2.x and SDXL; the velocity eps - z0 for SD 3.x and FLUX.1), times the objective's weight."""
    pred = model.denoise(batch.noisy, batch.levels, cond, module=module)
    return masked_loss(pred, batch.target, loss_mask) * batch.weight


# ---------------------------------------------------------------- data

@dataclass
class FinetuneSample:
    image: np.ndarray  # HxWx3 uint8 at the model resolution
    mask_latent: np.ndarray  # bool, latent grid


def augment(image: Image.Image, mask: np.ndarray, resolution: int, factor: int, rng: np.random.Generator) -> FinetuneSample:
    """Short side to `resolution` (bicubic; the mask nearest), random crop, random flip, jointly;
    the mask to the latent grid by factor x factor mean-pool + round."""
    scale = resolution / min(image.width, image.height)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    im = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
    top, left = rng.integers(0, h - resolution + 1), rng.integers(0, w - resolution + 1)
    im, m = im[top : top + resolution, left : left + resolution], m[top : top + resolution, left : left + resolution]
    if rng.random() < 0.5:
        im, m = im[:, ::-1], m[:, ::-1]
    lat = resolution // factor
    pooled = m.reshape(lat, factor, lat, factor).mean(axis=(1, 3))
    return FinetuneSample(np.ascontiguousarray(im), np.round(pooled) >= 1)


@dataclass
class TrainingPair:
    image: Path
    mask: Path


def collect_pairs(images, prelim_dir: Path, split: str = "all") -> tuple[list[TrainingPair], list[str]]:
    """Images with a usable stage-1 mask (found by the sample's key); the problems of the rest, each naming the file."""
    pairs, problems = [], []
    for s in list_samples(images, split):
        mask_path = Path(prelim_dir) / "masks" / f"{s.key}.png"
        if not mask_path.exists():
            problems.append(f"{s.image}: no preliminary mask ({mask_path} missing; run `conceptseg prelim` first)")
            continue
        try:
            size = image_size(s.image)  # upright, as stage 1 wrote its mask
            mask = load_mask_file(mask_path)
        except (OSError, SyntaxError, ValueError) as e:
            problems.append(f"{s.image}: unreadable image or mask ({e})")
            continue
        msize = (mask.shape[1], mask.shape[0])
        if msize != size:
            problems.append(f"{s.image}: mask {mask_path.name} is {msize[0]}x{msize[1]}, image is {size[0]}x{size[1]}")
        elif mask.all():
            problems.append(f"{s.image}: the preliminary mask is all foreground (no background to learn from)")
        else:
            pairs.append(TrainingPair(s.image, mask_path))
    return pairs, problems


# ---------------------------------------------------------------- training

@dataclass
class FinetuneConfig:
    concept: Sequence[str] | str
    images: str | Path | Sequence[Path]  # a folder, a dataset spec (with `split`) or a list of files
    prelim: Path
    out: Path
    model: str | None = None
    split: str = "all"
    prompt: str | None = None  # y_f; default "a photo of a {concept}"
    background_prompt: str = BACKGROUND_PROMPT
    steps: int = 1000  # optimiser steps
    batch_size: int = 4  # per micro-batch (and process)
    lr: float = 1e-4
    background_probability: float = 0.5
    ema_decay: float = 0.9999
    method: str = "full"  # "full" (the paper) or "lora"
    lora_rank: int = 8
    mixed_precision: str = "no"
    gradient_accumulation: int = 1  # micro-batches per optimiser step
    # clip gradients to this norm; None (the paper's reference code, and what earlier runs did): no
    # clipping; 1.0 is diffusers' training scripts' default
    max_grad_norm: float | None = added_setting(None)
    # recompute the denoiser's activations in the backward pass instead of keeping them (diffusers'
    # --gradient_checkpointing): a fraction of the activation memory for one more forward pass per
    # step, the same gradients up to float rounding, so an execution setting. On by default: at
    # the published resolutions activations dominate memory (docs/plan.md); False is faster where it fits
    gradient_checkpointing: bool = execution_setting(True)
    optimizer: str = "adamw"  # adamw | adamw-fused | adamw-8bit
    # >0: precompute this many augmented views per image and encode them once (faster), then train on
    # those fixed views instead of a fresh random crop and flip of each image at every step: other
    # training data, so it is an output setting (0: a fresh view each step, the paper's augmentation)
    latent_cache: int = 0
    checkpoint_every: int = execution_setting(250)
    checkpoints_total_limit: int | None = execution_setting(2)  # keep the newest N checkpoints (None: all)
    nonfinite_loss: str = "stop"  # "stop": a NaN/inf loss ends training with a named error; "skip": that batch is skipped
    report_to: str | None = execution_setting(None)  # an accelerate tracker: "tensorboard", "wandb", ...
    seed: int = 0
    progress: bool = execution_setting(True)

    def __post_init__(self):
        self.concept = [self.concept] if isinstance(self.concept, str) else list(self.concept)
        if self.method not in ("full", "lora"):
            raise ValueError(f"method must be 'full' or 'lora', not {self.method!r}")
        if self.steps < 1:
            raise ValueError(f"fine-tuning needs at least 1 step, got steps={self.steps}")
        if self.gradient_accumulation < 1:
            raise ValueError(f"gradient_accumulation must be at least 1, got {self.gradient_accumulation}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None (no clipping), not {self.max_grad_norm}")
        if self.nonfinite_loss not in NONFINITE_LOSS:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_LOSS}, not {self.nonfinite_loss!r}")

    @property
    def concept_prompt(self) -> str:
        return self.prompt or f"a photo of a {self.concept[0]}"


def training_dtypes(cfg: FinetuneConfig) -> tuple[torch.dtype, torch.dtype]:
    """(the denoiser's dtype, the frozen parts' dtype) while training, as diffusers' scripts hold them.
    The weight dtype is the mixed-precision dtype (fp32 without); the frozen VAE and text encoders are
    in it. A full fine-tune's denoiser keeps fp32 weights (autocast computes in the weight dtype);
    LoRA's frozen base is in the weight dtype (FLUX.1: 24 GB, not 48), its adapters fp32."""
    weight = torch.float32 if cfg.mixed_precision == "no" else resolve_dtype(cfg.mixed_precision, torch.device("cpu"))
    return (torch.float32 if cfg.method == "full" else weight), weight


FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu")  # where torch's AdamW has a fused kernel


def make_optimizer(params, cfg: FinetuneConfig, device: torch.device):
    if cfg.optimizer == "adamw-8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--optimizer adamw-8bit needs bitsandbytes (pip install 'conceptseg[adam8bit]')") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr)
    if cfg.optimizer == "adamw-fused":  # one kernel, no foreach temporary (what `plan` counts); the CPU has one too
        return torch.optim.AdamW(params, lr=cfg.lr, fused=device.type in FUSED_ADAMW_DEVICES)
    return torch.optim.AdamW(params, lr=cfg.lr)


def trainable_parameters(denoiser, cfg: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Put the denoiser in training mode, the whole of it (the paper) or LoRA adapters on its
    attention projections (`families.base.lora_targets`); its trainable parameters."""
    if cfg.method == "lora":
        from peft import LoraConfig

        from diffusers.training_utils import cast_training_params

        with torch.random.fork_rng():  # the adapters' random start is the run's seed's, so runs repeat
            torch.manual_seed(cfg.seed)
            denoiser.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                            target_modules=lora_targets(denoiser)))
        cast_training_params(denoiser, torch.float32)  # the adapters train in fp32 whatever the base's dtype
    else:
        denoiser.requires_grad_(True)
    denoiser.train()
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    return [p for p in denoiser.parameters() if p.requires_grad]


class _Batches:
    """Augmented (image, M_pre) batches, from disk each step or from a cache of encoded views."""

    def __init__(self, pairs: list[TrainingPair], model: DiffusionModel, cfg: FinetuneConfig, rank: int):
        self.pairs, self.model, self.cfg, self.rank = pairs, model, cfg, rank
        self.cache = None
        if cfg.latent_cache > 0:
            lat, masks = [], []
            for v in tqdm(range(cfg.latent_cache), desc="encode views", disable=not cfg.progress, leave=False):
                for i in range(len(pairs)):
                    s = self._sample(i, np.random.default_rng([cfg.seed, 9, v, i]))
                    lat.append(model.encode_images(s.image[None]).cpu())
                    masks.append(torch.from_numpy(s.mask_latent))
            self.cache = torch.cat(lat), torch.stack(masks)

    def _sample(self, i: int, rng) -> FinetuneSample:
        pair = self.pairs[i]
        image = load_rgb(pair.image)
        return augment(image, load_mask_file(pair.mask), self.model.resolution, self.model.vae_scale_factor, rng)

    def __call__(self, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor, np.random.Generator]:
        """Micro-batch `micro_batch` (counted over the run: step x accumulation + i)."""
        rng = step_rng(self.cfg.seed, 3, micro_batch, self.rank)
        if self.cache is not None:
            idx = torch.from_numpy(rng.integers(0, len(self.cache[0]), self.cfg.batch_size))
            return self.cache[0][idx], self.cache[1][idx], rng
        samples = [self._sample(int(i), rng) for i in rng.integers(0, len(self.pairs), self.cfg.batch_size)]
        latents = self.model.encode_images(np.stack([s.image for s in samples])).cpu()
        return latents, torch.from_numpy(np.stack([s.mask_latent for s in samples])), rng


def finetune(cfg: FinetuneConfig, model: DiffusionModel | None = None) -> Path:
    """Train, checkpoint, resume; returns OUT/model (a diffusers folder, or LoRA weights + base reference).

    `model`: the base model already loaded on the training device in the denoiser's training dtype
    (`training_dtypes`), handed over: it is trained in place and its text encoders leave the device,
    so the caller must not use it again. None: loaded from `cfg.model`."""
    with trainer_accelerator(cfg.gradient_accumulation) as accelerator:
        return _finetune(cfg, accelerator, model)


def training_model(cfg: FinetuneConfig, device: torch.device, model: DiffusionModel | None = None):
    """(the base model as training holds it, the conditioning of [concept prompt, background prompt]).
    Loaded once (or `model`, handed over); frozen parts in the weight dtype; both prompts encoded
    once; then the text encoders leave the device before the first step: to the CPU for a full
    fine-tune, which exports them, dropped for LoRA, which exports only its adapters."""
    denoiser_dtype, weight_dtype = training_dtypes(cfg)
    device = torch.device(device)
    if model is None:  # loaded on the CPU and cast there: the frozen parts reach the device in the weight dtype only
        model = load_model(cfg.model, device="cpu", dtype=denoiser_dtype)
    elif model.device.type != device.type or model.dtype != denoiser_dtype:
        raise ValueError(f"finetune was handed {model.source} on {model.device} in {model.dtype}; it trains on {device} "
                         f"in {denoiser_dtype}: hand it over loaded so, or pass none to load it")
    model.cast_frozen(weight_dtype)
    model.to(device)
    cond = model.conditioning([cfg.concept_prompt, cfg.background_prompt])
    model.offload_text_encoders(keep=cfg.method == "full")
    return model, cond


def _finetune(cfg: FinetuneConfig, accelerator, model: DiffusionModel | None = None) -> Path:
    out = Path(cfg.out)
    pairs, problems = collect_pairs(cfg.images, cfg.prelim, cfg.split)
    for msg in problems:
        accelerator.print(f"skipped {msg}")
    if not pairs:
        raise ValueError(f"no image in {cfg.images} has a usable preliminary mask in {cfg.prelim}")
    model, cond = training_model(cfg, accelerator.device, model)
    accelerator.print(f"finetune: {model.describe()}")
    denoiser = model.denoiser  # the UNet, or the transformer of SD 3.x / FLUX.1
    params = trainable_parameters(denoiser, cfg)
    optimizer = make_optimizer(params, cfg, accelerator.device)
    ema = EMAModel(params, decay=cfg.ema_decay)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "finetune_config.json", {**asdict(cfg), "base_model": model.source, "pairs": len(pairs), "skipped": problems})
    denoiser_p, optimizer = accelerator.prepare(denoiser, optimizer)
    ema.to(accelerator.device)
    precision = Precision(cfg.mixed_precision, accelerator.device)
    updates = OptimiserSteps(accelerator, precision, optimizer, params, cfg.gradient_accumulation, cfg.max_grad_norm, ema)
    checkpoints = Checkpoints(accelerator, out, checkpoint_settings(cfg, out, model=model.source), ema,
                              cfg.checkpoints_total_limit)
    with adapter_checkpoints(accelerator, denoiser) if cfg.method == "lora" else contextlib.nullcontext():
        _train(cfg, model, cond, pairs, denoiser_p, updates, checkpoints)

    final = out / "model"
    if accelerator.is_main_process:  # the EMA weights, exported once
        with_ema_weights(ema, params, lambda: write_folder(
            final, lambda tmp: save_finetuned(accelerator.unwrap_model(denoiser_p), model, cfg, tmp)))
    accelerator.wait_for_everyone()
    return final


def _train(cfg: FinetuneConfig, model: DiffusionModel, cond, pairs: list[TrainingPair], denoiser_p, updates: OptimiserSteps,
           checkpoints: Checkpoints) -> None:
    """The loop: from the last checkpoint (validated against `cfg`) to `cfg.steps` optimiser steps;
    `cond`: the conditioning of [concept prompt, background prompt] (`training_model`)."""
    accelerator, out = updates.accelerator, checkpoints.out
    start, state = checkpoints.resume(cfg.steps)
    updates.precision.load_state(state)
    objective = model.objective
    batches = _Batches(pairs, model, cfg, accelerator.process_index)
    log = TrainLog(accelerator, out, "finetune", cfg.report_to)

    def preview(step: int) -> None:
        picture = inpainting_preview(model, batches, select_rows(cond, torch.tensor([1])))
        save_png(out / "preview.png", picture)
        log.image("inpainting preview", picture, step)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="finetune",
               disable=not (cfg.progress and accelerator.is_main_process))
    for step in bar:
        losses = []
        for i in range(cfg.gradient_accumulation):
            latents, masks_fg, rng = batches(step * cfg.gradient_accumulation + i)
            background, loss_mask = training_targets(masks_fg, rng, cfg.background_probability)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            batch = objective.training_batch(latents.to(accelerator.device), gen)
            text = select_rows(cond, torch.from_numpy(background.astype(np.int64)))
            with updates.micro_batch(i, denoiser_p):
                with updates.precision.autocast():
                    loss = denoising_loss(model, denoiser_p, batch, text, loss_mask.to(accelerator.device)).mean()
                if check_finite(loss, step + 1, out, cfg.nonfinite_loss, accelerator):
                    updates.backward(loss)
                    losses.append(loss.item())
        if updates.update():
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            log.step(step + 1, loss=float(np.mean(losses)))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            log.flush()
            checkpoints.save(step + 1, updates.precision.state())
            if accelerator.is_main_process:
                with_ema_weights(updates.ema, updates.params, lambda: preview(step + 1))
    log.end()


def inpainting_preview(model: DiffusionModel, batches: "_Batches", background, count: int = 4, steps: int = 25) -> np.ndarray:
    """image | M_pre | foreground inpainted with the background prompt (`background`: its
    conditioning, computed before training), for a few training images."""
    from conceptseg.inpaint import inpaint_background

    was_training = model.denoiser.training
    model.denoiser.eval()
    try:
        samples = [batches._sample(i, np.random.default_rng([0, i])) for i in range(min(count, len(batches.pairs)))]
        z0 = model.encode_images(np.stack([s.image for s in samples]))
        region = torch.from_numpy(np.stack([s.mask_latent for s in samples]))
        filled = model.decode_latents(inpaint_background(model, z0, region, steps=steps, cond=background,
                                                         generator=torch.Generator().manual_seed(0)))
    finally:
        model.denoiser.train(was_training)
    return picture_grid([[s.image, s.mask_latent, f] for s, f in zip(samples, filled)], ["image", "M_pre", "inpainted"])


def save_finetuned(denoiser, base, cfg: FinetuneConfig, dest: Path) -> None:
    """Full: a complete diffusers folder of the base model's pipeline. LoRA: diffusers' LoRA weights
    file (plain `pipe.load_lora_weights(dest)` reads it) plus the base model it belongs to."""
    dest.mkdir(parents=True, exist_ok=True)
    if cfg.method == "lora":
        import diffusers
        from peft.utils import get_peft_model_state_dict

        from conceptseg.families import pipeline_name

        layers = {f"{base.denoiser_name}_lora_layers": get_peft_model_state_dict(denoiser)}
        getattr(diffusers, pipeline_name(base.family)).save_lora_weights(dest, **layers, weight_name=LORA_WEIGHTS_FILE,
                                                                         safe_serialization=True)
        write_json(dest / LORA_CONFIG_FILE, {"base_model": base.source, "weights": LORA_WEIGHTS_FILE, "rank": cfg.lora_rank})
    else:
        base.save_pretrained(dest, denoiser)

