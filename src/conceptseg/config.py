"""Typed dataclass configs from YAML and `key.sub=value` overrides: the one reader that `conceptseg
run`, `conceptseg medical`, the demo's `--set` and the memory plan's knobs share.

A section's default is its stage config's own (`field_default`), so a setting's default is written
once. Overrides are parsed as YAML values; an unknown setting is an error naming where it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def field_default(config_class: type, name: str) -> Any:
    """A dataclass field with `config_class`'s own default for `name` (its default factory, for a
    list): the one place a setting's default is written (the YAML sections, the stage's Python API
    and its CLI all take it from there)."""
    f = config_class.__dataclass_fields__[name]
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory)
    return dataclasses.field(default=f.default)


def build_config(cls: type[C], data: dict, where: str) -> C:
    """`cls` from plain data (nested sections built as their dataclasses), refusing unknown settings."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        kwargs[name] = build_config(type(sub()), value, f"{where}.{name}") if sub and dataclasses.is_dataclass(sub()) else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`data` with each `key.sub=value` set (the value parsed as YAML); sections are made as needed."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value (e.g. finetune.steps=200)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return data


def override_config(cfg: C, overrides: list[str]) -> C:
    """`cfg` (a built config, e.g. a RunConfig) with `key.sub=value` overrides applied, checked as
    when it is read from YAML; `cfg` itself when there are none."""
    if not overrides:
        return cfg
    return build_config(type(cfg), apply_overrides(dataclasses.asdict(cfg), overrides), "config")
