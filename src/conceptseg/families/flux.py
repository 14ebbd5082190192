"""FLUX.1: an MMDiT with double-stream blocks (text and image streams, one joint softmax) followed
by single-stream blocks (one [text, image] sequence); text tokens come first in both.

Conditioning as `FluxPipeline` forms it: T5's sequence (512 tokens for dev, 256 for schnell) as
the text tokens, CLIP-L's pooled output into the timestep embedding, text ids zero, image ids the
(row, column) of each packed 2 x 2 latent patch; FLUX.1-dev's distilled guidance embedding at the
pipeline's default 3.5 (it is an input of the one forward pass, not classifier-free guidance).
The concept's positions are in the T5 sequence. Captured: every double- and single-stream block.
The maps live on the packed-token grid (latent side / 2: 64 x 64 at 1024 px). Training and
sampling: rectified flow (`schedules.FlowObjective`), uniform timesteps, the guidance embedding
at 3.5 in both (as diffusers' FLUX DreamBooth script trains it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conceptseg.concept_attention import FluxConceptProcessor, capture_concept_attention
from conceptseg.families.base import FamilyModel, encode, token_positions
from conceptseg.joint_attention import FluxCaptureProcessor, capture_joint_attention
from conceptseg.schedules import FlowObjective, flow_noised, flow_sigma_grid

CLIP_LENGTH = 77
GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def is_flux_attention(name: str) -> bool:
    return name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".attn.processor")


@dataclass
class FluxConditioning:
    prompt_embeds: torch.Tensor  # (N, L, W_T5), a row per prompt
    pooled: torch.Tensor  # (N, W_CLIP)


@dataclass
class FluxModel(FamilyModel):
    vae: object = field(default=None, repr=False)
    transformer: object = field(default=None, repr=False)
    text_encoder: object = field(default=None, repr=False)  # CLIP-L
    text_encoder_2: object = field(default=None, repr=False)  # T5
    tokenizer: object = field(default=None, repr=False)
    tokenizer_2: object = field(default=None, repr=False)
    scheduler: object = field(default=None, repr=False)

    family = "flux"
    label = "FLUX.1 (MMDiT double- and single-stream attention, T5 + pooled CLIP)"
    components = ("vae", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    @property
    def resolution(self) -> int:
        return self.vae.config.sample_size  # 1024 for FLUX.1; the transformer's config names no size

    @property
    def attention_resolution(self) -> int:
        return self.latent_resolution // 2

    @property
    def t5_length(self) -> int:
        # the pipeline's default 512; schnell (no guidance embedding) was trained with 256
        return 512 if self.transformer.config.guidance_embeds else 256

    denoiser_name = "transformer"

    @property
    def objective(self) -> FlowObjective:
        # diffusers' FLUX DreamBooth script samples timesteps uniformly ("none"); its sampler shifts by resolution
        return FlowObjective(self.scheduler, "none", self.attention_resolution**2, explicit_sigmas=True)

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> FluxConditioning:
        self.check_text_encoders()
        pooled = encode(self.text_encoder, self.tokenizer, prompts, CLIP_LENGTH).pooler_output
        t5 = encode(self.text_encoder_2, self.tokenizer_2, prompts, self.t5_length)[0]
        return FluxConditioning(t5.to(self.device, self.dtype), pooled.to(self.device, self.dtype))

    def concept_token_positions(self, prompt: str, words) -> list[list[int]]:
        return token_positions(self.tokenizer_2, prompt, words, self.t5_length)

    def noise_levels(self, t0: int, grid: str = "sampler") -> list[float]:
        return flow_sigma_grid(self.scheduler, t0, grid, image_seq_len=self.attention_resolution**2, explicit_sigmas=True)

    def add_noise(self, latents: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return flow_noised(latents, eps, sigma)

    def denoise(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: FluxConditioning, module=None) -> torch.Tensor:
        """The velocity, unpacked to the latent grid (B, C, h, w)."""
        b, c, h, w = noisy.shape
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=self.device)
        img_ids[..., 1] += torch.arange(h // 2, device=self.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=self.device)[None, :]
        txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=self.device)
        guidance = torch.full((b,), GUIDANCE, device=self.device) if self.transformer.config.guidance_embeds else None
        out = (module or self.transformer)(hidden_states=packed.to(self.dtype), timestep=sigma.expand(b).to(self.dtype),
                                           guidance=guidance, pooled_projections=cond.pooled.expand(b, -1),
                                           encoder_hidden_states=cond.prompt_embeds.expand(b, -1, -1), txt_ids=txt_ids,
                                           img_ids=img_ids.reshape(-1, 3), return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def capture_attention(self, token_groups, per_level: bool = False, normalisation: str = "text",
                          maps: str = "cross-attention", concepts=None, concept_layers=None, **options):
        """The maps of `token_groups` (cross-attention), or with maps="concept-attention" those of the
        concept embeddings `concepts` (`concept_attention.embed_concepts`) in blocks `concept_layers`."""
        grid = (self.attention_resolution, self.attention_resolution)
        if maps == "concept-attention":
            return capture_concept_attention(self.transformer, concepts, grid, FluxConceptProcessor, concept_layers)
        return capture_joint_attention(self.transformer, is_flux_attention,
                                       lambda store: FluxCaptureProcessor(store, self.t5_length, normalisation),
                                       token_groups, grid, per_level=per_level)
