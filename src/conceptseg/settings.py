"""Which settings change a stage's outputs: the one definition that manifests and `conceptseg run`'s
stage fingerprints both read.

A config field declared with `execution_setting(...)` changes how a stage runs (batch size of a
per-image stage, checkpoint cadence, gradient checkpointing, progress bars), not what it writes;
every other field counts. Paths in the settings are written relative to the folder that holds the
stage's output folder (the run folder under `conceptseg run`), so a moved or copied run keeps them.

Values a stage resolves when it runs are recorded resolved (`resolved_settings`): the model as its
content identity (`model_identity`: a moved or copied model folder keeps it), the dtype as the one
`auto` became on that device. Manifests and `conceptseg run`'s fingerprints both record them so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

EXECUTION = "execution"
ADDED = "added"


def execution_setting(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field that does not change outputs (left out of manifests and fingerprints)."""
    return dataclasses.field(default=default, metadata={EXECUTION: True}, **kwargs)


def added_setting(default: Any) -> Any:
    """A dataclass field added after runs were made, whose default is the old behaviour: left out of
    manifests and fingerprints while at its default, so finished runs are not redone for it."""
    return dataclasses.field(default=default, metadata={ADDED: True})


def output_settings(config: Any, base: str | Path | None = None) -> Any:
    """`config` (a dataclass, nested ones too) as plain data, less its execution settings (and its
    added settings while at their defaults); absolute paths inside `base` made relative to it."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: output_settings(getattr(config, f.name), base)
                for f in dataclasses.fields(config) if not f.metadata.get(EXECUTION)
                and not (f.metadata.get(ADDED) and getattr(config, f.name) == f.default)}
    if isinstance(config, dict):
        return {k: output_settings(v, base) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [output_settings(v, base) for v in config]
    if isinstance(config, Path) or (isinstance(config, str) and os.path.isabs(config)):
        return portable_path(config, base)
    return config


def portable_path(path: str | Path, base: str | Path | None) -> str:
    """`path` relative to `base` when it lies inside it, else absolute."""
    path = Path(path).expanduser()
    if base is None:
        return str(path)
    resolved, base = path.resolve(), Path(base).resolve()
    return str(resolved.relative_to(base)) if resolved.is_relative_to(base) else str(resolved)


def resolved_settings(config: Any, base: str | Path, **resolved: Any) -> dict:
    """The one record of what decides a stage's outputs: `config`'s output settings, updated by
    `resolved` (the model, the dtype, upstream folders, ...; a `model` becomes its `model_identity`, a
    torch dtype its name), paths relative to `base`. Manifests and run fingerprints are this."""
    if resolved.get("model") is not None:
        resolved["model"] = model_identity(resolved["model"])
    if resolved.get("dtype") is not None:
        resolved["dtype"] = str(resolved["dtype"]).replace("torch.", "")
    return output_settings({**(output_settings(config, base) if config is not None else {}), **resolved}, base)


def stage_settings(config: Any, out: str | Path, **extra: Any) -> dict:
    """What a per-image stage's manifest records as its settings: `resolved_settings` with paths
    relative to the folder holding `out`."""
    return resolved_settings(config, Path(out).parent, **extra)


# weight files are identified by name and size (hashing gigabytes would cost minutes), every other
# file by its content: configs, tokenizers, scheduler settings, a LoRA note
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5", ".npz"})
SMALL_FILE_BYTES = 16 * 2**20


def model_identity(model: str | Path | None) -> str:
    """What a stage records of its model: the embedded model's name, a hub id as given, or for a
    local folder `content:<digest>` of its files (small files by content, weight files by name and
    size; hidden files skipped), so the same model moved or copied elsewhere is the same model."""
    from conceptseg.models import EMBEDDED_CHEST_MODEL, EMBEDDED_MODEL

    if model is None or str(model) in (EMBEDDED_MODEL, EMBEDDED_CHEST_MODEL):
        return str(model or EMBEDDED_MODEL)
    path = Path(model).expanduser()
    return f"content:{_folder_digest(path)}" if path.is_dir() else str(model)


def _folder_digest(folder: Path) -> str:
    from conceptseg.models import LORA_CONFIG_FILE

    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        size = p.stat().st_size
        if p.suffix.lower() in WEIGHT_SUFFIXES or size > SMALL_FILE_BYTES:
            content = f"{size} bytes"
        elif p.suffix == ".json":
            content = _config_content(p, base_note=rel == Path(LORA_CONFIG_FILE))
        else:
            content = hashlib.sha256(p.read_bytes()).hexdigest()
        digest.update(f"{rel.as_posix()}\0{content}\n".encode())
    return digest.hexdigest()[:16]


def _config_content(path: Path, base_note: bool) -> str:
    """A JSON file's content less the paths in it: the `_name_or_path` a re-saved config keeps of
    where it was loaded from, and a LoRA note's base model (recorded by the base's identity)."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if isinstance(data, dict):
        data.pop("_name_or_path", None)
        if base_note:
            data["base_model"] = model_identity(data.get("base_model"))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
