"""One model abstraction: every family in the registry (SD 1.x/2.x among them) gives the interface the
stages are typed against (`families.base.DiffusionModel`), checked on its tiny preset built on the
meta device (configs only, no weights)."""

from __future__ import annotations

import inspect

import pytest
import torch

from conceptseg.families import PIPELINE_FAMILIES, family_class, family_from_components
from conceptseg.families.base import DiffusionModel
from conceptseg.modeling import build_components
from conceptseg.modeling.presets import PRESETS, build_family_components

FAMILIES = sorted(set(PIPELINE_FAMILIES.values()))


def _members() -> tuple[list[str], dict[str, object]]:
    """(the protocol's data members and properties, its methods by name)."""
    data = list(DiffusionModel.__annotations__)
    methods = {}
    for name, value in vars(DiffusionModel).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            data.append(name)
        elif callable(value):
            methods[name] = value
    return data, methods


def _accepts(implementation, protocol_method) -> bool:
    """Whether `implementation` takes every call the protocol's signature allows: its positional
    parameters by position, and those with defaults by name too."""
    proto = list(inspect.signature(protocol_method).parameters.values())[1:]  # without self
    impl = inspect.signature(implementation)
    positional = [object() for p in proto if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]
    named = {p.name: object() for p in proto if p.default is not inspect.Parameter.empty}
    try:
        impl.bind(*positional, **named)
    except TypeError:
        return False
    return True


def test_the_protocol_names_what_the_stages_call():
    data, methods = _members()
    assert {"family", "source", "device", "dtype", "resolution", "attention_resolution", "denoiser", "objective"} <= set(data)
    assert {"encode_images", "decode_latents", "text_conditioning", "conditioning", "concept_token_positions", "noise_levels",
            "add_noise", "denoise", "capture_attention", "save_pretrained", "offload_text_encoders", "release"} <= set(methods)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_registered_family_gives_the_stage_interface(family):
    cls = family_class(family)
    assert cls.family == family and (family, "tiny") in PRESETS
    model = family_from_components(family, build_family_components(family, "tiny", device="meta"), "meta", torch.float32)
    data, methods = _members()
    missing = [name for name in data + list(methods) if not hasattr(model, name)]  # properties are evaluated
    assert not missing, f"{cls.__name__} lacks {missing}"
    wrong = [name for name, method in methods.items() if not _accepts(getattr(model, name), method)]
    assert not wrong, f"{cls.__name__}: these methods do not take the protocol's arguments: {wrong}"
    assert model.denoiser is getattr(model, model.denoiser_name)
    assert model.resolution == model.latent_resolution * model.vae_scale_factor


def test_sd_presets_are_in_the_registry_and_build_the_same_weights():
    via_registry, direct = build_family_components("sd", "tiny", seed=3), build_components("tiny", seed=3)
    assert list(via_registry) == list(direct)
    for name in ("vae", "unet", "text_encoder"):
        a, b = via_registry[name].state_dict(), direct[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert via_registry["scheduler"].config == direct["scheduler"].config


def test_the_check_catches_a_method_that_does_not_fit():
    class Narrow:
        def denoise(self, noisy, levels, cond):  # no `module`
            pass

    assert not _accepts(Narrow().denoise, vars(DiffusionModel)["denoise"])
    assert _accepts(family_class("sd").denoise.__get__(object()), vars(DiffusionModel)["denoise"])
