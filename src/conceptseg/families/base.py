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
import re
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


def span_token_positions(tokenizer, text: str, prompt_start: int, prompt: str, words: Sequence[str], limit: int,
                         drop: int = 0, expected_ids: Sequence[int] | None = None, **call) -> list[list[int]]:
    """Positions of each word of `prompt` in the denoiser's text sequence, for families whose pipeline
    wraps the prompt in a template (Qwen-Image) or a chat (FLUX.2): `text` is the filled-in template
    with the prompt at character `prompt_start`. A word's positions are the tokens whose character
    spans overlap its first whole-word occurrence (case-insensitive), less the `drop` leading tokens
    the pipeline cuts, below `limit` (the text tokens the denoiser reads). `call`: the tokenizer call's arguments as the pipeline
    passes them; `expected_ids`: the ids the pipeline's own call gives, which this call must reproduce.
    (Matching on character spans rather than token ids: a byte-level BPE codes a word differently
    after a space, and the template's tokens next to the prompt may merge with it.)"""
    enc = tokenizer(text, return_offsets_mapping=True, **call)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if expected_ids is not None and ids != list(expected_ids):
        raise ValueError("the tokenizer gives other ids for the prompt than the pipeline's encoding does; "
                         "the concept's text tokens cannot be placed")
    found = []
    for word in words:
        m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"concept word {word!r} does not occur in the prompt {prompt!r}")
        a, b = prompt_start + m.start(), prompt_start + m.end()
        hits = [i - drop for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a and drop <= i < drop + limit]
        if not hits:
            raise ValueError(f"concept word {word!r} falls beyond the {limit} text tokens the model reads; "
                             "shorten the prompt")
        found.append(hits)
    return found


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_targets(denoiser) -> list[str]:
    """The modules `--method lora` adapts: every attention's to_q / to_k / to_v / to_out.0, and in
    FLUX.2's single-stream blocks, whose q/k/v are fused with the MLP's input and whose output
    projection is one Linear, `to_qkv_mlp_proj` and `attn.to_out`, as diffusers' FLUX.2 DreamBooth
    script adapts them."""
    names = list(LORA_TARGETS)
    singles = getattr(denoiser, "single_transformer_blocks", None) or []
    if singles and hasattr(singles[0].attn, "to_qkv_mlp_proj"):
        names += ["to_qkv_mlp_proj"] + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(singles))]
    return names
