"""Stable Diffusion 1.x/2.x components built from configs, with random weights.

Named presets over one builder (the segment-anything pattern), also listed in the registry of every
family's presets (`presets`). Used by the tests (`tiny`), by `train-t2i` from scratch (`toy`, the
embedded default's architecture) and by the benchmarks (`sd15` and `sd21-768`, the published SD
v1.5 and v2.1-768 architectures).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from conceptseg.tokenizer import clip_tokenizer

# SD v1's noise schedule; every preset and every saved model uses it.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass(frozen=True)
class SDArch:
    image_size: int
    vae_channels: tuple[int, ...]
    latent_channels: int
    unet_channels: tuple[int, ...]
    unet_cross_attention: tuple[bool, ...]  # per resolution level: CrossAttn block or plain block
    unet_layers_per_block: int
    unet_heads: int | tuple[int, ...]  # per level, or one count for all
    text_width: int
    text_layers: int
    text_heads: int
    norm_groups: int = 32
    prediction_type: str = "epsilon"  # SD 2.x 768 models predict v
    linear_projection: bool = False  # SD 2.x: linear instead of 1x1-conv projections in its transformers
    text_act: str = "quick_gelu"  # OpenAI CLIP; SD 2.x's OpenCLIP ViT-H uses "gelu"


def build_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})


def build_networks(arch: SDArch) -> dict:
    """vae, unet, text_encoder and tokenizer of `arch`, with random weights from torch's current seed."""
    n_vae = len(arch.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=arch.vae_channels,
        layers_per_block=2 if arch.vae_channels[0] >= 128 else 1,
        latent_channels=arch.latent_channels,
        norm_num_groups=min(arch.norm_groups, arch.vae_channels[0]),
        sample_size=arch.image_size,
    )
    down = tuple("CrossAttnDownBlock2D" if x else "DownBlock2D" for x in arch.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(arch.unet_cross_attention))
    unet = UNet2DConditionModel(
        sample_size=arch.image_size // 2 ** (n_vae - 1),
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_width,
        attention_head_dim=arch.unet_heads,  # diffusers' SD-1 naming: this is the number of heads
        use_linear_projection=arch.linear_projection,
        norm_num_groups=min(arch.norm_groups, arch.unet_channels[0]),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=arch.text_width,
            intermediate_size=4 * arch.text_width,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=77,
            hidden_act=arch.text_act,
            projection_dim=arch.text_width,
        )
    )
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=clip_tokenizer())


PRESETS: dict[str, SDArch] = {
    # For tests: 32x32 images, 16x16 latents, seconds on a CPU.
    "tiny": SDArch(
        image_size=32, vae_channels=(32, 64), latent_channels=4, unet_channels=(32, 64),
        unet_cross_attention=(True, True), unet_layers_per_block=1, unet_heads=2,
        text_width=32, text_layers=2, text_heads=2,
    ),
    # `tiny` predicting v (as SD 2.x 768 does), for the v-prediction paths.
    "tiny-v": SDArch(
        image_size=32, vae_channels=(32, 64), latent_channels=4, unet_channels=(32, 64),
        unet_cross_attention=(True, True), unet_layers_per_block=1, unet_heads=2,
        text_width=32, text_layers=2, text_heads=2, prediction_type="v_prediction", linear_projection=True,
    ),
    # The embedded default's architecture: 64x64 images, 32x32x4 latents, cross-attention at
    # 32, 16 and 8. The text encoder has ZERO transformer layers so each word keeps its own token
    # (a deep encoder trained from scratch smears the class into the end and padding tokens).
    "toy": SDArch(
        image_size=64, vae_channels=(16, 32), latent_channels=4, unet_channels=(16, 32, 64),
        unet_cross_attention=(True, True, True), unet_layers_per_block=1, unet_heads=(1, 2, 4),
        text_width=64, text_layers=0, text_heads=2,
    ),
    # Stable Diffusion v1.5's published architecture (random weights), for benchmarks.
    "sd15": SDArch(
        image_size=512, vae_channels=(128, 256, 512, 512), latent_channels=4,
        unet_channels=(320, 640, 1280, 1280), unet_cross_attention=(True, True, True, False),
        unet_layers_per_block=2, unet_heads=8, text_width=768, text_layers=12, text_heads=12,
    ),
    # Stable Diffusion 2.1 (768 px, v-prediction, OpenCLIP ViT-H text encoder; random weights).
    "sd21-768": SDArch(
        image_size=768, vae_channels=(128, 256, 512, 512), latent_channels=4,
        unet_channels=(320, 640, 1280, 1280), unet_cross_attention=(True, True, True, False),
        unet_layers_per_block=2, unet_heads=(5, 10, 20, 20), text_width=1024, text_layers=23, text_heads=16,
        prediction_type="v_prediction", linear_projection=True, text_act="gelu",
    ),
}


def build_components(preset: str, seed: int = 0, image_size: int | None = None) -> dict:
    """vae, unet, text_encoder, tokenizer, scheduler of a named preset, with seeded random weights.
    `image_size`: the resolution the folder's configs state (the UNet's sample_size x the VAE's
    factor), which is the resolution a run takes its images at; the weights are the same shapes."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    torch.manual_seed(seed)
    arch = PRESETS[preset] if image_size is None else dataclasses.replace(PRESETS[preset], image_size=image_size)
    return {**build_networks(arch), "scheduler": build_scheduler(arch.prediction_type)}


