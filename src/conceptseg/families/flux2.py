"""FLUX.2: an MMDiT with double-stream blocks (text and image streams, one joint softmax) followed by
parallel single-stream blocks (one [text, image] sequence); text tokens come first in both.

Conditioning as `Flux2Pipeline` forms it (its own `encode_prompt`): the prompt in a chat with the
pipeline's system message, padded to 512 tokens, through the Mistral text encoder; hidden states of
layers 10, 20 and 30 stacked on the feature axis; text ids (0, 0, 0, l). No pooled embedding. The
latents are the VAE's posterior mode patchified 2 x 2 (`Flux2Pipeline._patchify_latents`) and
normalised by the VAE's batch-norm statistics, as the pipeline's `_encode_vae_image`: this grid
(latent side = image side / 16, 4 x the VAE's channels) is what stage 1 noises, stage 2 trains on and
stages 3-4 sample; its tokens are packed (`_pack_latents`) with ids (0, row, column, 0)
(`_prepare_latent_ids`). FLUX.2-dev's guidance embedding at the pipeline's default 4.0 in every
pass (stage 1, training, sampling: the model is trained at what it is sampled at; diffusers' FLUX.2
DreamBooth script trains at 3.5). The concept's positions are in the chat's user turn.
Captured: every double- and single-stream block. Training and sampling: rectified flow, uniform
timesteps (diffusers' FLUX.2 DreamBooth script), the pipeline's sigmas linspace(1, 1/N, N) shifted
by its `compute_empirical_mu` (which depends on N as well as the token count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from conceptseg.concept_attention import FluxConceptProcessor, Flux2Branch, capture_concept_attention
from conceptseg.families.base import FamilyModel, span_token_positions
from conceptseg.joint_attention import Flux2CaptureProcessor, capture_joint_attention
from conceptseg.schedules import GRID_STEPS, FlowObjective, flow_noised, flow_sigma_grid
from conceptseg.vae import to_uint8

GUIDANCE = 4.0  # Flux2Pipeline's default guidance_scale
TEXT_LENGTH = 512  # the pipeline's max_sequence_length


def is_flux2_attention(name: str) -> bool:
    return name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".attn.processor")


def pipeline_class():
    from diffusers import Flux2Pipeline

    return Flux2Pipeline


@dataclass
class Flux2Conditioning:
    prompt_embeds: torch.Tensor  # (N, 512, 3 x W_text), a row per prompt


@dataclass
class Flux2Model(FamilyModel):
    vae: object = field(default=None, repr=False)
    transformer: object = field(default=None, repr=False)
    text_encoder: object = field(default=None, repr=False)  # Mistral Small 3.x
    tokenizer: object = field(default=None, repr=False)  # its PixtralProcessor (or a tokenizer with the chat template)
    scheduler: object = field(default=None, repr=False)

    family = "flux2"
    label = "FLUX.2 (MMDiT double- and single-stream attention, Mistral)"
    components = ("vae", "transformer", "text_encoder", "tokenizer", "scheduler")
    denoiser_name = "transformer"
    text_length = TEXT_LENGTH

    @property
    def resolution(self) -> int:
        return self.vae.config.sample_size  # 1024 for FLUX.2-dev, = the pipeline's default size

    @property
    def vae_scale_factor(self) -> int:
        """Image side / latent side of the patchified grid (16 for FLUX.2: the VAE's 8, then 2 x 2)."""
        return 2 * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return 4 * self.vae.config.latent_channels

    @property
    def attention_resolution(self) -> int:
        return self.latent_resolution  # one token per cell of the patchified grid

    @property
    def image_seq_len(self) -> int:
        return self.latent_resolution**2

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> the pipeline's normalised patchified latents (N, 4C, H/16, W/16)."""
        from conceptseg.geometry import to_model_input

        z = self.vae.encode(to_model_input(images, self.device, self.vae.dtype)).latent_dist.mode()
        z = pipeline_class()._patchify_latents(z.float())
        mean, std = self._bn(z)
        return ((z - mean) / std).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor):
        mean, std = self._bn(latents.float())
        z = pipeline_class()._unpatchify_latents(latents.float() * std + mean)
        return to_uint8(self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0])

    @property
    def objective(self) -> FlowObjective:
        mu = lambda steps: self.empirical_mu(steps)  # noqa: E731
        return FlowObjective(self.scheduler, "none", self.image_seq_len, explicit_sigmas=True, mu=mu)

    def empirical_mu(self, steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=self.image_seq_len, num_steps=steps)

    def _pipeline(self):
        return pipeline_class()(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                                tokenizer=self.tokenizer, transformer=self.transformer)

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> Flux2Conditioning:
        embeds, _ = self._pipeline().encode_prompt(prompts, device=self.device, max_sequence_length=TEXT_LENGTH)
        return Flux2Conditioning(embeds.to(self.dtype))

    def concept_token_positions(self, prompt: str, words) -> list[list[int]]:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        pipe = self._pipeline()
        chat = format_input(prompts=[prompt], system_message=pipe.system_message)
        call = dict(padding="max_length", truncation=True, max_length=TEXT_LENGTH)
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=True, return_dict=True,
                                                 **call)["input_ids"][0]
        text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
        text = text[0] if isinstance(text, list) else text
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a PixtralProcessor's text tokenizer
        return span_token_positions(tokenizer, text, text.rfind(prompt), prompt, words, TEXT_LENGTH, expected_ids=ids,
                                    add_special_tokens=False, **call)

    def noise_levels(self, t0: int, grid: str = "sampler") -> list[float]:
        return flow_sigma_grid(self.scheduler, t0, grid, explicit_sigmas=True, mu=self.empirical_mu(GRID_STEPS))

    def add_noise(self, latents: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return flow_noised(latents, eps, sigma)

    def denoise(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Flux2Conditioning, module=None) -> torch.Tensor:
        """The velocity on the patchified grid (B, 4C, h, w), packed and unpacked by the pipeline's helpers."""
        pipe, b = pipeline_class(), len(noisy)
        ids = pipe._prepare_latent_ids(noisy).to(self.device)
        embeds = cond.prompt_embeds.expand(b, -1, -1)
        guidance = torch.full((b,), GUIDANCE, device=self.device) if self.transformer.config.guidance_embeds else None
        packed = pipe._pack_latents(noisy.to(self.dtype))
        out = (module or self.transformer)(hidden_states=packed, timestep=sigma.expand(b).to(self.dtype), guidance=guidance,
                                           encoder_hidden_states=embeds, txt_ids=pipe._prepare_text_ids(embeds).to(self.device),
                                           img_ids=ids, return_dict=False)[0]
        return pipe._unpack_latents_with_ids(out[:, : packed.shape[1]], ids)

    def capture_attention(self, token_groups, per_level: bool = False, normalisation: str = "text",
                          maps: str = "cross-attention", concepts=None, concept_layers=None, **options):
        """The maps of `token_groups` (cross-attention), or with maps="concept-attention" those of the
        concept embeddings `concepts` in double-stream blocks `concept_layers`."""
        grid = (self.attention_resolution, self.attention_resolution)
        if maps == "concept-attention":
            return capture_concept_attention(self.transformer, concepts, grid, FluxConceptProcessor, concept_layers,
                                             branch=Flux2Branch)
        return capture_joint_attention(self.transformer, is_flux2_attention,
                                       lambda store: Flux2CaptureProcessor(store, TEXT_LENGTH, normalisation),
                                       token_groups, grid, per_level=per_level)

