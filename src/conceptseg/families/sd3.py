"""SD 3 / 3.5: an MMDiT whose blocks attend over [image tokens, text tokens] in one softmax.

Conditioning as `StableDiffusion3Pipeline` forms it: CLIP-L and CLIP-G penultimate hidden states
concatenated on the feature axis (77 tokens), zero-padded to T5's width, followed by T5's 256
tokens (zeros when the folder has no T5); pooled = both CLIPs' projected embeddings. The concept's
positions are found in the CLIP part and, where there is a T5, in the T5 part (offset by 77); a
group's map is the mean over all its positions. Captured: the joint attention (`attn`) of every
block; SD 3.5's extra image-only attention (`attn2`) has no text and is left alone. The maps
live on the patch-token grid (latent side / patch size: 64 x 64 at 1024 px). Training and
sampling: rectified flow (`schedules.FlowObjective`), logit-normal timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from conceptseg.concept_attention import SD3ConceptProcessor, capture_concept_attention
from conceptseg.families.base import FamilyModel, encode, token_positions
from conceptseg.joint_attention import SD3CaptureProcessor, capture_joint_attention
from conceptseg.schedules import FlowObjective, flow_noised, flow_sigma_grid

CLIP_LENGTH = 77
T5_LENGTH = 256  # the pipeline's default max_sequence_length


def is_joint_attention(name: str) -> bool:
    return name.startswith("transformer_blocks.") and name.endswith(".attn.processor")


@dataclass
class SD3Conditioning:
    prompt_embeds: torch.Tensor  # (N, 77 + 256, W_T5), a row per prompt
    pooled: torch.Tensor  # (N, P_L + P_G)


@dataclass
class SD3Model(FamilyModel):
    vae: object = field(default=None, repr=False)
    transformer: object = field(default=None, repr=False)
    text_encoder: object = field(default=None, repr=False)
    text_encoder_2: object = field(default=None, repr=False)
    text_encoder_3: object = field(default=None, repr=False)  # T5; optional in SD 3 folders
    tokenizer: object = field(default=None, repr=False)
    tokenizer_2: object = field(default=None, repr=False)
    tokenizer_3: object = field(default=None, repr=False)
    scheduler: object = field(default=None, repr=False)

    family = "sd3"
    label = "SD 3.x (MMDiT joint attention, CLIP-L + CLIP-G + T5)"
    components = ("vae", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    @property
    def resolution(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def attention_resolution(self) -> int:
        return self.latent_resolution // self.transformer.config.patch_size

    @property
    def has_t5(self) -> bool:
        return self.text_encoder_3 is not None and self.tokenizer_3 is not None

    denoiser_name = "transformer"

    @property
    def objective(self) -> FlowObjective:
        # diffusers' SD 3 DreamBooth script samples timesteps logit-normally
        return FlowObjective(self.scheduler, "logit_normal", self.attention_resolution**2, explicit_sigmas=False)

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> SD3Conditioning:
        self.check_text_encoders()
        hidden, pooled = [], []
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encode(enc, tok, prompts, CLIP_LENGTH, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.device))
            pooled.append(out[0].to(self.device))
        clip = torch.cat(hidden, dim=-1).float()
        if self.has_t5:
            t5 = encode(self.text_encoder_3, self.tokenizer_3, prompts, T5_LENGTH)[0].to(self.device).float()
        else:
            t5 = torch.zeros(len(prompts), T5_LENGTH, self.transformer.config.joint_attention_dim, device=self.device)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return SD3Conditioning(torch.cat([clip, t5], dim=-2).to(self.dtype), torch.cat(pooled, dim=-1).to(self.dtype))

    def concept_token_positions(self, prompt: str, words) -> list[list[int]]:
        clip = token_positions(self.tokenizer, prompt, words, CLIP_LENGTH)
        if not self.has_t5:
            return clip
        t5 = token_positions(self.tokenizer_3, prompt, words, T5_LENGTH, offset=CLIP_LENGTH)
        return [c + t for c, t in zip(clip, t5)]

    def noise_levels(self, t0: int, grid: str = "sampler") -> list[float]:
        return flow_sigma_grid(self.scheduler, t0, grid, image_seq_len=self.attention_resolution**2)

    def add_noise(self, latents: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return flow_noised(latents, eps, sigma)

    def denoise(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: SD3Conditioning, module=None) -> torch.Tensor:
        b = len(noisy)
        t = sigma.float().expand(b) * self.scheduler.config.num_train_timesteps  # the pipeline's timestep
        return (module or self.transformer)(hidden_states=noisy.to(self.dtype), timestep=t,
                                encoder_hidden_states=cond.prompt_embeds.expand(b, -1, -1),
                                pooled_projections=cond.pooled.expand(b, -1), return_dict=False)[0]

    def capture_attention(self, token_groups, per_level: bool = False, normalisation: str = "text",
                          maps: str = "cross-attention", concepts=None, concept_layers=None, **options):
        """The maps of `token_groups` (cross-attention), or with maps="concept-attention" those of the
        concept embeddings `concepts` (`concept_attention.embed_concepts`) in blocks `concept_layers`."""
        grid = (self.attention_resolution, self.attention_resolution)
        if maps == "concept-attention":
            return capture_concept_attention(self.transformer, concepts, grid, SD3ConceptProcessor, concept_layers)
        return capture_joint_attention(self.transformer, is_joint_attention,
                                       lambda store: SD3CaptureProcessor(store, normalisation), token_groups, grid,
                                       per_level=per_level)
