"""Stage 1's noise levels and noising: the DDIM timestep grid (SD 1.x/2.x, SDXL) and the
flow-matching sigma grid (SD 3.x, FLUX.1, FLUX.2, Qwen-Image).

A DDPM-style model is noised as z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps at the T0 smallest
timesteps of the 50-step DDIM-uniform grid (METHOD.md §1). A rectified-flow model is noised as
z_s = (1 - s) z0 + s eps; its grid is either the T0 smallest sigmas of the family's default
sampler at 50 steps ("sampler": the scheduler's own shift, resolution-dependent for FLUX) or the
unshifted uniform flow-time grid s = k / 50 ("uniform").
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

GRID_STEPS = 50  # the paper's 50-step grid; T0 = 40 keeps its 40 smallest noise levels
SIGMA_GRIDS = ("sampler", "uniform")


def timestep_grid(t0: int = 40, num_inference_steps: int = GRID_STEPS, num_train_timesteps: int = 1000,
                  offset: int = 1) -> list[int]:
    """The t0 smallest timesteps of the DDIM-uniform grid (t = 1, 21, ..., 981 for 50 of 1000 steps)."""
    ratio = num_train_timesteps // num_inference_steps
    grid = [k * ratio + offset for k in range(num_inference_steps)]
    if not 1 <= t0 <= len(grid):
        raise ValueError(f"T0 must be between 1 and {len(grid)}, got {t0}")
    return grid[:t0]


def ddpm_noised(alphas_cumprod: torch.Tensor, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sqrt(abar_t) z0 + sqrt(1 - abar_t) eps in float32, one timestep per row."""
    abar = alphas_cumprod.to(latents.device, torch.float32)
    a = abar[t].view(-1, 1, 1, 1)
    return a.sqrt() * latents.float() + (1 - a).sqrt() * eps


def flow_noised(latents: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) z0 + sigma eps in float32, one sigma per row (rectified flow)."""
    s = sigma.to(latents.device, torch.float32).view(-1, 1, 1, 1)
    return (1 - s) * latents.float() + s * eps


def flow_shift_mu(image_seq_len: int, config) -> float:
    """The resolution-dependent shift `mu` of a dynamically shifted flow scheduler (FLUX), as its pipeline forms it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def flow_sigma_grid(scheduler, t0: int, grid: str = "sampler", image_seq_len: int | None = None,
                    explicit_sigmas: bool = False, mu: float | None = None) -> list[float]:
    """The t0 smallest sigmas, ascending.

    "sampler": the scheduler's own 50-step grid as its pipeline sets it (`explicit_sigmas`: FLUX's
    pipeline passes sigmas = linspace(1, 1/50, 50) to be shifted; when the scheduler shifts
    dynamically, `mu` as given (FLUX.2's pipeline computes its own) or else from `image_seq_len`).
    "uniform": s = k / 50, k = 1..50, no shift.
    """
    if grid not in SIGMA_GRIDS:
        raise ValueError(f"unknown sigma grid {grid!r}; use one of {', '.join(SIGMA_GRIDS)}")
    if not 1 <= t0 <= GRID_STEPS:
        raise ValueError(f"T0 must be between 1 and {GRID_STEPS}, got {t0}")
    if grid == "uniform":
        return [k / GRID_STEPS for k in range(1, t0 + 1)]
    sched = copy.deepcopy(scheduler)  # set_timesteps mutates the scheduler
    kwargs = {}
    if sched.config.get("use_dynamic_shifting"):
        if mu is None and image_seq_len is None:
            raise ValueError("a dynamically shifted scheduler needs the image sequence length")
        kwargs["mu"] = flow_shift_mu(image_seq_len, sched.config) if mu is None else mu
    if explicit_sigmas:
        kwargs["sigmas"] = np.linspace(1.0, 1 / GRID_STEPS, GRID_STEPS)
        sched.set_timesteps(**kwargs)
    else:
        sched.set_timesteps(GRID_STEPS, **kwargs)
    sigmas = sorted(float(s) for s in sched.sigmas[:GRID_STEPS])  # drop the terminal 0
    return sigmas[:t0]


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser regresses, by the scheduler's `prediction_type` (SD 1.x and 2.x-base:
    epsilon; SD 2.x 768: v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} in the model's scheduler config")


# ---------------------------------------------------------------- stages 2-4: training and sampling
#
# A model's `objective` is one of the two kinds below. Stage 2 asks it for a noised training batch
# and its regression target; stages 3 and 4 ask it for a sampler. The model's `denoise(z, levels,
# cond)` takes the levels the objective hands out: timesteps for DDPM, sigmas for flow.


def scheduler_from_config(cls, config, **overrides):
    """A `cls` scheduler built from another scheduler's config. `clip_sample` is False unless that
    config states it: latents are not images in [-1, 1], and a PNDM or Euler config (SD 1.x folders,
    SDXL) has no such key, so DDIM and DDPM would otherwise take their default True and clip the
    predicted latents, as diffusers' latent pipelines warn and avoid."""
    stated = "clip_sample" in config and "clip_sample" not in (config.get("_use_default_values") or [])
    if not stated and "clip_sample" in inspect.signature(cls.__init__).parameters:
        overrides.setdefault("clip_sample", False)
    return cls.from_config(config, **overrides)


@dataclass
class TrainingBatch:
    noisy: torch.Tensor  # the noised latents, float32
    levels: torch.Tensor  # (B,) what `denoise` takes: timesteps (DDPM) or sigmas (flow)
    target: torch.Tensor  # what the denoiser regresses
    weight: torch.Tensor  # (B,) per-sample loss weight


