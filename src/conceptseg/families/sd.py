"""Stable Diffusion 1.x/2.x: a UNet with cross-attention (`attn2`) over one CLIP encoder's last hidden
states (77 tokens).

Conditioning as `StableDiffusionPipeline` forms it without clip skip: the text encoder's last hidden
states. Noise: the DDPM schedule at the T0 smallest timesteps of the 50-step DDIM grid. The maps are
averaged on the latent grid (every level's maps are resized to it). Training and sampling: DDPM / DDIM
(`schedules.DDPMObjective`), epsilon or v as the scheduler says. A folder needs no model_index.json:
its five components are read one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from conceptseg.families.base import FamilyModel
from conceptseg.schedules import DDPMObjective, ddpm_noised, scheduler_from_config, timestep_grid
from conceptseg.tokenizer import check_prompt_length, concept_token_positions


def _load_parts(source, dtype: torch.dtype, local_files_only: bool) -> tuple:
    # use_safetensors=True: weights are never unpickled from a .bin a user may not have made
    kw = dict(local_files_only=local_files_only)
    return (
        AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, use_safetensors=True, **kw),
        UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, use_safetensors=True, **kw),
        CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, use_safetensors=True, **kw),
        CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
        scheduler_from_config(DDIMScheduler, DDIMScheduler.load_config(source, subfolder="scheduler", **kw)),
    )


@dataclass
class SDModel(FamilyModel):
    vae: AutoencoderKL = field(default=None, repr=False)
    unet: UNet2DConditionModel = field(default=None, repr=False)
    text_encoder: CLIPTextModel = field(default=None, repr=False)
    tokenizer: CLIPTokenizer = field(default=None, repr=False)
    scheduler: DDIMScheduler = field(default=None, repr=False)

    family = "sd"
    label = "Stable Diffusion 1.x/2.x (UNet cross-attention)"
    components = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
    denoiser_name = "unet"
    # the pipeline's parts that conceptseg neither loads nor saves
    pipeline_options = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    @classmethod
    def from_pretrained(cls, source, device: torch.device, dtype: torch.dtype, local_files_only: bool,
                        source_label: str) -> "SDModel":
        """The five components one by one (a folder without model_index.json loads too)."""
        vae, unet, text_encoder, tokenizer, scheduler = _load_parts(source, dtype, local_files_only)
        for m in (vae, unet, text_encoder):
            m.to(device).eval().requires_grad_(False)
        return cls(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                   source=source_label, device=device, dtype=dtype)

    @property
    def resolution(self) -> int:
        """Image side the model was trained at (512 for SD 1.x)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def attention_resolution(self) -> int:
        """Side of the grid stage 1's maps are averaged on: the latent grid."""
        return self.unet.config.sample_size

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def objective(self) -> DDPMObjective:
        return DDPMObjective(self.scheduler)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        self.check_text_encoders()
        for prompt in prompts:
            check_prompt_length(self.tokenizer, prompt)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        # on the encoder's device: the CPU once it was offloaded (`residency`)
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(self.device, self.dtype)

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        """One row per prompt, (N, 77, D), for `denoise` (select rows with `families.base.select_rows`)."""
        return self.encode_prompts(prompts)

    def concept_token_positions(self, prompt: str, words) -> list[list[int]]:
        return concept_token_positions(self.tokenizer, prompt, words)

    def noise_levels(self, t0: int, grid: str = "sampler") -> list[int]:
        """The T0 smallest timesteps of the 50-step DDIM grid (the same for either `grid`)."""
        return timestep_grid(t0, offset=self.scheduler.config.get("steps_offset", 1) or 0)

    def add_noise(self, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ddpm_noised(self.alphas_cumprod, latents, eps, t)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, module=None) -> torch.Tensor:
        """One conditional pass; `module`: the UNet as a trainer wrapped it (default: this model's)."""
        return (module or self.unet)(noisy.to(self.dtype), t, cond.expand(len(noisy), -1, -1)).sample

    def capture_attention(self, token_groups, per_level: bool = False, **options):
        from conceptseg.attention import capture_cross_attention

        grid = (self.attention_resolution, self.attention_resolution)
        return capture_cross_attention(self.unet, token_groups, grid, per_level=per_level)
