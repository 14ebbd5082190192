"""Stage 1's noise levels and noising: the DDIM timestep grid (SD 1.x/2.x, SDXL) and the
flow-matching sigma grid (SD 3.x, FLUX.1).

A DDPM-style model is noised as z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps at the T0 smallest
timesteps of the 50-step DDIM-uniform grid (METHOD.md §1). A rectified-flow model is noised as
z_s = (1 - s) z0 + s eps; its grid is either the T0 smallest sigmas of the family's default
sampler at 50 steps ("sampler": the scheduler's own shift, resolution-dependent for FLUX) or the
unshifted uniform flow-time grid s = k / 50 ("uniform").
"""

from __future__ import annotations

import copy

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
                    explicit_sigmas: bool = False) -> list[float]:
    """The t0 smallest sigmas, ascending.

    "sampler": the scheduler's own 50-step grid as its pipeline sets it (`explicit_sigmas`: FLUX's
    pipeline passes sigmas = linspace(1, 1/50, 50) to be shifted; `mu` from `image_seq_len` when the
    scheduler shifts dynamically). "uniform": s = k / 50, k = 1..50, no shift.
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
        if image_seq_len is None:
            raise ValueError("a dynamically shifted scheduler needs the image sequence length")
        kwargs["mu"] = flow_shift_mu(image_seq_len, sched.config)
    if explicit_sigmas:
        kwargs["sigmas"] = np.linspace(1.0, 1 / GRID_STEPS, GRID_STEPS)
        sched.set_timesteps(**kwargs)
    else:
        sched.set_timesteps(GRID_STEPS, **kwargs)
    sigmas = sorted(float(s) for s in sched.sigmas[:GRID_STEPS])  # drop the terminal 0
    return sigmas[:t0]
