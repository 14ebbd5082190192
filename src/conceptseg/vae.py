"""Images to latents and back through a family's VAE, as its diffusers pipelines do it:
z = (mode of the posterior - shift_factor) * scaling_factor (SD 1.x/2.x and SDXL have no shift;
SD 3.x and FLUX.1 do), and the inverse for decoding."""

from __future__ import annotations

import numpy as np
import torch

from conceptseg.geometry import NonFiniteError, to_model_input


@torch.no_grad()
def encode(vae, images: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> scaled latents (N, C, h, w) in `dtype`; the posterior mode, so deterministic."""
    z = vae.encode(to_model_input(images, device, vae.dtype)).latent_dist.mode()
    shift = vae.config.get("shift_factor") or 0.0
    return ((z.float() - shift) * vae.config.scaling_factor).to(dtype)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents -> uint8 images (N, H, W, 3)."""
    shift = vae.config.get("shift_factor") or 0.0
    return to_uint8(vae.decode((latents.float() / vae.config.scaling_factor + shift).to(vae.dtype)).sample)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """A VAE's output (N, 3, H, W) in [-1, 1] -> uint8 images (N, H, W, 3)."""
    if not torch.isfinite(x).all():  # NaN would become black pixels, and black would become foreground
        raise NonFiniteError("the decoded image holds NaN or infinite values")
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class LatentCodec:
    """`encode_images`, `decode_latents` and `latent_channels` for a model with `vae`, `device` and
    `dtype` (every family's model class mixes this in)."""

    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> scaled latents (N, C, h, w); the posterior mode, so deterministic."""
        return encode(self.vae, images, self.device, self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> uint8 images (N, H, W, 3)."""
        return decode(self.vae, latents)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels
