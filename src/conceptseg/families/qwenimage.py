"""Qwen-Image: an MMDiT of double-stream blocks only ([text, image] in one joint softmax per block,
text first; each stream rotated by its own RoPE).

Conditioning as `QwenImagePipeline` forms it (its own `encode_prompt`): the prompt in the pipeline's
template through Qwen2.5-VL, the last hidden states with the template's 34 leading system tokens
dropped, at most 512 tokens (the pipeline's `max_sequence_length`); several prompts are padded to
the longest, and the padding is masked (`encoder_hidden_states_mask`). No pooled embedding, no
guidance embedding. The latents are the (causal 3-D) VAE's posterior mode of the image as one frame,
normalised by the VAE's `latents_mean` / `latents_std`, as the pipeline's `_encode_vae_image`;
denoised packed 2 x 2 (`QwenImagePipeline._pack_latents`), with `img_shapes` for the RoPE. The
concept's positions are in the prompt's part of the template. Captured: every block. The maps live on
the packed-token grid (latent side / 2: 64 x 64 at 1024 px). Training and sampling: rectified flow,
uniform timesteps (diffusers' Qwen-Image DreamBooth script), the pipeline's sigmas
linspace(1, 1/N, N) shifted for the token count by the scheduler (exponential time shift, terminal
sigma 0.02). `--guidance` runs the pipeline's true classifier-free guidance, with its rescaling of the
guided prediction to the conditional one's norm per token.

The canvas: Qwen-Image's folders name no image size, so the pipeline's default is used
(`default_sample_size` 128 x 8 = 1024 px; its model card recommends 1328 px for 1:1). A
`sample_size` entry in vae/config.json (which diffusers keeps as an unused config entry) sets
another; the tiny test models record theirs there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conceptseg.concept_attention import QwenBranch, QwenConceptProcessor, capture_concept_attention
from conceptseg.families.base import FamilyModel, span_token_positions
from conceptseg.joint_attention import QwenCaptureProcessor, capture_joint_attention
from conceptseg.schedules import FlowObjective, flow_noised, flow_sigma_grid
from conceptseg.vae import to_uint8

TEXT_LENGTH = 512  # QwenImagePipeline.__call__'s max_sequence_length
DEFAULT_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size (latent side of the default canvas)


def is_qwen_attention(name: str) -> bool:
    return name.startswith("transformer_blocks.") and name.endswith(".attn.processor")


def pipeline_class():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


@dataclass
class QwenImageConditioning:
    prompt_embeds: torch.Tensor  # (N, L, W_text), a row per prompt, padded to the longest
    mask: torch.Tensor  # (N, L) bool: the tokens that are not padding


@dataclass
class QwenImageModel(FamilyModel):
    vae: object = field(default=None, repr=False)
    transformer: object = field(default=None, repr=False)
    text_encoder: object = field(default=None, repr=False)  # Qwen2.5-VL
    tokenizer: object = field(default=None, repr=False)
    scheduler: object = field(default=None, repr=False)

    family = "qwenimage"
    label = "Qwen-Image (MMDiT joint attention, Qwen2.5-VL)"
    components = ("vae", "transformer", "text_encoder", "tokenizer", "scheduler")
    denoiser_name = "transformer"
    text_length = TEXT_LENGTH

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)  # as the pipeline (8 for Qwen-Image)

    @property
    def resolution(self) -> int:
        return self.vae.config.get("sample_size") or DEFAULT_SAMPLE_SIZE * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def attention_resolution(self) -> int:
        return self.latent_resolution // 2

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents_mean, 1 / latents_std) as the pipeline forms them, (1, C, 1, 1)."""
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> the pipeline's normalised latents (N, C, H/8, W/8) of one frame."""
        from conceptseg.geometry import to_model_input

        x = to_model_input(images, self.device, self.vae.dtype)[:, :, None]  # (N, 3, 1, H, W): one frame
        z = self.vae.encode(x).latent_dist.mode()[:, :, 0].float()
        mean, inv_std = self._stats(z)
        return ((z - mean) * inv_std).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor):
        mean, inv_std = self._stats(latents.float())
        z = (latents.float() / inv_std + mean)[:, :, None].to(self.vae.dtype)
        return to_uint8(self.vae.decode(z, return_dict=False)[0][:, :, 0])

    @property
    def objective(self) -> FlowObjective:
        return FlowObjective(self.scheduler, "none", self.attention_resolution**2, explicit_sigmas=True)

    def _pipeline(self):
        return pipeline_class()(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                                tokenizer=self.tokenizer, transformer=self.transformer)

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> QwenImageConditioning:
        embeds, mask = self._pipeline().encode_prompt(prompts, device=self.device, max_sequence_length=TEXT_LENGTH)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        return QwenImageConditioning(embeds.to(self.dtype), mask)

    def concept_token_positions(self, prompt: str, words) -> list[list[int]]:
        pipe = self._pipeline()
        template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        call = dict(max_length=pipe.tokenizer_max_length + drop, truncation=True)
        return span_token_positions(self.tokenizer, template.format(prompt), template.index("{}"), prompt, words,
                                    TEXT_LENGTH, drop=drop, **call)

    def noise_levels(self, t0: int, grid: str = "sampler") -> list[float]:
        return flow_sigma_grid(self.scheduler, t0, grid, image_seq_len=self.attention_resolution**2, explicit_sigmas=True)

    def add_noise(self, latents: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return flow_noised(latents, eps, sigma)

    def _pack(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        return pipeline_class()._pack_latents(z, b, c, h, w)

    def _unpack(self, packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
        f = self.vae_scale_factor
        return pipeline_class()._unpack_latents(packed, h * f, w * f, f)[:, :, 0]

    def denoise(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: QwenImageConditioning, module=None) -> torch.Tensor:
        """The velocity on the latent grid (B, C, h, w), packed and unpacked by the pipeline's helpers."""
        b, _, h, w = noisy.shape
        mask = cond.mask.expand(b, -1)
        out = (module or self.transformer)(
            hidden_states=self._pack(noisy.to(self.dtype)), timestep=sigma.expand(b).to(self.dtype),
            encoder_hidden_states=cond.prompt_embeds.expand(b, -1, -1),
            encoder_hidden_states_mask=None if mask.all() else mask,  # the pipeline passes None without padding
            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return self._unpack(out, h, w)

    def guided_prediction(self, positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's true classifier-free guidance: the guided prediction rescaled, token by token
        (packed 2 x 2), to the norm of the conditional one."""
        _, _, h, w = positive.shape
        pos, neg = self._pack(positive), self._pack(negative)
        combined = neg + scale * (pos - neg)
        combined = combined * (pos.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return self._unpack(combined, h, w)

    def capture_attention(self, token_groups, per_level: bool = False, normalisation: str = "text",
                          maps: str = "cross-attention", concepts=None, concept_layers=None, **options):
        """The maps of `token_groups` (cross-attention), or with maps="concept-attention" those of the
        concept embeddings `concepts` in blocks `concept_layers`."""
        grid = (self.attention_resolution, self.attention_resolution)
        if maps == "concept-attention":
            return capture_concept_attention(self.transformer, concepts, grid, QwenConceptProcessor, concept_layers,
                                             branch=QwenBranch)
        return capture_joint_attention(self.transformer, is_qwen_attention,
                                       lambda store: QwenCaptureProcessor(store, normalisation), token_groups, grid,
                                       per_level=per_level)
