"""What the samplers are built with: SDXL's unconditional row as its pipeline forms it, and DDIM /
DPM++ schedulers built from a config that does not state `clip_sample` (SD 1.x's PNDM folders)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from conceptseg.schedules import DDPMObjective

PROMPT = "a photo of a bird"
# SD 1.5's scheduler_config.json as the hub first shipped it: PNDM, no clip_sample key
SD15_PNDM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from conceptseg.modeling.presets import build_family_components, save_family_model

    folder = tmp_path_factory.mktemp("sdxl") / "sdxl"
    save_family_model("sdxl", build_family_components("sdxl", "tiny", seed=0), folder)
    return folder


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    from conceptseg.models import load_model

    return load_model(sdxl_dir, device="cpu", dtype="fp32")


def _sdxl_pipeline(model, **config):
    parts = {k: getattr(model, k) for k in ("vae", "unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}
    return diffusers.StableDiffusionXLPipeline(**parts, **config)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_empty_prompt_conditioning_is_the_pipelines_negative_row(sdxl, force_zeros):
    """`StableDiffusionXLPipeline.encode_prompt` gives zeros for the unconditional row when
    `force_zeros_for_empty_prompt` (the default); the refiner's False encodes the empty prompt."""
    import dataclasses

    model = dataclasses.replace(sdxl, force_zeros_for_empty_prompt=force_zeros)
    pipe = _sdxl_pipeline(model, force_zeros_for_empty_prompt=force_zeros)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    cond = model.conditioning([PROMPT, ""])
    torch.testing.assert_close(cond.prompt_embeds[:1], embeds)
    torch.testing.assert_close(cond.pooled[:1], pooled)
    torch.testing.assert_close(cond.prompt_embeds[1:], negative)
    torch.testing.assert_close(cond.pooled[1:], negative_pooled)
    assert bool(negative.eq(0).all()) is force_zeros


def test_sdxl_loaded_from_a_folder_keeps_the_pipelines_setting(sdxl, sdxl_dir):
    import json

    assert json.loads((sdxl_dir / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    cond = sdxl.conditioning(["", PROMPT])
    assert cond.prompt_embeds[0].eq(0).all() and cond.pooled[0].eq(0).all() and not cond.pooled[1].eq(0).all()
    assert sdxl.force_zeros_for_empty_prompt is True


def test_ddim_and_dpm_from_a_pndm_config_do_not_clip_latents():
    from conceptseg.schedules import scheduler_from_config

    pndm = PNDMScheduler(**SD15_PNDM)
    assert "clip_sample" not in pndm.config
    for cls in (DDIMScheduler, DDPMScheduler):
        assert scheduler_from_config(cls, pndm.config).config.clip_sample is False
        # a DDIM config that took clip_sample from the class default does not state it either
        assert scheduler_from_config(cls, cls.from_config(pndm.config).config).config.clip_sample is False
        assert scheduler_from_config(cls, cls(clip_sample=True).config).config.clip_sample is True  # stated: kept
    assert isinstance(scheduler_from_config(DPMSolverMultistepScheduler, pndm.config), DPMSolverMultistepScheduler)
    sampler = DDPMObjective(pndm).sampler("ddim", steps=4, eta=0.0, device="cpu")
    assert sampler.scheduler.config.clip_sample is False


def test_an_sd15_folder_loads_a_sampler_that_does_not_clip(tiny_model_dir, tmp_path):
    import json
    import shutil

    from conceptseg.models import load_model

    folder = tmp_path / "sd15"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler", **SD15_PNDM}))
    model = load_model(folder, device="cpu", dtype="fp32")
    assert model.scheduler.config.clip_sample is False
    assert model.objective.sampler("ddim", steps=4, eta=0.0, device="cpu").scheduler.config.clip_sample is False
