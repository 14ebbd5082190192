"""Stages 2-4 on SDXL, SD 3.x and FLUX.1 (and SD 2.x's v-prediction): each family's training
objective, the RePaint loop on each family's sampler, fine-tuning (full and LoRA) with resume, and a
tiny `run` end to end per family, on the tiny random-weight models of `modeling.presets`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conceptseg.finetune import FinetuneConfig, denoising_loss, finetune
from conceptseg.inpaint import inpaint_background, sample_latents
from conceptseg.modeling import build_components
from conceptseg.models import load_model
from conceptseg.schedules import DDPMObjective
from family_checks import assert_known_region_renoised

FAMILIES = ("sdxl", "sd3", "flux")


class Oracle:
    """A model whose `denoise` answers `module`: the loss of a given prediction."""

    def denoise(self, noisy, levels, cond, module=None):
        return module


def _latents(model, n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.latent_channels, model.latent_resolution, model.latent_resolution, generator=g)


# ------------------------------------------------------------------ the training objective


def test_ddpm_objective_noises_as_ddpm_and_targets_the_prediction_type():
    scheduler = build_components("tiny-v")["scheduler"]  # SD 2.x 768's v-prediction
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = DDPMObjective(scheduler).training_batch(latents, torch.Generator().manual_seed(1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))  # drawn first
    abar = scheduler.alphas_cumprod[batch.levels].view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise)
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(batch.target, velocity)
    mask = torch.ones(8, 1, 8, 8)
    assert denoising_loss(Oracle(), velocity, batch, None, mask).abs().max() < 1e-10
    assert denoising_loss(Oracle(), noise, batch, None, mask).mean() > 0.1  # epsilon is wrong here


def test_sdxl_trains_on_ddpm_noising_although_its_sampler_is_euler(tiny_family_models):
    model = tiny_family_models["sdxl"]
    assert type(model.scheduler).__name__ == "EulerDiscreteScheduler"  # whose add_noise is x0 + sigma * eps
    latents = _latents(model)
    batch = model.objective.training_batch(latents, torch.Generator().manual_seed(3))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    abar = model.scheduler.alphas_cumprod[batch.levels].view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(batch.target, noise)  # epsilon


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_flow_objective_targets_the_velocity(tiny_family_models, family):
    model = tiny_family_models[family]
    latents = _latents(model, n=16)
    batch = model.objective.training_batch(latents, torch.Generator().manual_seed(5))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    sigma = batch.levels.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(batch.target, noise - latents)
    assert ((0 < batch.levels) & (batch.levels <= 1)).all() and batch.levels.unique().numel() > 4
    train_sigmas = model.objective.train_sigmas
    assert all(torch.isclose(train_sigmas, s).any() for s in batch.levels)  # the training schedule's own sigmas
    mask = torch.ones(16, 1, *latents.shape[-2:])
    assert denoising_loss(Oracle(), noise - latents, batch, None, mask).abs().max() < 1e-10
    assert denoising_loss(Oracle(), noise, batch, None, mask).mean() > 0.1  # epsilon where velocity is due


def test_the_flow_objectives_are_the_families_own(tiny_family_models):
    sd3, flux = tiny_family_models["sd3"].objective, tiny_family_models["flux"].objective
    assert (sd3.weighting, flux.weighting) == ("logit_normal", "none")  # as diffusers' DreamBooth scripts
    # SD 3 trains on its shifted schedule (shift 3: the middle index sits above 0.5); FLUX's shift is dynamic, not in training
    assert sd3.train_sigmas[500] > 0.7 and abs(float(flux.train_sigmas[500]) - 0.5) < 0.01


@pytest.mark.parametrize("family", FAMILIES)
def test_denoise_predicts_on_the_latent_grid(tiny_family_models, family):
    model = tiny_family_models[family]
    latents = _latents(model, n=2)
    cond = model.conditioning(["a photo of a bird", "a photo of a background"])
    with torch.no_grad():
        pred = model.denoise(latents, model.objective.training_batch(latents, torch.Generator()).levels, cond)
    assert pred.shape == latents.shape  # the loss mask lines up with it, FLUX's packing undone


# ------------------------------------------------------------------ inpainting


@pytest.mark.parametrize("family", FAMILIES)
def test_inpainting_keeps_the_known_region_renoised_at_every_step(tiny_family_models, family):
    assert_known_region_renoised(tiny_family_models[family], _latents(tiny_family_models[family], n=2), steps=4)


def test_flow_sampler_options_are_checked(tiny_family_models):
    model = tiny_family_models["sd3"]
    z0, region = _latents(model, n=1), torch.ones(1, 32, 32)
    with pytest.raises(ValueError, match="rectified-flow.*use 'ddim'"):
        inpaint_background(model, z0, region, steps=2, sampler="dpm++")
    with pytest.raises(ValueError, match="eta"):
        inpaint_background(model, z0, region, steps=2, eta=0.5)


def test_flux_sampler_uses_the_pipelines_shifted_sigmas(tiny_family_models):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    model = tiny_family_models["flux"]
    loop = model.objective.sampler("ddim", 6, 0.0, "cpu")
    reference = type(model.scheduler).from_config(model.scheduler.config)
    seq = (model.latent_resolution // 2) ** 2
    c = reference.config
    mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(reference, sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    torch.testing.assert_close(torch.stack(loop.levels), reference.sigmas[:-1])


@pytest.mark.parametrize("family", ("sdxl", "flux"))
def test_sampling_with_guidance_gives_images(tiny_family_models, family):
    model = tiny_family_models[family]
    z = sample_latents(model, "a photo of a bird", 2, steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
    images = model.decode_latents(z)
    assert images.shape == (2, model.resolution, model.resolution, 3) and images.dtype == np.uint8


# ------------------------------------------------------------------ fine-tuning


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family,method", [("sdxl", "full"), ("sd3", "full"), ("flux", "full"), ("flux", "lora")])
def test_one_finetune_step_changes_the_denoiser_and_saves_the_family(tiny_family_dirs, tiny_family_models, tmp_path,
                                                                     finetune_pairs, family, method):
    images, prelim = finetune_pairs(tmp_path)
    base = tiny_family_models[family]
    cfg = FinetuneConfig("bird", images, prelim, tmp_path / "ft", model=str(tiny_family_dirs[family]), steps=1, batch_size=2,
                         lr=1e-2, ema_decay=0.0, method=method, lora_rank=2, progress=False)
    tuned = load_model(finetune(cfg), device="cpu", dtype="fp32")
    assert type(tuned) is type(base) and tuned.family == base.family
    before, after = _state(base.denoiser), _state(tuned.denoiser)
    assert before.keys() == after.keys()  # LoRA is fused back into the base weights
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and (method == "full" or all(".attn" in k for k in changed))
    assert all(torch.equal(a, b) for a, b in zip(base.vae.state_dict().values(), tuned.vae.state_dict().values()))
    if method == "lora":
        assert json.loads((tmp_path / "ft" / "model" / "conceptseg_lora.json").read_text())["base_model"] == base.source


def test_family_finetune_resumes_to_the_same_weights(tiny_family_dirs, tmp_path, finetune_pairs):
    images, prelim = finetune_pairs(tmp_path)

    def run(out, steps):
        return finetune(FinetuneConfig("bird", images, prelim, out, model=str(tiny_family_dirs["flux"]), steps=steps,
                                       batch_size=2, lr=1e-3, checkpoint_every=1, progress=False))

    straight = load_model(run(tmp_path / "straight", 2), device="cpu", dtype="fp32")
    run(tmp_path / "resumed", 1)
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "model")  # as if stopped after the checkpoint of step 1
    resumed = load_model(run(tmp_path / "resumed", 2), device="cpu", dtype="fp32")
    for (k, a), b in zip(_state(straight.denoiser).items(), _state(resumed.denoiser).values()):
        torch.testing.assert_close(a, b, msg=k)


# ------------------------------------------------------------------ the whole run


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_run_end_to_end(tiny_family_dirs, tmp_path, family, tiny_run):
    tiny_run(tiny_family_dirs[family], tmp_path / "run")
    index = tmp_path / "run" / "finetune" / "model" / "model_index.json"
    assert json.loads(index.read_text())["_class_name"] == {
        "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]


def test_the_family_distillation_benchmark_runs_on_the_tiny_models(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from distill_families import main as bench

    report = bench(["--preset", "tiny", "--device", "cpu", "--families", "flux", "--json", str(tmp_path / "r.json")])
    assert [(r["family"], r["method"]) for r in report["finetune"]] == [("flux", "lora"), ("flux", "full")]
    lora, full = report["finetune"]
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] and lora["samples_per_s"] > 0
    assert report["inpaint"][0]["images_per_s"] > 0 and json.loads((tmp_path / "r.json").read_text())["table"]


def test_lora_trains_fp32_adapters_on_a_half_precision_base():
    from conceptseg.families import family_from_components
    from conceptseg.finetune import trainable_parameters
    from conceptseg.modeling.presets import build_family_components

    model = family_from_components("flux", build_family_components("flux"), "cpu", torch.bfloat16)
    cfg = FinetuneConfig("bird", [], ".", ".", method="lora", lora_rank=2, mixed_precision="bf16")
    params = trainable_parameters(model.denoiser, cfg)
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in model.denoiser.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    latents = _latents(model, n=2)
    batch = model.objective.training_batch(latents, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = denoising_loss(model, model.denoiser, batch, model.conditioning(["a", "b"]), torch.ones(2, 1, *latents.shape[-2:]))
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
