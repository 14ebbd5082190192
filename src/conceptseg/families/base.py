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

Stages 2-4 (`finetune`, `inpaint`, `refine`, `synth`) ask it for:
  denoiser / denoiser_name            the network stage 2 trains ("unet" or "transformer")
  conditioning(prompts)               -> one row per prompt (`select_rows` picks rows for a batch)
  denoise(z, levels, cond, module)    -> the prediction, (B, C, h, w), of `module` (default: the model's own)
  objective                           -> `schedules.DDPMObjective` or `FlowObjective`: training batches, samplers
  decode_latents(z)                   -> uint8 images
  save_pretrained(dest, denoiser)     a diffusers folder of the family's pipeline
`DiffusionModel` (SD 1.x/2.x) gives the same interface.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from conceptseg.residency import Residency
from conceptseg.vae import LatentCodec
from conceptseg.tokenizer import concept_token_positions


@dataclass
class FamilyModel(LatentCodec, Residency):
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

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    def text_conditioning(self, prompt: str):
        return self.conditioning([prompt])

    def save_pretrained(self, dest: Path, denoiser=None) -> None:
        """This model, with `denoiser` in place of its own, as the family pipeline's diffusers folder."""
        import diffusers

        from conceptseg.families import pipeline_name

        names = [f.name for f in dataclasses.fields(self) if f.name not in ("source", "device", "dtype")]
        parts = {k: getattr(self, k) for k in names} | ({self.denoiser_name: denoiser} if denoiser is not None else {})
        getattr(diffusers, pipeline_name(self.family))(**parts).save_pretrained(dest, safe_serialization=True)


def select_rows(cond, index: torch.Tensor):
    """Rows `index` of a conditioning (a tensor, or a dataclass of batch-first tensors)."""
    if isinstance(cond, torch.Tensor):
        return cond[index.to(cond.device)]
    return dataclasses.replace(cond, **{f.name: getattr(cond, f.name)[index.to(getattr(cond, f.name).device)]
                                        for f in dataclasses.fields(cond)})


def token_positions(tokenizer, prompt: str, words: Sequence[str], max_length: int, offset: int = 0) -> list[list[int]]:
    """`concept_token_positions` for a tokenizer padded to `max_length`, shifted by `offset` (the
    position of this tokenizer's part in a joint text sequence)."""
    return [[offset + i for i in g] for g in concept_token_positions(tokenizer, prompt, words, max_length=max_length)]


def tokenize(tokenizer, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode(encoder, tokenizer, prompts: list[str], max_length: int, **kwargs):
    """`encoder`'s output for `prompts`, run on the encoder's own device (the CPU once the text
    encoders were offloaded, `residency`); the caller moves what it keeps to the model's device."""
    return encoder(tokenize(tokenizer, prompts, max_length, encoder.device), **kwargs)
