"""Loading a Stable-Diffusion-style model: a local diffusers folder, a hub id, or the embedded default."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from conceptseg.residency import Residency
from conceptseg.vae import LatentCodec
from conceptseg.schedules import DDPMObjective, ddpm_noised, scheduler_from_config, timestep_grid
from conceptseg.tokenizer import check_prompt_length, concept_token_positions

COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
EMBEDDED_MODEL = "embedded:toy"
EMBEDDED_CHEST_MODEL = "embedded:chest"  # the toy model fine-tuned on chest-world reports (docs/medical.md)
# The models that ship with the package: name -> (assets folder, the toy world it knows). "embedded:toy"
# is the default; "toy-v1" / "toy-v2" name a version (docs/toy_model.md).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    EMBEDDED_MODEL: ("toy_model", "v1"),
    "embedded:toy-v1": ("toy_model", "v1"),
    "embedded:toy-v2": ("toy_model_v2", "v2"),
    EMBEDDED_CHEST_MODEL: ("chest_model", "chest"),
}
# A LoRA fine-tune (stage 2) is saved as diffusers' LoRA weights file plus this note of its base model.
LORA_CONFIG_FILE = "conceptseg_lora.json"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says what is missing."""


def embedded_model_path(name: str = "toy_model") -> Path:
    return Path(str(resources.files("conceptseg") / "assets" / name))


def embedded_folder(model: str | Path | None) -> Path | None:
    """The assets folder of an embedded model name (None: the default), or None for any other model."""
    if model is not None and str(model) not in EMBEDDED_MODELS:
        return None
    return embedded_model_path(EMBEDDED_MODELS[str(model or EMBEDDED_MODEL)][0])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return table[dtype]


@dataclass
class DiffusionModel(LatentCodec, Residency):
    """The parts of a latent diffusion model the pipeline uses, on one device and dtype.

    Also the SD 1.x/2.x member of the stage-1 interface every family gives (`conceptseg.families`).
    """

    family = "sd"
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    source: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side the model was trained at (512 for SD 1.x)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def latent_resolution(self) -> int:
        return self.unet.config.sample_size

    @property
    def attention_resolution(self) -> int:
        """Side of the grid stage 1's maps are averaged on: the latent grid."""
        return self.unet.config.sample_size

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    # ---- stage 1 (the interface of conceptseg.families)

    def describe(self) -> str:
        return f"Stable Diffusion 1.x/2.x (UNet cross-attention) from {self.source}"

    def text_conditioning(self, prompt: str) -> torch.Tensor:
        return self.encode_prompts([prompt])

    def concept_token_positions(self, prompt: str, words) -> list[list[int]]:
        return concept_token_positions(self.tokenizer, prompt, words)

    def noise_levels(self, t0: int, grid: str = "sampler") -> list[int]:
        """The T0 smallest timesteps of the 50-step DDIM grid (the same for either `grid`)."""
        return timestep_grid(t0, offset=self.scheduler.config.get("steps_offset", 1) or 0)

    def add_noise(self, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ddpm_noised(self.alphas_cumprod, latents, eps, t)

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, module=None) -> torch.Tensor:
        """One conditional pass; `module`: the UNet as a trainer wrapped it (default: this model's)."""
        return (module or self.unet)(noisy.to(self.dtype), t, cond.expand(len(noisy), -1, -1)).sample

    def capture_attention(self, token_groups, per_level: bool = False, **options):
        from conceptseg.attention import capture_cross_attention

        grid = (self.attention_resolution, self.attention_resolution)
        return capture_cross_attention(self.unet, token_groups, grid, per_level=per_level)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        self.check_text_encoders()
        for prompt in prompts:
            check_prompt_length(self.tokenizer, prompt)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        # on the encoder's device: the CPU once it was offloaded (`residency`)
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(self.device, self.dtype)

    # ---- stages 2-4 (the interface of conceptseg.families)

    denoiser_name = "unet"

    @property
    def denoiser(self) -> UNet2DConditionModel:
        return self.unet

    @property
    def objective(self) -> DDPMObjective:
        return DDPMObjective(self.scheduler)

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        """One row per prompt, for `denoise` (select rows with `families.select_rows`)."""
        return self.encode_prompts(prompts)

    def save_pretrained(self, dest: Path, denoiser=None) -> None:
        """This model, with `denoiser` for its UNet, as a standard diffusers folder."""
        save_model(dict(vae=self.vae, unet=denoiser or self.unet, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                        scheduler=self.scheduler), dest)


