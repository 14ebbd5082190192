"""SDXL: a UNet with cross-attention (`attn2`) over two CLIP encoders' concatenated hidden states.

Conditioning as `StableDiffusionXLPipeline` forms it: each encoder's penultimate hidden states,
concatenated on the feature axis (77 tokens); the second encoder's projected pooled embedding;
time ids (original size, crop top-left, target size) = (R, R, 0, 0, R, R) for the R x R canvas
stage 1 places every image on (and, in stage 2, for the R x R crops it trains on). Training and
sampling: DDPM / DDIM, as for SD 1.x (`schedules.DDPMObjective`). Noise: the DDPM schedule at the 50-step grid's T0 smallest
timesteps, as for SD 1.x. The maps are averaged on the finest grid that has cross-attention
(64 x 64 at 1024 px: SDXL's 128 x 128 level has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from conceptseg.families.base import FamilyModel, encode, token_positions
from conceptseg.schedules import DDPMObjective, ddpm_noised, timestep_grid

CLIP_LENGTH = 77


@dataclass
class SDXLConditioning:
    prompt_embeds: torch.Tensor  # (N, 77, D_L + D_G), a row per prompt
    pooled: torch.Tensor  # (N, P) text_embeds of the second encoder
    time_ids: torch.Tensor  # (N, 6)


@dataclass
class SDXLModel(FamilyModel):
    vae: object = field(default=None, repr=False)
    unet: UNet2DConditionModel = field(default=None, repr=False)
    text_encoder: object = field(default=None, repr=False)
    text_encoder_2: object = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)
    tokenizer_2: object = field(default=None, repr=False)
    scheduler: object = field(default=None, repr=False)
    # the pipeline's setting (model_index.json; True unless a folder says otherwise, False for the
    # refiner): the empty prompt's conditioning, classifier-free guidance's unconditional row, is zeros
    force_zeros_for_empty_prompt: bool | None = None

    family = "sdxl"
    label = "SDXL (UNet cross-attention, two CLIP encoders)"
    components = ("vae", "unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    def __post_init__(self):
        if self.force_zeros_for_empty_prompt is None:
            self.force_zeros_for_empty_prompt = True  # StableDiffusionXLPipeline's default

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def attention_resolution(self) -> int:
        """The finest latent grid with a cross-attention block (latent side / 2 for SDXL)."""
        levels = [i for i, b in enumerate(self.unet.config.down_block_types) if "CrossAttn" in b]
        if not levels:
            raise ValueError("this UNet has no cross-attention block")
        return self.unet.config.sample_size >> levels[0]

    denoiser_name = "unet"

    @property
    def objective(self) -> DDPMObjective:
        return DDPMObjective(self.scheduler)

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> SDXLConditioning:
        self.check_text_encoders()
        hidden, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encode(enc, tok, prompts, CLIP_LENGTH, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.device))
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0].to(self.device)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(prompts), device=self.device, dtype=self.dtype)
        embeds, pooled = torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)
        if self.force_zeros_for_empty_prompt:  # as `StableDiffusionXLPipeline.encode_prompt` forms the negative row
            empty = torch.tensor([p == "" for p in prompts], device=self.device)
            embeds, pooled = embeds.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
        return SDXLConditioning(embeds, pooled, time_ids)

    def concept_token_positions(self, prompt: str, words) -> list[list[int]]:
        # both encoders use CLIP's BPE on the same 77 positions: one lookup serves both
        return token_positions(self.tokenizer, prompt, words, CLIP_LENGTH)

    def noise_levels(self, t0: int, grid: str = "sampler") -> list[int]:
        return timestep_grid(t0, num_train_timesteps=self.scheduler.config.num_train_timesteps,
                             offset=self.scheduler.config.get("steps_offset", 1) or 0)

    def add_noise(self, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ddpm_noised(self.scheduler.alphas_cumprod, latents, eps, t)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond: SDXLConditioning, module=None) -> torch.Tensor:
        b = len(noisy)
        added = {"text_embeds": cond.pooled.expand(b, -1), "time_ids": cond.time_ids.expand(b, -1)}
        return (module or self.unet)(noisy.to(self.dtype), t, cond.prompt_embeds.expand(b, -1, -1),
                                     added_cond_kwargs=added).sample

    def capture_attention(self, token_groups, per_level: bool = False, **options):
        from conceptseg.attention import capture_cross_attention

        grid = (self.attention_resolution, self.attention_resolution)
        return capture_cross_attention(self.unet, token_groups, grid, per_level=per_level)