class DDPMObjective:
    """SD 1.x/2.x and SDXL: t ~ U{0..T-1}, z_t = sqrt(abar) z0 + sqrt(1 - abar) eps, and the target
    the scheduler's `prediction_type` names (epsilon, v or sample)."""

    kind = "ddpm"
    samplers = ("ddim", "dpm++")

    def __init__(self, scheduler):
        from diffusers import DDPMScheduler

        self.scheduler = scheduler
        # DDPM's noising whatever the folder's sampler (SDXL ships Euler, whose add_noise is the
        # variance-exploding form), as diffusers' training scripts do
        self.train_scheduler = scheduler_from_config(DDPMScheduler, scheduler.config)

    def training_batch(self, latents: torch.Tensor, generator: torch.Generator) -> TrainingBatch:
        noise = torch.randn(latents.shape, generator=generator)  # drawn first: the order the SD 1.x runs were made with
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noise, t, z0 = noise.to(latents.device), t.to(latents.device), latents.float()
        return TrainingBatch(self.train_scheduler.add_noise(z0, noise, t), t, diffusion_target(self.train_scheduler, z0, noise, t),
                             torch.ones(len(latents), device=latents.device))

    def sampler(self, name: str, steps: int, eta: float, device) -> "DDPMSampler":
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        if name not in self.samplers:
            raise ValueError(f"unknown sampler {name!r} for this model; choose one of {', '.join(self.samplers)}")
        scheduler = scheduler_from_config({"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}[name], self.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        return DDPMSampler(scheduler, eta if name == "ddim" else None)


class DDPMSampler:
    """A DDIM / DPM++ loop: levels are the scheduler's timesteps; the known region of RePaint at
    step i is the clean latents re-noised to t_i."""

    def __init__(self, scheduler, eta: float | None):
        self.scheduler, self.eta = scheduler, eta
        self.levels = list(scheduler.timesteps)
        self.init_noise_sigma = scheduler.init_noise_sigma

    def renoise(self, z0: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        return self.scheduler.add_noise(z0, eps, self.levels[i].expand(len(z0)))

    def model_input(self, z: torch.Tensor, i: int) -> torch.Tensor:
        return self.scheduler.scale_model_input(z, self.levels[i])

    def step(self, prediction: torch.Tensor, i: int, z: torch.Tensor) -> torch.Tensor:
        kwargs = {} if self.eta is None else {"eta": self.eta}
        return self.scheduler.step(prediction, self.levels[i], z, **kwargs).prev_sample


class FlowObjective:
    """SD 3.x and FLUX.1 (rectified flow), as diffusers' DreamBooth scripts for them train: u from
    the family's timestep density (`weighting`: "logit_normal" for SD 3, "none" (uniform) for
    FLUX), sigma = the training scheduler's sigma at index u * T (shifted for SD 3, not for FLUX,
    whose shift is resolution-dependent at sampling only), z = (1 - sigma) z0 + sigma eps, target
    the velocity eps - z0. Sampling: the flow's Euler solver at the family pipeline's sigmas (the
    first-order solver DDIM is for this parametrisation; `ddim` names it). `mu(steps)`: the shift a
    pipeline computes itself for a step count (FLUX.2); default: from the image sequence length."""

    kind = "flow"
    samplers = ("ddim",)

    def __init__(self, scheduler, weighting: str, image_seq_len: int, explicit_sigmas: bool,
                 mu: Callable[[int], float] | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = scheduler
        self.weighting = weighting
        self.image_seq_len, self.explicit_sigmas, self.mu = image_seq_len, explicit_sigmas, mu
        self.train_sigmas = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config).sigmas  # the untouched schedule

    def training_batch(self, latents: torch.Tensor, generator: torch.Generator) -> TrainingBatch:
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        noise = torch.randn(latents.shape, generator=generator)
        u = compute_density_for_timestep_sampling(self.weighting, len(latents), logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29, generator=generator)
        index = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.train_sigmas) - 1)
        sigma = self.train_sigmas[index].float()
        noise, sigma = noise.to(latents.device), sigma.to(latents.device)
        z0 = latents.float()
        return TrainingBatch(flow_noised(z0, noise, sigma), sigma, noise - z0,
                             compute_loss_weighting_for_sd3(self.weighting, sigma))

    def sampler(self, name: str, steps: int, eta: float, device) -> "FlowSampler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name not in self.samplers:
            raise ValueError(f"sampler {name!r} is not available for a rectified-flow model (SD 3.x, FLUX.1): "
                             "use 'ddim', which runs the flow's Euler solver")
        if eta != 0:
            raise ValueError("eta applies to DDIM on DDPM models; a rectified-flow model's sampler is deterministic (eta 0)")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            kwargs["mu"] = flow_shift_mu(self.image_seq_len, scheduler.config) if self.mu is None else self.mu(steps)
        if self.explicit_sigmas:  # FLUX's pipeline: sigmas = linspace(1, 1/steps, steps), then shifted
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, **kwargs)
        else:
            scheduler.set_timesteps(steps, device=device, **kwargs)
        return FlowSampler(scheduler)


class FlowSampler:
    """The flow's Euler loop: levels are sigmas (1 down to the last before 0); the known region of
    RePaint at step i is (1 - sigma_i) z0 + sigma_i eps."""

    init_noise_sigma = 1.0

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.levels = list(scheduler.sigmas[:-1])
        self.timesteps = list(scheduler.timesteps)

    def renoise(self, z0: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        return flow_noised(z0, eps, self.levels[i].expand(len(z0)))

    def model_input(self, z: torch.Tensor, i: int) -> torch.Tensor:
        return z

    def step(self, prediction: torch.Tensor, i: int, z: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(prediction, self.timesteps[i], z).prev_sample
