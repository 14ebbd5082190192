"""Model families: which pipeline a diffusers folder holds (`model_index.json`'s `_class_name`) and
the model class that gives the stages what they need for that family (`families.base.DiffusionModel`).

One registry: SD 1.x/2.x (`sd.SDModel`), SDXL, SD 3.x, FLUX.1, FLUX.2 and Qwen-Image, each a
`families.base.FamilyModel` loaded, wrapped and saved the same way. Every family runs every stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# pipeline class -> family; the order is the order errors list them in
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "Flux2Pipeline": "flux2",
    "QwenImagePipeline": "qwenimage",
}
FAMILY_LABELS = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "sd3": "SD 3 / 3.5", "flux": "FLUX.1", "flux2": "FLUX.2",
                 "qwenimage": "Qwen-Image"}
SUPPORTED = ", ".join(f"{FAMILY_LABELS[f]} ({p})" for p, f in PIPELINE_FAMILIES.items())


class UnsupportedFamily(ValueError):
    """A model_index.json naming a pipeline conceptseg does not run."""


def family_of(model_index: dict, where: str) -> str:
    """The family of a parsed model_index.json; one clear error for anything else."""
    name = model_index.get("_class_name")
    if name not in PIPELINE_FAMILIES:
        raise UnsupportedFamily(f"{where}: model_index.json names the pipeline {name!r}, which conceptseg does not "
                                f"support; supported: {SUPPORTED}")
    return PIPELINE_FAMILIES[name]


def read_model_index(source: str | Path, local: bool) -> dict | None:
    """model_index.json of a local folder or a hub id (cache first, then one online try); None if absent."""
    if local:
        path = Path(source) / "model_index.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UnsupportedFamily(f"{path}: not valid JSON ({e})") from None
    from huggingface_hub import hf_hub_download

    for offline in (True, False):
        try:
            return json.loads(Path(hf_hub_download(str(source), "model_index.json", local_files_only=offline)).read_text())
        except Exception:  # noqa: BLE001  (not cached / offline / no such repo: the component loader reports it)
            continue
    return None


def pipeline_name(family: str) -> str:
    """The diffusers pipeline class of a family ("sd" -> StableDiffusionPipeline, ...)."""
    return next(p for p, f in PIPELINE_FAMILIES.items() if f == family)


def family_class(family: str):
    """The model class of a family name ("sd", "sdxl", ...; "sd3.5" counts as "sd3")."""
    from conceptseg.families.flux import FluxModel
    from conceptseg.families.flux2 import Flux2Model
    from conceptseg.families.qwenimage import QwenImageModel
    from conceptseg.families.sd import SDModel
    from conceptseg.families.sd3 import SD3Model
    from conceptseg.families.sdxl import SDXLModel

    classes = {"sd": SDModel, "sdxl": SDXLModel, "sd3": SD3Model, "flux": FluxModel, "flux2": Flux2Model,
               "qwenimage": QwenImageModel}
    return classes["sd3" if family == "sd3.5" else family]


def required_components(family: str, model_index: dict | None) -> list[str]:
    """The components a folder of this family must hold (optional ones only where its index names them)."""
    cls = family_class(family)
    optional = [k for k in ("text_encoder_3", "tokenizer_3") if k in cls.__dataclass_fields__]
    return list(cls.components) + [k for k in optional if ((model_index or {}).get(k) or [None])[0] is not None]


def family_from_components(family: str, components: dict, device, dtype, source: str = "in-memory"):
    """Wrap a family's components built in memory (`modeling.presets.build_family_components`)
    without saving them; "sd3.5" counts as "sd3"."""
    cls = family_class(family)
    parts = {k: components.get(k) for k in cls.__dataclass_fields__ if k not in ("source", "device", "dtype")}
    for m in parts.values():
        if isinstance(m, torch.nn.Module):
            m.to(device).eval().requires_grad_(False)
            if m.dtype != dtype:  # (a cast diffusers warns about even when there is nothing to cast)
                m.to(dtype)
    return cls(source=source, device=torch.device(device), dtype=dtype, **parts)


def load_family_model(family: str, source, device: torch.device, dtype: torch.dtype, local_files_only: bool,
                      source_label: str):
    """Load a family's model from a diffusers folder or hub id (its class's `from_pretrained`)."""
    return family_class(family).from_pretrained(source, device, dtype, local_files_only, source_label)


def save_components(family: str, components: dict, out: Path) -> None:
    """A standard diffusers folder of the family's pipeline, which its `from_pretrained` loads offline."""
    import diffusers

    cls = family_class(family)
    pipeline = getattr(diffusers, pipeline_name(cls.family))(**components, **cls.pipeline_options)
    pipeline.save_pretrained(out, safe_serialization=True)
