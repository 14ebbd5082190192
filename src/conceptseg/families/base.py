"""What the newer families share: the stage-1 interface, VAE encoding, and token positions over
several tokenizers.

Stage 1 (`conceptseg.prelim`) asks a model for:
  resolution / attention_resolution   canvas side in pixels / side of the grid the maps live on
  encode_images(uint8 N,H,W,3)        -> latents (N, C, h, w), the posterior mean, scaled (and shifted)
  text_conditioning(prompt)           -> whatever `denoise` needs about the prompt (one row)
  concept_token_positions(prompt, w)  -> each word's positions in the denoiser's text sequence
  noise_levels(t0, grid)              -> the T0 noise levels (timesteps or sigmas), ascending
  add_noise(latents, eps, levels)     -> z at those levels (float32)
  denoise(z, levels, cond)            -> one conditional forward pass
  capture_attention(groups, ...)      -> a context manager yielding a CrossAttentionStore
`DiffusionModel` (SD 1.x/2.x) gives the same interface; stages 2-4 are not yet on these families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from conceptseg.geometry import to_model_input
from conceptseg.tokenizer import concept_token_positions


@dataclass
class FamilyModel:
    """Fields every family has; subclasses add their denoiser, encoders and tokenizers."""

    source: str
    device: torch.device
    dtype: torch.dtype

    family = "?"
    label = "?"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.vae_scale_factor

    def describe(self) -> str:
        return f"{self.label} from {self.source}"

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> (z - shift) * scale, the posterior mean, as the family's pipelines form it."""
        z = self.vae.encode(to_model_input(images, self.device, self.vae.dtype)).latent_dist.mode()
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((z.float() - shift) * self.vae.config.scaling_factor).to(self.dtype)


def token_positions(tokenizer, prompt: str, words: Sequence[str], max_length: int, offset: int = 0) -> list[list[int]]:
    """`concept_token_positions` for a tokenizer padded to `max_length`, shifted by `offset` (the
    position of this tokenizer's part in a joint text sequence)."""
    return [[offset + i for i in g] for g in concept_token_positions(tokenizer, prompt, words, max_length=max_length)]


def tokenize(tokenizer, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
