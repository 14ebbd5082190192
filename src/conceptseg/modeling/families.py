"""SDXL, SD 3.x and FLUX.1 components built from configs, with random weights.

A registry of named presets over one private builder per family, as `diffusion.py` does for SD 1.x:
`tiny` presets (the sizes diffusers' own fast tests use) for the tests and the CPU run of the
benchmark, and the published architectures (random weights) for the GPU benchmark. No T5
tokenizer ships offline, so `t5_tokenizer` builds one in code from a small Unigram vocabulary:
enough to tokenize test prompts the way T5 does (SentencePiece pieces with a leading "▁", an
end-of-sequence token, pad id 0), NOT T5's real 32k vocabulary.
"""

from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from conceptseg.tokenizer import clip_tokenizer

# Words of the prompts the tests and the CLI defaults use; anything else falls back to letters.
_T5_WORDS = ("a", "an", "the", "photo", "of", "with", "and", "background", "bird", "cat", "dog", "human", "arms",
             "legs", "car", "horse", "flower", "person")


def t5_tokenizer(model_max_length: int = 512):
    """A T5-style tokenizer built in code (for tests and benchmarks; NOT T5's real vocabulary).

    A `tokenizers` Unigram model: pieces "▁word" for a few prompt words, "▁" and single letters
    for everything else, a Metaspace pre-tokenizer and "</s>" appended, pad = 0, eos = 1, unk = 2
    as in T5.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0) for w in _T5_WORDS]
    pieces += [(c, -8.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [(f"▁{c}", -7.0) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=model_max_length)


def _clip(width: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu", inner: int | None = None):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=inner or 4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, projection_dim=projection or width)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(width: int, layers: int, heads: int, ff: int, head_dim: int, vocab: int = 32128) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=head_dim, d_ff=ff, num_layers=layers,
                                   num_heads=heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def _vae(channels: tuple[int, ...], latent: int, image_size: int, scaling: float, shift: float | None, layers: int) -> AutoencoderKL:
    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels, layers_per_block=layers,
                         latent_channels=latent, norm_num_groups=min(32, channels[0]), sample_size=image_size,
                         scaling_factor=scaling, shift_factor=shift, use_quant_conv=shift is None,
                         use_post_quant_conv=shift is None)


# ------------------------------------------------------------------ SDXL


@dataclass(frozen=True)
class SDXLArch:
    image_size: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    unet_channels: tuple[int, ...]
    down_blocks: tuple[str, ...]
    transformer_layers: tuple[int, ...]
    heads: tuple[int, ...]  # attention_head_dim in diffusers' SDXL config (the head count per level)
    layers_per_block: int
    time_embed_dim: int
    clip_l: tuple[int, int, int]  # width, layers, heads
    clip_g: tuple[int, int, int]
    projection: int


def _build_sdxl(a: SDXLArch) -> dict:
    up = tuple(b.replace("Down", "Up") for b in reversed(a.down_blocks))
    unet = UNet2DConditionModel(
        sample_size=a.image_size // 2 ** (len(a.vae_channels) - 1), in_channels=4, out_channels=4,
        down_block_types=a.down_blocks, up_block_types=up, block_out_channels=a.unet_channels,
        layers_per_block=a.layers_per_block, attention_head_dim=a.heads, use_linear_projection=True,
        transformer_layers_per_block=a.transformer_layers, cross_attention_dim=a.clip_l[0] + a.clip_g[0],
        addition_embed_type="text_time", addition_time_embed_dim=a.time_embed_dim,
        projection_class_embeddings_input_dim=6 * a.time_embed_dim + a.projection,
        norm_num_groups=min(32, a.unet_channels[0]),
    )
    return dict(
        vae=_vae(a.vae_channels, 4, a.image_size, 0.13025, None, a.vae_layers),
        unet=unet,
        text_encoder=_clip(*a.clip_l),
        text_encoder_2=_clip(*a.clip_g, projection=a.projection, act="gelu"),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
    )


# ------------------------------------------------------------------ SD 3 / 3.5


@dataclass(frozen=True)
class SD3Arch:
    image_size: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    patch_size: int
    layers: int
    heads: int
    head_dim: int
    dual_attention_layers: tuple[int, ...]  # SD 3.5's extra image-only attention
    qk_norm: str | None
    pos_embed_max_size: int
    clip_l: tuple[int, int, int]
    clip_g: tuple[int, int, int]
    t5: tuple[int, int, int, int, int]  # width, layers, heads, ff, head_dim


def _build_sd3(a: SD3Arch) -> dict:
    t5_width = a.t5[0]
    transformer = SD3Transformer2DModel(
        sample_size=a.image_size // 2 ** (len(a.vae_channels) - 1), patch_size=a.patch_size, in_channels=16,
        out_channels=16, num_layers=a.layers, attention_head_dim=a.head_dim, num_attention_heads=a.heads,
        joint_attention_dim=t5_width, caption_projection_dim=a.heads * a.head_dim,
        pooled_projection_dim=a.clip_l[0] + a.clip_g[0], pos_embed_max_size=a.pos_embed_max_size,
        dual_attention_layers=a.dual_attention_layers, qk_norm=a.qk_norm,
    )
    return dict(
        vae=_vae(a.vae_channels, 16, a.image_size, 1.5305, 0.0609, a.vae_layers),
        transformer=transformer,
        # pooled widths sum to pooled_projection_dim: each projection is as wide as its encoder
        text_encoder=_clip(*a.clip_l, projection=a.clip_l[0]),
        text_encoder_2=_clip(*a.clip_g, projection=a.clip_g[0], act="gelu"),
        text_encoder_3=_t5(*a.t5),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        tokenizer_3=t5_tokenizer(),
    )


# ------------------------------------------------------------------ FLUX.1


@dataclass(frozen=True)
class FluxArch:
    image_size: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    latent_channels: int
    layers: int
    single_layers: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    guidance_embeds: bool  # FLUX.1-dev: True; schnell: False
    clip_l: tuple[int, int, int]
    t5: tuple[int, int, int, int, int]


def _build_flux(a: FluxArch) -> dict:
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * a.latent_channels, num_layers=a.layers, num_single_layers=a.single_layers,
        attention_head_dim=a.head_dim, num_attention_heads=a.heads, joint_attention_dim=a.t5[0],
        pooled_projection_dim=a.clip_l[0], guidance_embeds=a.guidance_embeds, axes_dims_rope=a.axes_dims_rope,
    )
    return dict(
        vae=_vae(a.vae_channels, a.latent_channels, a.image_size, 0.3611, 0.1159, a.vae_layers),
        transformer=transformer,
        text_encoder=_clip(*a.clip_l),
        text_encoder_2=_t5(*a.t5),
        tokenizer=clip_tokenizer(),
        tokenizer_2=t5_tokenizer(),
    )


_TINY_CLIP = (32, 2, 2)
PRESETS: dict[tuple[str, str], object] = {
    # For tests: 32 px (SDXL) / 64 px (SD3, FLUX) images, seconds on a CPU.
    ("sdxl", "tiny"): SDXLArch(
        image_size=32, vae_channels=(32, 64), vae_layers=1, unet_channels=(32, 64),
        down_blocks=("DownBlock2D", "CrossAttnDownBlock2D"), transformer_layers=(1, 2), heads=(2, 4),
        layers_per_block=1, time_embed_dim=8, clip_l=_TINY_CLIP, clip_g=_TINY_CLIP, projection=32),
    ("sd3", "tiny"): SD3Arch(
        image_size=64, vae_channels=(32, 64), vae_layers=1, patch_size=2, layers=2, heads=4, head_dim=8,
        dual_attention_layers=(), qk_norm=None, pos_embed_max_size=32, clip_l=_TINY_CLIP, clip_g=_TINY_CLIP,
        t5=(64, 1, 2, 64, 16)),
    ("sd3.5", "tiny"): SD3Arch(
        image_size=64, vae_channels=(32, 64), vae_layers=1, patch_size=2, layers=2, heads=4, head_dim=8,
        dual_attention_layers=(0,), qk_norm="rms_norm", pos_embed_max_size=32, clip_l=_TINY_CLIP, clip_g=_TINY_CLIP,
        t5=(64, 1, 2, 64, 16)),
    ("flux", "tiny"): FluxArch(
        image_size=64, vae_channels=(32, 64), vae_layers=1, latent_channels=1, layers=1, single_layers=1, heads=2,
        head_dim=16, axes_dims_rope=(4, 4, 8), guidance_embeds=True, clip_l=_TINY_CLIP, t5=(32, 1, 2, 64, 16)),
    # The published architectures (random weights), for the GPU benchmark.
    ("sdxl", "full"): SDXLArch(
        image_size=1024, vae_channels=(128, 256, 512, 512), vae_layers=2, unet_channels=(320, 640, 1280),
        down_blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), transformer_layers=(1, 2, 10),
        heads=(5, 10, 20), layers_per_block=2, time_embed_dim=256, clip_l=(768, 12, 12), clip_g=(1280, 32, 20),
        projection=1280),
    ("sd3.5", "full"): SD3Arch(  # SD 3.5 medium
        image_size=1024, vae_channels=(128, 256, 512, 512), vae_layers=2, patch_size=2, layers=24, heads=24,
        head_dim=64, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm", pos_embed_max_size=384,
        clip_l=(768, 12, 12), clip_g=(1280, 32, 20), t5=(4096, 24, 64, 10240, 64)),
    ("flux", "full"): FluxArch(  # FLUX.1-dev
        image_size=1024, vae_channels=(128, 256, 512, 512), vae_layers=2, latent_channels=16, layers=19,
        single_layers=38, heads=24, head_dim=128, axes_dims_rope=(16, 56, 56), guidance_embeds=True,
        clip_l=(768, 12, 12), t5=(4096, 24, 64, 10240, 64)),
}
_BUILDERS = {SDXLArch: _build_sdxl, SD3Arch: _build_sd3, FluxArch: _build_flux}
# The schedulers of the published models' folders (their timestep/sigma grids are stage 1's noise levels).
_SCHEDULERS = {
    SDXLArch: lambda: EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                             beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                             prediction_type="epsilon"),
    SD3Arch: lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    FluxArch: lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096),
}
PIPELINES = {SDXLArch: "StableDiffusionXLPipeline", SD3Arch: "StableDiffusion3Pipeline", FluxArch: "FluxPipeline"}


def build_family_components(family: str, preset: str = "tiny", seed: int = 0, device: str | torch.device | None = None,
                            dtype: torch.dtype | None = None) -> dict:
    """The components of a family's pipeline ("sdxl", "sd3", "sd3.5", "flux"), seeded random weights.

    `device` / `dtype`: build the networks there and in that dtype directly ("cuda" and bf16 for
    the published sizes, which would not fit twice; "meta" to count parameters without memory).
    """
    if (family, preset) not in PRESETS:
        raise ValueError(f"unknown family preset {(family, preset)!r}; choose one of {sorted(PRESETS)}")
    torch.manual_seed(seed)
    arch = PRESETS[(family, preset)]
    default_dtype = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            parts = _BUILDERS[type(arch)](arch)
    finally:
        torch.set_default_dtype(default_dtype)
    return {**parts, "scheduler": _SCHEDULERS[type(arch)]()}


def save_family_model(family: str, components: dict, out: Path) -> None:
    """A standard diffusers folder of the family's pipeline, loadable offline with `from_pretrained`."""
    import diffusers

    pipeline_cls = getattr(diffusers, PIPELINES[type(PRESETS[(family, "tiny")])])
    pipeline_cls(**components).save_pretrained(out, safe_serialization=True)
