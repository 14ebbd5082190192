"""Every family's components built from configs, with random weights: the registry of presets.

Named presets, keyed (family, preset), over one builder per family: SD 1.x/2.x's are `sd`'s (listed
here as ("sd", name)); SDXL, SD 3.x, FLUX.1, FLUX.2 and Qwen-Image are built here. `tiny` presets
(the sizes diffusers' own fast tests use) for the tests and the CPU run of the benchmark, and the
published architectures (random weights) for the GPU benchmark and `plan`. No T5
tokenizer ships offline, so `t5_tokenizer` builds one in code from a small Unigram vocabulary:
enough to tokenize test prompts the way T5 does (SentencePiece pieces with a leading "▁", an
end-of-sequence token, pad id 0), NOT T5's real 32k vocabulary. Likewise `qwen_tokenizer` and
`mistral_tokenizer` are byte-level BPE tokenizers built in code (the prompt templates' words and a
few prompt words as whole tokens, bytes for the rest), NOT Qwen's or Mistral's real vocabularies.
"""

from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from conceptseg.modeling import sd
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


# Qwen2's pre-tokenizer split (transformers' `tokenization_qwen2.PRETOKENIZE_REGEX`); Mistral's
# Tekken splits text the same way for the English prompts used here.
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_PROMPT_WORDS = " ".join(_T5_WORDS + ("sky", "branch", "A", "a photo of a"))


def _byte_level_bpe(corpus: str, specials: list[str]):
    """A byte-level BPE (`tokenizers`) in which every piece of `corpus` (after the split above) is one
    token and anything else falls back to its bytes; `specials` first in the vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    for piece, _ in split.pre_tokenize_str(corpus):  # merges that build each piece left to right
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                merges.append((piece[: end - 1], piece[end - 1]))
                vocab[piece[:end]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer, tok.decoder = split, decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok, vocab, merges


def qwen_tokenizer():
    """A Qwen2 tokenizer built in code (for tests; NOT Qwen's real vocabulary): the prompt template
    of `QwenImagePipeline` tokenizes as with the real one, its system part into the 34 tokens the
    pipeline drops."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode  # set in __init__
    corpus = template.replace("{}", _PROMPT_WORDS)
    for s in specials:
        corpus = corpus.replace(s, "\n")
    _, vocab, merges = _byte_level_bpe(corpus, specials)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=specials[1:])


# A chat template of the form of Mistral Small 3.1's: [SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST].
_MISTRAL_CHAT = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}{%- else %}"
    "{%- set ns = namespace(v='') %}{%- for block in message['content'] %}{%- if block['type'] == 'text' %}"
    "{%- set ns.v = ns.v + block['text'] %}{%- else %}{%- set ns.v = ns.v + '[IMG]' %}{%- endif %}{%- endfor %}"
    "{%- set text = ns.v %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}{%- endfor %}")