def _load_parts(source, dtype: torch.dtype, local_files_only: bool) -> tuple:
    # use_safetensors=True: weights are never unpickled from a .bin a user may not have made
    kw = dict(local_files_only=local_files_only)
    return (
        AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, use_safetensors=True, **kw),
        UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, use_safetensors=True, **kw),
        CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, use_safetensors=True, **kw),
        CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
        scheduler_from_config(DDIMScheduler, DDIMScheduler.load_config(source, subfolder="scheduler", **kw)),
    )


def _check_folder(path: Path, components=COMPONENTS, kind: str = "Stable Diffusion") -> None:
    missing = []
    for name in components:
        sub = path / name
        if not sub.is_dir():
            missing.append(f"{name}/ (folder missing)")
        elif name.startswith("tokenizer"):
            files = ("tokenizer.json", "spiece.model")
            if not ((sub / "vocab.json").exists() and (sub / "merges.txt").exists()) and not any((sub / f).exists() for f in files):
                missing.append(f"{name}/vocab.json + merges.txt" if name == "tokenizer" else f"{name}/ tokenizer files")
        elif name == "scheduler":
            if not (sub / "scheduler_config.json").exists():
                missing.append("scheduler/scheduler_config.json")
        else:
            if not (sub / "config.json").exists():
                missing.append(f"{name}/config.json")
            if not any(sub.glob("*.safetensors")):
                pickled = " (only pickled .bin weights, which are not loaded: convert them to safetensors)" if any(sub.glob("*.bin")) else ""
                missing.append(f"{name}/ weights (*.safetensors){pickled}")
    if missing:
        raise ModelLoadError(f"{path} is not a complete diffusers {kind} folder; missing: {', '.join(missing)}")


