"""Loading, wrapping and saving models, and their names: a local diffusers folder, a hub id, or an
embedded model. What a loaded model is and does is its family's (`conceptseg.families`)."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from conceptseg.families import (FAMILY_LABELS, UnsupportedFamily, family_from_components, family_of, load_family_model,
                                 read_model_index, required_components, save_components)
from conceptseg.families.base import DiffusionModel
from conceptseg.families.sd import SDModel

COMPONENTS = SDModel.components  # an SD 1.x/2.x folder's (`save_model`, `from_components`)
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


def _check_folder(path: Path, components, kind: str) -> None:
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
               dtype: str | torch.dtype | None = None) -> DiffusionModel:
    """Load a diffusers folder or hub id; the family comes from its model_index.json.

    Stable Diffusion 1.x/2.x (or a folder without model_index.json) gives a `families.sd.SDModel`;
    SDXL, SD 3.x, FLUX.1, FLUX.2 and Qwen-Image give their family's model (`conceptseg.families`);
    every stage runs on each. `model.family` and `model.describe()` say which was found. `None` or
    "embedded:toy" is the toy-world model that ships with the package.
    """
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
    if local:
        kind = "Stable Diffusion" if family == "sd" else FAMILY_LABELS[family]
        _check_folder(path, required_components(family, index), kind)
    return _load_with_fallback(lambda offline: load_family_model(family, source_id, device, torch_dtype, offline, source),
                               path, model, local)


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
                    source: str = "in-memory") -> SDModel:
    """Wrap SD 1.x/2.x components built in memory (e.g. `modeling.build_components`) without saving
    them (`families.family_from_components` wraps any family's)."""
    device = torch.device(device)
    return family_from_components("sd", {k: components[k] for k in COMPONENTS}, device, resolve_dtype(dtype, device), source)


def save_model(model_parts: dict, out: Path) -> None:
    """A standard diffusers folder of SD 1.x/2.x components, which `StableDiffusionPipeline.from_pretrained(out)`
    loads offline (`families.save_components` saves any family's)."""
    save_components("sd", {k: model_parts[k] for k in COMPONENTS}, out)