def mistral_tokenizer():
    """A Mistral-style tokenizer built in code (for tests; NOT Mistral's Tekken vocabulary), with a
    chat template of Mistral Small 3.1's form. FLUX.2 folders hold a PixtralProcessor (which needs
    torchvision); `Flux2Pipeline.encode_prompt` uses only its `apply_chat_template`, which this
    tokenizer has too."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                "[IMG_BREAK]", "[IMG_END]"]
    tok, _, _ = _byte_level_bpe(SYSTEM_MESSAGE + "\n" + _PROMPT_WORDS, specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=512, chat_template=_MISTRAL_CHAT)


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


# ------------------------------------------------------------------ FLUX.2


@dataclass(frozen=True)
class Flux2Arch:
    image_size: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    latent_channels: int  # the VAE's; the transformer reads them patchified 2 x 2 (4x as many)
    layers: int
    single_layers: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int, int]
    timestep_channels: int
    # Mistral: width, layers, heads, KV heads, head_dim, FF, vocabulary (None: the tokenizer's)
    text: tuple[int, int, int, int, int, int, int | None]
    vision: tuple[int, int, int, int, int, int]  # Pixtral: width, layers, heads, ff, image size, patch


def _mistral3(text: tuple, vision: tuple, vocab: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    width, layers, heads, kv, head_dim, ff, _ = text
    # special-token ids: those of `mistral_tokenizer` (they change no parameter count)
    config = Mistral3Config(
        text_config=MistralConfig(vocab_size=vocab, hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                                  max_position_embeddings=131072, rope_theta=1e9, rms_norm_eps=1e-5, sliding_window=None,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        vision_config=PixtralVisionConfig(hidden_size=vision[0], num_hidden_layers=vision[1], num_attention_heads=vision[2],
                                          intermediate_size=vision[3], image_size=vision[4], patch_size=vision[5],
                                          head_dim=vision[0] // vision[2]),
        image_token_index=8, spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False,
        vision_feature_layer=-1, tie_word_embeddings=False)
    return Mistral3ForConditionalGeneration(config)


def _flux2_vae(a: Flux2Arch) -> AutoencoderKLFlux2:
    n = len(a.vae_channels)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=a.vae_channels, layers_per_block=a.vae_layers,
                             latent_channels=a.latent_channels, norm_num_groups=min(32, a.vae_channels[0]),
                             sample_size=a.image_size)
    if vae.bn.running_mean.device.type != "meta":  # the published VAE's batch-norm statistics are not 0 and 1
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _build_flux2(a: Flux2Arch) -> dict:
    tokenizer = mistral_tokenizer()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * a.latent_channels, num_layers=a.layers, num_single_layers=a.single_layers,
        attention_head_dim=a.head_dim, num_attention_heads=a.heads,
        joint_attention_dim=3 * a.text[0],  # the pipeline stacks three hidden-state layers (10, 20, 30)
        timestep_guidance_channels=a.timestep_channels, axes_dims_rope=a.axes_dims_rope, guidance_embeds=True)
    return dict(vae=_flux2_vae(a), transformer=transformer,
                text_encoder=_mistral3(a.text, a.vision, a.text[6] or len(tokenizer)), tokenizer=tokenizer)


# ------------------------------------------------------------------ Qwen-Image


@dataclass(frozen=True)
class QwenImageArch:
    image_size: int | None  # the canvas the tiny models record in vae/config.json; None: the pipeline's default
    vae_base: int
    vae_mult: tuple[int, ...]
    vae_blocks: int
    temporal_downsample: tuple[bool, ...]
    latent_channels: int
    layers: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    # Qwen2.5: width, layers, heads, KV heads, FF, M-RoPE sections, vocabulary (None: the tokenizer's)
    text: tuple[int, int, int, int, int, tuple[int, int, int], int | None]
    vision: tuple[int, int, int, int, int]  # Qwen2.5-VL vision: width, depth, heads, ff, full-attention period


def _qwen25_vl(text: tuple, vision: tuple, vocab: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    width, layers, heads, kv, ff, mrope, _ = text
    v_width, depth, v_heads, v_ff, period = vision
    # special-token ids: those of `qwen_tokenizer`, the vision tokens last (they change no parameter count)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128000,
                         rope_theta=1e6, rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": list(mrope)},
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=2),
        vision_config=dict(depth=depth, hidden_size=v_width, intermediate_size=v_ff, num_heads=v_heads, out_hidden_size=width,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu",
                           fullatt_block_indexes=list(range(period - 1, depth, period))),
        image_token_id=vocab - 3, video_token_id=vocab - 2, vision_start_token_id=vocab - 1, tie_word_embeddings=False)
    return Qwen2_5_VLForConditionalGeneration(config)


def _build_qwenimage(a: QwenImageArch) -> dict:
    tokenizer = qwen_tokenizer()
    z = a.latent_channels
    g = torch.Generator().manual_seed(1)  # the published latents' statistics are not 0 and 1: random ones for tests
    stats = ({} if a.image_size is None else
             dict(latents_mean=torch.randn(z, generator=g, device="cpu").mul(0.5).tolist(),  # (also when built on "meta")
                  latents_std=torch.rand(z, generator=g, device="cpu").add(0.5).tolist()))
    vae = AutoencoderKLQwenImage(base_dim=a.vae_base, z_dim=z, dim_mult=list(a.vae_mult), num_res_blocks=a.vae_blocks,
                                 temperal_downsample=list(a.temporal_downsample), **stats)
    if a.image_size is not None:  # read back as a hidden config entry (families/qwenimage.py)
        vae.register_to_config(sample_size=a.image_size)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z, out_channels=z, num_layers=a.layers, attention_head_dim=a.head_dim,
        num_attention_heads=a.heads, joint_attention_dim=a.text[0], guidance_embeds=False, axes_dims_rope=a.axes_dims_rope)
    vocab = a.text[6] or len(tokenizer) + 3  # + the image, video and vision-start tokens
    return dict(vae=vae, transformer=transformer, text_encoder=_qwen25_vl(a.text, a.vision, vocab), tokenizer=tokenizer)


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
    # FLUX.2's pipeline stacks the text encoder's hidden states 10, 20 and 30: the tiny Mistral has 30 layers
    ("flux2", "tiny"): Flux2Arch(
        image_size=64, vae_channels=(32, 64), vae_layers=1, latent_channels=4, layers=2, single_layers=1, heads=2,
        head_dim=16, axes_dims_rope=(4, 4, 4, 4), timestep_channels=256, text=(16, 30, 2, 1, 8, 32, None),
        vision=(16, 1, 2, 32, 32, 8)),
    ("qwenimage", "tiny"): QwenImageArch(
        image_size=64, vae_base=16, vae_mult=(1, 2), vae_blocks=1, temporal_downsample=(False,), latent_channels=4,
        layers=2, heads=2, head_dim=16, axes_dims_rope=(8, 4, 4), text=(16, 2, 2, 1, 32, (1, 1, 2), None),
        vision=(16, 1, 2, 16, 1)),
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
    # FLUX.2-dev: the transformer and VAE are diffusers' Flux2Transformer2DModel / AutoencoderKLFlux2
    # defaults, which are FLUX.2-dev's (scripts/convert_flux2_to_diffusers.py, "flux2-dev"); the text
    # encoder is Mistral Small 3.1/3.2 24B (Mistral3ForConditionalGeneration: text 5120 wide, 40 layers,
    # 32 heads, 8 KV heads, FF 32768, vocabulary 131072; Pixtral vision 1024 wide, 24 layers, 16 heads,
    # FF 4096, 1540 px, patch 14), the dimensions of its published config.json.
    ("flux2", "full"): Flux2Arch(
        image_size=1024, vae_channels=(128, 256, 512, 512), vae_layers=2, latent_channels=32, layers=8, single_layers=48,
        heads=48, head_dim=128, axes_dims_rope=(32, 32, 32, 32), timestep_channels=256,
        text=(5120, 40, 32, 8, 128, 32768, 131072), vision=(1024, 24, 16, 4096, 1540, 14)),
    # Qwen-Image: the transformer and VAE are diffusers' QwenImageTransformer2DModel /
    # AutoencoderKLQwenImage defaults, which are Qwen-Image's; the text encoder is Qwen2.5-VL-7B-Instruct
    # (text 3584 wide, 28 layers, 28 heads, 4 KV heads, FF 18944, M-RoPE sections 16/24/24, vocabulary
    # 152064; vision 1280 wide, 32 layers, 16 heads, FF 3420, full attention every 8th layer), the
    # dimensions of its published config.json. The canvas is the pipeline's default (1024 px).
    ("qwenimage", "full"): QwenImageArch(
        image_size=None, vae_base=96, vae_mult=(1, 2, 4, 4), vae_blocks=2, temporal_downsample=(False, True, True),
        latent_channels=16, layers=60, heads=24, head_dim=128, axes_dims_rope=(16, 56, 56),
        text=(3584, 28, 28, 4, 18944, (16, 24, 24), 152064), vision=(1280, 32, 16, 3420, 8)),
}
PRESETS.update({("sd", name): arch for name, arch in sd.PRESETS.items()})
_BUILDERS = {sd.SDArch: sd.build_networks, SDXLArch: _build_sdxl, SD3Arch: _build_sd3, FluxArch: _build_flux,
             Flux2Arch: _build_flux2, QwenImageArch: _build_qwenimage}
# The schedulers of the published models' folders (their timestep/sigma grids are stage 1's noise levels).
_SCHEDULERS = {
    sd.SDArch: lambda a: sd.build_scheduler(a.prediction_type),
    SDXLArch: lambda a: EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                               beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                               prediction_type="epsilon"),
    SD3Arch: lambda a: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    FluxArch: lambda a: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                        base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                        max_image_seq_len=4096),
    # FLUX.2-dev's folder carries FLUX.1-dev's scheduler (scripts/convert_flux2_to_diffusers.py); its
    # pipeline computes the shift `mu` itself (`compute_empirical_mu`)
    Flux2Arch: lambda a: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                         base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                         max_image_seq_len=4096),
    # Qwen-Image's scheduler/scheduler_config.json
    QwenImageArch: lambda a: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                             base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                             max_image_seq_len=8192, shift_terminal=0.02,
                                                             time_shift_type="exponential"),
}


def build_family_components(family: str, preset: str = "tiny", seed: int = 0, device: str | torch.device | None = None,
                            dtype: torch.dtype | None = None) -> dict:
    """The components of a family's pipeline ("sd", "sdxl", "sd3", "sd3.5", "flux", "flux2", "qwenimage"),
    seeded random weights.

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
    return {**parts, "scheduler": _SCHEDULERS[type(arch)](arch)}


def save_family_model(family: str, components: dict, out: Path) -> None:
    """A standard diffusers folder of the family's pipeline, loadable offline with `from_pretrained`."""
    from conceptseg.families import save_components

    save_components(family, components, out)
