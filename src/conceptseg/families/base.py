"""What every family shares: the interface the stages are typed against (`DiffusionModel`), VAE
encoding, residency, loading and saving (`FamilyModel`), and token positions over several
tokenizers. Each family's module (`sd`, `sdxl`, `sd3`, `flux`, `flux2`, `qwenimage`) subclasses
`FamilyModel` with its denoiser, encoders and tokenizers.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Protocol, Sequence

import numpy as np
import torch

from conceptseg.residency import Residency
from conceptseg.schedules import DDPMObjective, FlowObjective
from conceptseg.vae import LatentCodec
from conceptseg.tokenizer import concept_token_positions

if TYPE_CHECKING:
    from conceptseg.attention import CrossAttentionStore


class DiffusionModel(Protocol):
    """What the stages ask of a loaded model, whatever its family (`load_model` returns one).

    Noise levels are timesteps (DDPM families) or sigmas (flow families); a conditioning is whatever
    the family's `denoise` reads (a tensor, or a dataclass of batch-first tensors: `select_rows`).
    A family whose pipeline guides otherwise than `negative + scale * (positive - negative)` also
    has `guided_prediction(positive, negative, scale)` (`inpaint` looks for it).
    """

    family: str  # the registry's name: "sd", "sdxl", "sd3", "flux", "flux2", "qwenimage"
    source: str  # where it was loaded from (a path, a hub id, an embedded name)
    device: torch.device
    dtype: torch.dtype
    denoiser_name: str  # the denoiser's component name: "unet" or "transformer"

    # ---- geometry
    @property
    def resolution(self) -> int:
        """Canvas side in pixels."""

    @property
    def vae_scale_factor(self) -> int:
        """Image side / latent side."""

    @property
    def latent_resolution(self) -> int: ...

    @property
    def latent_channels(self) -> int: ...

    @property
    def attention_resolution(self) -> int:
        """Side of the grid stage 1's maps live on."""

    # ---- stage 1
    def describe(self) -> str: ...

    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> latents (N, C, h, w) as the family's pipeline forms them."""

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 images (N, H, W, 3)."""

    def text_conditioning(self, prompt: str) -> Any:
        """`conditioning([prompt])`: one row."""

    def concept_token_positions(self, prompt: str, words: Sequence[str]) -> list[list[int]]:
        """Each word's positions in the denoiser's text sequence."""

    def noise_levels(self, t0: int, grid: str = "sampler") -> list:
        """The T0 noise levels, ascending."""

    def add_noise(self, latents: torch.Tensor, eps: torch.Tensor, levels: torch.Tensor) -> torch.Tensor: ...

    def denoise(self, noisy: torch.Tensor, levels: torch.Tensor, cond: Any,
                module: torch.nn.Module | None = None) -> torch.Tensor:
        """One conditional pass of `module` (default: the model's own denoiser): the prediction (B, C, h, w)."""

    def capture_attention(self, token_groups: Sequence[Sequence[int]], per_level: bool = False,
                          **options) -> ContextManager[CrossAttentionStore]:
        """A context manager under which `denoise` adds each group's maps to the yielded store."""

    # ---- stages 2-4
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network stage 2 trains."""

    @property
    def objective(self) -> DDPMObjective | FlowObjective:
        """Training batches and samplers."""

    def conditioning(self, prompts: list[str]) -> Any:
        """One row per prompt."""

    def save_pretrained(self, dest: Path, denoiser: torch.nn.Module | None = None) -> None:
        """A diffusers folder of the family's pipeline, with `denoiser` in place of the model's own."""

    # ---- residency (`conceptseg.residency`)
    def to(self, device: torch.device | str) -> DiffusionModel: ...

    def cast_frozen(self, dtype: torch.dtype) -> None: ...

    def offload_text_encoders(self, keep: bool = True) -> None: ...

    def release(self) -> None: ...


@dataclass
class FamilyModel(LatentCodec, Residency):
    """Fields every family has; subclasses add their denoiser, encoders and tokenizers (dataclass
    fields named as the components of the family's diffusers pipeline) and `DiffusionModel`'s methods."""

    source: str
    device: torch.device
    dtype: torch.dtype

    family = "?"
    label = "?"
    # unannotated: class attributes (a ClassVar would still be listed in __dataclass_fields__, which the loaders read)
    components = ()  # the pipeline components a folder must hold
    pipeline_options = {}  # further arguments of the pipeline's constructor when saving

    @classmethod
    def from_pretrained(cls, source, device: torch.device, dtype: torch.dtype, local_files_only: bool,
                        source_label: str):
        """Load the family's pipeline with diffusers and keep the parts the stages use."""
        import diffusers

        from conceptseg.families import FAMILY_LABELS, pipeline_name

        pipe = getattr(diffusers, pipeline_name(cls.family)).from_pretrained(source, dtype=dtype, use_safetensors=True,
                                                                         local_files_only=local_files_only)
        names = [k for k in cls.__dataclass_fields__ if k not in ("source", "device", "dtype")]
        parts = {k: getattr(pipe, k) if k in pipe.components else pipe.config.get(k) for k in names}  # modules, then settings
        missing = [k for k in cls.components if parts.get(k) is None]
        if missing:
            raise ValueError(f"the {FAMILY_LABELS[cls.family]} pipeline has no {', '.join(missing)} (a refiner or a "
                             "partial checkpoint?); stage 1 needs them")
        for m in parts.values():
            if isinstance(m, torch.nn.Module):
                m.to(device).eval().requires_grad_(False)
        vae = parts["vae"]
        if dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)  # SDXL's VAE overflows in fp16, as its pipelines know
        return cls(source=source_label, device=device, dtype=dtype, **parts)

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
        from conceptseg.families import save_components

        names = [f.name for f in dataclasses.fields(self) if f.name not in ("source", "device", "dtype")]
        parts = {k: getattr(self, k) for k in names} | ({self.denoiser_name: denoiser} if denoiser is not None else {})
        save_components(self.family, parts, dest)


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
