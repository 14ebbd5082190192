"""Background inpainting with the fine-tuned model (METHOD.md §3): the foreground of M_pre starts
from noise and is denoised with the background prompt, while at EVERY step the known background is
replaced by the original latents re-noised to the current t (RePaint-style blending)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from conceptseg.models import DiffusionModel

BACKGROUND_PROMPT = "a photo of a background"
SAMPLERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


@torch.no_grad()
def inpaint_background(model: DiffusionModel, z0: torch.Tensor, region: torch.Tensor, prompt: str = BACKGROUND_PROMPT,
                       steps: int = 50, eta: float = 0.0, guidance: float = 1.0, negative_prompt: str | None = None,
                       sampler: str = "ddim", generator: torch.Generator | list[torch.Generator] | None = None,
                       trace: list | None = None) -> torch.Tensor:
    """Latents with `region` (1 = to inpaint, (B, 1, h, w) or (B, h, w)) regenerated, the rest kept.

    guidance == 1 uses `prompt` alone (the paper's default). Otherwise, with `negative_prompt`,
    eps = eps_negative + guidance * (eps_prompt - eps_negative): classifier-free guidance towards
    `prompt` and away from `negative_prompt` (the empty prompt for plain sampling, the concept
    prompt for background inpainting). A list of generators, one per image, makes each image's
    noise independent of how images are batched. `trace`, if given, receives (t, latents after blending) at every step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    scheduler = SAMPLERS[sampler].from_config(model.scheduler.config)
    scheduler.set_timesteps(steps, device=model.device)
    z0 = z0.to(model.device, torch.float32)
    m = region.to(model.device, torch.float32)
    m = m[:, None] if m.ndim == 3 else m
    b = z0.shape[0]
    two = guidance != 1.0 and negative_prompt is not None
    cond = model.encode_prompts([prompt] + ([negative_prompt] if two else []))
    def randn() -> torch.Tensor:
        if isinstance(generator, (list, tuple)):
            return torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generator]).to(model.device)
        return torch.randn(z0.shape, generator=generator).to(model.device)

    z = randn() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        known = scheduler.add_noise(z0, randn(), t.expand(b))
        z = known * (1 - m) + z * m
        if trace is not None:
            trace.append((int(t), z.clone()))
        zin = scheduler.scale_model_input(z, t)
        if two:
            eps_pos, eps_neg = model.unet(torch.cat([zin, zin]).to(model.dtype), t,
                                          cond.repeat_interleave(b, dim=0)).sample.float().chunk(2)
            eps = eps_neg + guidance * (eps_pos - eps_neg)
        else:
            eps = model.unet(zin.to(model.dtype), t, cond[:1].expand(b, -1, -1)).sample.float()
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        z = scheduler.step(eps, t, z, **kwargs).prev_sample
    return z0 * (1 - m) + z * m


def sample_latents(model: DiffusionModel, prompt: str, count: int, steps: int = 50, guidance: float = 1.0,
                   sampler: str = "ddim", generator=None) -> torch.Tensor:
    """Plain text-to-image sampling: inpainting with nothing known. guidance != 1 is classifier-free
    guidance against the empty prompt."""
    shape = (count, model.unet.config.in_channels, model.latent_resolution, model.latent_resolution)
    return inpaint_background(model, torch.zeros(shape), torch.ones(count, 1, *shape[2:]), prompt=prompt, steps=steps,
                              guidance=guidance, negative_prompt="", sampler=sampler, generator=generator)