def load_model(model: str | Path | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None):
    """Load a diffusers folder or hub id; the family comes from its model_index.json.

    Stable Diffusion 1.x/2.x (or a folder without model_index.json) gives a `DiffusionModel` (vae,
    unet, text encoder, tokenizer, scheduler); SDXL, SD 3.x and FLUX.1 give the family's model of
    `conceptseg.families`; every stage runs on each. `model.family` and `model.describe()` say
    which was found. `None` or "embedded:toy" is the toy-world model that ships with the package.
    """
    from conceptseg.families import FAMILY_LABELS, UnsupportedFamily, family_of, read_model_index, required_components

    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if model is not None and (Path(model) / LORA_CONFIG_FILE).exists():
        return _load_lora(Path(model), device, torch_dtype)
    if embedded_folder(model) is not None:
        path = embedded_folder(model)
        if not path.is_dir():
            raise ModelLoadError(f"the embedded model {model or EMBEDDED_MODEL} is not installed at {path}; pass --model "
                                 f"(installed: {', '.join(n for n, (d, _) in EMBEDDED_MODELS.items() if embedded_model_path(d).is_dir())})")
        source, local = str(model or EMBEDDED_MODEL), True
    else:
        path = Path(model)
        local = path.exists()
        source = str(path.resolve()) if local else str(model)
    if local and not path.is_dir():
        raise ModelLoadError(f"{path} is a file; --model takes a diffusers folder or a hub id")
    source_id = path if local else str(model)
    try:
        index = read_model_index(source_id, local)
        family = family_of(index, str(path if local else model)) if index is not None else "sd"
    except UnsupportedFamily as e:
        raise ModelLoadError(str(e)) from None
    if family != "sd":
        if local:
            _check_folder(path, required_components(family, index), FAMILY_LABELS[family])
        return _load_with_fallback(lambda offline: _load_family(family, source_id, device, torch_dtype, offline, source),
                                   path, model, local)
    if local:
        _check_folder(path)
    parts = _load_with_fallback(lambda offline: _load_parts(source_id, torch_dtype, local_files_only=offline),
                                path, model, local)
    vae, unet, text_encoder, tokenizer, scheduler = parts
    for m in (vae, unet, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return DiffusionModel(vae, unet, text_encoder, tokenizer, scheduler, source, device, torch_dtype)


def _load_family(family, source_id, device, dtype, local_files_only, source):
    from conceptseg.families import load_family_model

    return load_family_model(family, source_id, device, dtype, local_files_only, source)


def _load_with_fallback(load, path: Path, model, local: bool):
    """load(offline=True); for a hub id not in the cache, one online attempt; errors name the source."""
    try:
        return load(True)
    except (OSError, ValueError) as e:
        if local or os.environ.get("HF_HUB_OFFLINE") == "1":
            where = f"local folder {path}" if local else f"hub id {model!r} (offline, and not in the local cache)"
            raise ModelLoadError(f"could not load the model from {where}: {str(e).splitlines()[0]}") from None
        try:  # not cached: a hub id is worth one online attempt
            return load(False)
        except (OSError, ValueError) as e2:
            raise ModelLoadError(f"could not load the model from hub id {model!r} (not a local folder, not cached, "
                                 f"and the hub did not answer): {str(e2).splitlines()[0]}") from None


def _load_lora(path: Path, device: torch.device, dtype: torch.dtype):
    note = json.loads((path / LORA_CONFIG_FILE).read_text())
    base = load_model(note["base_model"], device=device, dtype=dtype)
    denoiser = base.denoiser
    try:
        denoiser.load_lora_adapter(str(path), weight_name=note.get("weights", LORA_WEIGHTS_FILE), prefix=base.denoiser_name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: could not apply the LoRA weights to {note['base_model']}: {e}") from None
    denoiser.fuse_lora()  # one set of weights again: no adapter overhead at inference
    denoiser.unload_lora()
    base.source = str(path.resolve())
    return base


# Toy-world images are small squares (`conceptseg toyworld --size`, 64 px by default, the embedded
# model's resolution). The check reads only image sizes, so it costs nothing and never misfires on
# toy-world data; an image that is not square, or has a side above twice the model's resolution,
# is taken for a photo.
TOY_WORLD_WARNING = (
    "the embedded toy-world model ({model}) is being applied to images that are not toy-world images "
    "(for example one of {size[0]}x{size[1]}; toy-world images are squares of at most {limit} px). It only knows the "
    "procedural toy world: its maps and masks on photos mean nothing. Pass a real Stable Diffusion model: "
    "--model PATH_OR_HUB_ID (a diffusers folder, e.g. of stable-diffusion-v1-5), or RunConfig.model in Python."
)


def warn_if_not_toy_world(model: DiffusionModel, sizes) -> bool:
    """Warn (once per call site) when the embedded model meets an image that is not a toy-world image;
    `sizes` are (width, height) pairs. Returns whether it warned."""
    if EMBEDDED_MODELS.get(model.source, ("", "chest"))[1] == "chest":  # only the toy-world models
        return False
    limit = 2 * model.resolution
    for w, h in sizes:
        if w != h or w > limit:
            import warnings

            warnings.warn(TOY_WORLD_WARNING.format(model=model.source, size=(w, h), limit=limit), UserWarning, stacklevel=3)
            return True
    return False


def from_components(components: dict, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                    source: str = "in-memory") -> DiffusionModel:
    """Wrap components built in memory (e.g. `modeling.build_components`) without saving them."""
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    parts = {k: components[k] for k in COMPONENTS}
    for k in ("vae", "unet", "text_encoder"):
        parts[k] = parts[k].to(device).eval().requires_grad_(False)
        if parts[k].dtype != torch_dtype:
            parts[k] = parts[k].to(torch_dtype)
    return DiffusionModel(**parts, source=source, device=device, dtype=torch_dtype)


def save_model(model_parts: dict, out: Path) -> None:
    """A standard diffusers folder that `StableDiffusionPipeline.from_pretrained(out)` loads offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{k: model_parts[k] for k in COMPONENTS}, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
