"""Which settings change a stage's outputs: the one definition that manifests and `conceptseg run`'s
stage fingerprints both read.

A config field declared with `execution_setting(...)` changes how a stage runs (batch size of a
per-image stage, checkpoint cadence, gradient checkpointing, progress bars), not what it writes;
every other field counts. Paths in the settings are written relative to the folder that holds the
stage's output folder (the run folder under `conceptseg run`), so a moved or copied run keeps them.
"""

from __future__ import annotations

import dataclasses
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


def stage_settings(config: Any, out: str | Path, **extra: Any) -> dict:
    """What a per-image stage's manifest records as its settings: `config`'s output settings plus
    `extra` (the model, upstream folders, ...), paths relative to the folder holding `out`."""
    return output_settings({**(output_settings(config) if config is not None else {}), **extra}, Path(out).parent)
