"""Background inpainting with the fine-tuned model (METHOD.md §3): the foreground of M_pre starts
from noise and is denoised with the background prompt, while at EVERY step the known background is
replaced by the original latents re-noised to the current level (RePaint-style blending).

One loop for every family: the model's `objective` gives the sampler (DDIM / DPM++ over DDPM
timesteps for SD 1.x/2.x and SDXL; the flow's Euler solver over sigmas for SD 3.x, FLUX.1, FLUX.2
and Qwen-Image, whose known region at sigma is (1 - sigma) z0 + sigma eps), and `denoise` the prediction."""

from __future__ import annotations

import torch

from conceptseg.families.base import DiffusionModel, select_rows

BACKGROUND_PROMPT = "a photo of a background"


@torch.no_grad()
def inpaint_background(model: DiffusionModel, z0: torch.Tensor, region: torch.Tensor, prompt: str = BACKGROUND_PROMPT,
                       steps: int = 50, eta: float = 0.0, guidance: float = 1.0, negative_prompt: str | None = None,
                       sampler: str = "ddim", generator: torch.Generator | list[torch.Generator] | None = None,
                       trace: list | None = None, cond=None) -> torch.Tensor:
    """Latents with `region` (1 = to inpaint, (B, 1, h, w) or (B, h, w)) regenerated, the rest kept.

    guidance == 1 uses `prompt` alone (the paper's default). Otherwise, with `negative_prompt`,
    pred = pred_negative + guidance * (pred_prompt - pred_negative): classifier-free guidance towards
    `prompt` and away from `negative_prompt` (the empty prompt for plain sampling, the concept
    prompt for background inpainting), or the family's own rule (`model.guided_prediction`). A list
    of generators, one per image, makes each image's noise independent of how images are batched.
    `trace`, if given, receives (level, latents after blending) at every step. `cond`, if given, is
    the conditioning of [prompt] (+ [negative_prompt]) computed before (`model.conditioning`), so the
    text encoders are not needed here.
    """
    loop = model.objective.sampler(sampler, steps, eta, model.device)
    z0 = z0.to(model.device, torch.float32)
    m = region.to(model.device, torch.float32)
    m = m[:, None] if m.ndim == 3 else m
    b = z0.shape[0]
    two = guidance != 1.0 and negative_prompt is not None
    if cond is None:
        cond = model.conditioning([prompt] + ([negative_prompt] if two else []))
    rows = select_rows(cond, torch.tensor([0] * b + [1] * b if two else [0] * b))

    def randn() -> torch.Tensor:
        if isinstance(generator, (list, tuple)):
            return torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generator]).to(model.device)
        return torch.randn(z0.shape, generator=generator).to(model.device)

    z = randn() * loop.init_noise_sigma
    for i, level in enumerate(loop.levels):
        z = loop.renoise(z0, randn(), i) * (1 - m) + z * m
        if trace is not None:
            trace.append((level.item(), z.clone()))
        zin = loop.model_input(z, i)
        if two:
            pred_pos, pred_neg = model.denoise(torch.cat([zin, zin]), level.expand(2 * b), rows).float().chunk(2)
            pred = getattr(model, "guided_prediction", classifier_free_guidance)(pred_pos, pred_neg, guidance)
        else:
            pred = model.denoise(zin, level.expand(b), rows).float()
        z = loop.step(pred, i, z)
    return z0 * (1 - m) + z * m


def classifier_free_guidance(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """negative + scale * (positive - negative); a family whose pipeline guides otherwise defines
    `guided_prediction` (Qwen-Image rescales the result)."""
    return negative + scale * (positive - negative)


def sample_latents(model: DiffusionModel, prompt: str, count: int, steps: int = 50, guidance: float = 1.0,
                   sampler: str = "ddim", generator=None) -> torch.Tensor:
    """Plain text-to-image sampling: inpainting with nothing known. guidance != 1 is classifier-free
    guidance against the empty prompt."""
    shape = (count, model.latent_channels, model.latent_resolution, model.latent_resolution)
    return inpaint_background(model, torch.zeros(shape), torch.ones(count, 1, *shape[2:]), prompt=prompt, steps=steps,
                              guidance=guidance, negative_prompt="", sampler=sampler, generator=generator)
