"""Stage 1 on SDXL, SD 3 / 3.5 and FLUX.1: family detection, conditioning as the pipelines form it,
noise grids, the joint-attention capture (probabilities, chunking, processors restored) and the
CLI end to end, on tiny random-weight models built from configs (the T5 tokenizer is the small
one built in code by `modeling.presets.t5_tokenizer`, not T5's real vocabulary)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conceptseg.cli import main
from conceptseg.families import SUPPORTED
from conceptseg.families.flux import FluxModel
from conceptseg.families.sd3 import SD3Model
from conceptseg.families.sdxl import SDXLModel
from conceptseg.joint_attention import FluxCaptureProcessor, SD3CaptureProcessor, concept_columns
from conceptseg.models import ModelLoadError, load_model
from conceptseg.prelim import PrelimConfig, PrelimRunner, attention_maps, image_noise

FAMILIES = ("sdxl", "sd3", "sd3.5", "flux")
PROMPT = "a photo of a bird"
# side of the grid the maps live on: SDXL tiny's first cross-attention level is 8x8 (latent 16);
# SD3 tiny patches its 32x32 latents by 2; FLUX packs 2x2
GRID = {"sdxl": 8, "sd3": 16, "sd3.5": 16, "flux": 16}


def _denoiser(model):
    return model.unet if model.family == "sdxl" else model.transformer


def _text_len(model) -> int:
    cond = model.text_conditioning(PROMPT)
    return cond.prompt_embeds.shape[1]


# ------------------------------------------------------------------ detection and loading


@pytest.mark.parametrize("family,cls", [("sdxl", SDXLModel), ("sd3", SD3Model), ("sd3.5", SD3Model), ("flux", FluxModel)])
def test_load_model_detects_the_family(tiny_family_models, tiny_family_dirs, family, cls) -> None:
    model = tiny_family_models[family]
    assert type(model) is cls and model.family == cls.family
    assert str(tiny_family_dirs[family].resolve()) in model.describe() and cls.label in model.describe()
    assert all(not p.requires_grad for p in _denoiser(model).parameters())
    assert not _denoiser(model).training


def test_unsupported_family_is_one_clear_error(tiny_family_dirs, tmp_path) -> None:
    folder = tmp_path / "kandinsky"
    shutil.copytree(tiny_family_dirs["sd3"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ModelLoadError, match="KandinskyV22Pipeline") as err:
        load_model(folder, device="cpu")
    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert name in str(err.value) and name in SUPPORTED


def test_incomplete_family_folder_names_what_is_missing(tiny_family_dirs, tmp_path) -> None:
    folder = tmp_path / "flux"
    shutil.copytree(tiny_family_dirs["flux"], folder)
    shutil.rmtree(folder / "text_encoder_2")
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="FLUX.1 folder") as err:
        load_model(folder, device="cpu")
    assert "text_encoder_2/ (folder missing)" in str(err.value) and "transformer/ weights" in str(err.value)


# ------------------------------------------------------------------ conditioning as the pipelines form it


def _pipeline(model):
    import diffusers

    parts = {k: getattr(model, k) for k in model.components}
    if model.family == "sd3":
        parts.update(text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)
    name = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[model.family]
    return getattr(diffusers, name)(**parts)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_conditioning_matches_the_pipeline(tiny_family_models, family) -> None:
    model = tiny_family_models[family]
    pipe = _pipeline(model)
    cond = model.text_conditioning(PROMPT)
    with torch.no_grad():
        if family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
            assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]  # (original, crop, target) of the canvas
        elif family.startswith("sd3"):
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, device="cpu", do_classifier_free_guidance=False)
            assert embeds.shape[1] == 77 + 256
        else:
            embeds, pooled, _ = pipe.encode_prompt(PROMPT, None, device="cpu")
            assert embeds.shape[1] == 512
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)


def test_flux_packing_and_ids_match_the_pipeline(tiny_family_models, noised) -> None:
    from diffusers import FluxPipeline

    model = tiny_family_models["flux"]
    z, sigma = noised(model)
    cond = model.text_conditioning(PROMPT)
    b, c, h, w = z.shape
    packed = FluxPipeline._pack_latents(z, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    with torch.no_grad():
        ours = model.denoise(z, sigma, cond)
        theirs = model.transformer(hidden_states=packed, timestep=sigma, guidance=torch.full((b,), 3.5),
                                   pooled_projections=cond.pooled.expand(b, -1),
                                   encoder_hidden_states=cond.prompt_embeds.expand(b, -1, -1),
                                   txt_ids=torch.zeros(512, 3), img_ids=ids, return_dict=False)[0]
    f = model.vae_scale_factor  # ours comes back unpacked to the latent grid, as the pipeline unpacks it
    assert torch.equal(ours, FluxPipeline._unpack_latents(theirs, h * f, w * f, f))


@pytest.mark.parametrize("family,expected", [("sdxl", [[5]]), ("sd3", [[5, 77 + 4]]), ("flux", [[4]])])
def test_concept_token_positions(tiny_family_models, family, expected) -> None:
    # CLIP puts a start token first ("bird" at 5); the T5 part has none ("bird" at 4), after SD3's 77 CLIP tokens
    model = tiny_family_models[family]
    assert model.concept_token_positions(PROMPT, ["bird"]) == expected
    with pytest.raises(ValueError, match="does not occur"):
        model.concept_token_positions(PROMPT, ["cat"])


def test_sd3_without_t5_uses_the_clip_part_and_zeros(tiny_family_models) -> None:
    full = tiny_family_models["sd3"]
    no_t5 = SD3Model(**{**full.__dict__, "text_encoder_3": None, "tokenizer_3": None})
    assert no_t5.concept_token_positions(PROMPT, ["bird"]) == [[5]]
    cond, ref = no_t5.text_conditioning(PROMPT), full.text_conditioning(PROMPT)
    assert cond.prompt_embeds.shape == ref.prompt_embeds.shape
    assert cond.prompt_embeds[:, 77:].abs().max() == 0
    torch.testing.assert_close(cond.prompt_embeds[:, :77], ref.prompt_embeds[:, :77])


# ------------------------------------------------------------------ noise levels


def test_sdxl_uses_the_ddim_grid(tiny_family_models) -> None:
    assert tiny_family_models["sdxl"].noise_levels(40) == list(range(1, 782, 20))


def test_flow_sigma_grids(tiny_family_models) -> None:
    # SD3: the scheduler's static shift 3 over 50 steps from sigma 1 to its (already shifted) sigma_min
    shift = lambda s: 3 * s / (1 + 2 * s)
    base = np.linspace(1.0, shift(1 / 1000), 50)
    sd3 = np.sort(shift(base))[:40]
    np.testing.assert_allclose(tiny_family_models["sd3"].noise_levels(40), sd3, rtol=1e-5)
    # FLUX: sigmas linspace(1, 1/50) shifted by exp(mu) with mu from the 256 image tokens (= base_shift 0.5)
    s = np.linspace(1.0, 1 / 50, 50)
    flux = np.sort(np.exp(0.5) / (np.exp(0.5) + (1 / s - 1)))[:40]
    np.testing.assert_allclose(tiny_family_models["flux"].noise_levels(40), flux, rtol=1e-5)
    assert tiny_family_models["flux"].noise_levels(3, "uniform") == [0.02, 0.04, 0.06]
    with pytest.raises(ValueError, match="T0"):
        tiny_family_models["sd3"].noise_levels(51)


def test_flow_noising(tiny_family_models) -> None:
    model = tiny_family_models["sd3"]
    x0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    z = model.add_noise(x0, eps, torch.tensor([0.0, 0.25]))
    torch.testing.assert_close(z[0], x0[0])
    torch.testing.assert_close(z[1], 0.75 * x0[1] + 0.25 * eps[1])


# ------------------------------------------------------------------ the capture


def test_concept_columns_match_the_explicit_softmax_and_do_not_depend_on_chunking() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, n, t, d = 2, 3, 10, 7, 8
    q, kt, ki = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, t, d, generator=g), torch.randn(b, h, n, d, generator=g)
    groups = [[1], [2, 5]]
    text = ((q @ kt.transpose(-1, -2)) / d**0.5).softmax(-1)
    joint = ((q @ torch.cat([ki, kt], 2).transpose(-1, -2)) / d**0.5).softmax(-1)[..., n:]
    for norm, probs in (("text", text), ("joint", joint)):
        expected = torch.stack([probs[..., g_].mean(-1) for g_ in groups], -1).mean(1)
        for block in (2**20, 50, 1):  # one block; chunks of heads and queries; one query of one head at a time
            torch.testing.assert_close(concept_columns(q, kt, ki, groups, norm, block=block), expected)
    assert joint.sum(-1).max() < 1  # the joint softmax gives part of each row to image keys


@pytest.mark.parametrize("family", FAMILIES)
def test_text_probabilities_sum_to_one_and_maps_have_the_family_grid(tiny_family_models, family, noised) -> None:
    model = tiny_family_models[family]
    z, levels = noised(model)
    cond = model.text_conditioning(PROMPT)
    every_token = [[i] for i in range(_text_len(model))]
    with torch.no_grad(), model.capture_attention(every_token) as store:
        model.denoise(z, levels, cond)
        layers = store.num_layers
        maps = store.pop_mean()
    grid = GRID[family]
    assert maps.shape == (2, len(every_token), grid, grid) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(1), torch.ones(2, grid, grid), atol=1e-5, rtol=0)
    assert maps.std(dim=(2, 3)).max() > 1e-5  # the maps vary over the image
    # SDXL tiny: 2 + 4 + 2 attn2 (down, up, mid transformer layers); SD3: 2 joint blocks; FLUX: 1 double + 1 single
    expected_layers = {"sdxl": 8, "sd3": 2, "sd3.5": 2, "flux": 2}[family]
    if family == "sdxl":
        assert sum(n.endswith("attn2.processor") for n in model.unet.attn_processors) == 8
    assert layers == expected_layers


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_joint_normalisation_gives_less_than_one_over_text(tiny_family_models, family, noised) -> None:
    model = tiny_family_models[family]
    z, levels = noised(model)
    every_token = [[i] for i in range(_text_len(model))]
    with torch.no_grad(), model.capture_attention(every_token, normalisation="joint") as store:
        model.denoise(z, levels, model.text_conditioning(PROMPT))
        total = store.pop_mean().sum(1)
    assert 0 < total.min() and total.max() < 1 - 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_does_not_change_the_output(tiny_family_models, family, noised) -> None:
    model = tiny_family_models[family]
    z, levels = noised(model)
    cond = model.text_conditioning(PROMPT)
    with torch.no_grad():
        plain = model.denoise(z, levels, cond)
        with model.capture_attention([[5]]):
            captured = model.denoise(z, levels, cond)
        other = model.denoise(z, levels, model.text_conditioning("a photo of a cat"))
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    assert (other - plain).abs().max() > 1e-4  # the text matters, so the comparison can fail


def _processors(model) -> dict:
    return dict(_denoiser(model).attn_processors)


def _assert_restored(model, before: dict) -> None:
    now = _processors(model)
    assert list(now) == list(before)
    assert all(now[k] is before[k] for k in before)


@pytest.mark.parametrize("family", ("sd3.5", "flux"))
def test_which_processors_are_swapped(tiny_family_models, family) -> None:
    model = tiny_family_models[family]
    before = _processors(model)
    with model.capture_attention([[5]]):
        during = _processors(model)
    swapped = {k for k in before if during[k] is not before[k]}
    if family == "sd3.5":
        assert swapped == {"transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"}
        assert "transformer_blocks.0.attn2.processor" in before  # the image-only attention stays as it was
        assert all(isinstance(during[k], SD3CaptureProcessor) for k in swapped)
    else:
        assert swapped == {"transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"}
        assert all(isinstance(during[k], FluxCaptureProcessor) for k in swapped)
    _assert_restored(model, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_processors_restored_after_an_exception(tiny_family_models, family, noised) -> None:
    model = tiny_family_models[family]
    before = _processors(model)
    z, levels = noised(model)
    cond = model.text_conditioning(PROMPT)
    cond.prompt_embeds = cond.prompt_embeds[..., :7]  # wrong text width: fails inside the forward pass
    with pytest.raises(RuntimeError), torch.no_grad(), model.capture_attention([[5]]):
        model.denoise(z, levels, cond)
    _assert_restored(model, before)
    with pytest.raises(KeyError), model.capture_attention([[5]]):
        raise KeyError("boom")
    _assert_restored(model, before)


def test_sd3_group_is_the_mean_of_its_clip_and_t5_columns(tiny_family_models, noised) -> None:
    model = tiny_family_models["sd3"]
    z, levels = noised(model)
    with torch.no_grad(), model.capture_attention([[5], [81], [5, 81]]) as store:
        model.denoise(z, levels, model.text_conditioning(PROMPT))
        maps = store.pop_mean()
    torch.testing.assert_close(maps[:, 2], (maps[:, 0] + maps[:, 1]) / 2)
    assert (maps[:, 0] - maps[:, 1]).abs().max() > 1e-6


# ------------------------------------------------------------------ stage 1


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_attention_maps_independent_of_batch_size(tiny_family_models, family) -> None:
    model = tiny_family_models[family]
    runner = PrelimRunner(model, PrelimConfig("bird", steps=3))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    latents = model.encode_images(pixels)
    noise = torch.stack([image_noise(0, f"k{i}", (3, *latents.shape[1:])) for i in range(2)])
    args = (model, latents, runner.cond, runner.token_groups, runner.timesteps, noise)
    one = attention_maps(*args, batch_size=1)
    assert one.shape == (2, 1, 16, 16)
    torch.testing.assert_close(attention_maps(*args, batch_size=6), one, atol=1e-6, rtol=1e-5)
    assert (one[0] - one[1]).abs().max() > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_prelim_end_to_end(tiny_family_dirs, make_image, tmp_path, capsys, family) -> None:
    images = tmp_path / "images"
    make_image(images / "wide.png", 48, 30, seed=1)
    make_image(images / "square.jpg", 40, 40, seed=2)
    out = tmp_path / "out"
    main(["prelim", "--model", str(tiny_family_dirs[family]), "--concept", "bird", "--images", str(images),
          "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert {"sdxl": "SDXL", "sd3": "SD 3.x", "sd3.5": "SD 3.x", "flux": "FLUX.1"}[family] in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["done"] == 2
    from PIL import Image

    for stem, size in (("wide", (48, 30)), ("square", (40, 40))):
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == size[::-1]
        attention = np.load(out / "attention" / f"{stem}.npy")
        assert attention.shape == (GRID[family], GRID[family]) and np.isfinite(attention).all()
        assert 0 < (mask > 0).mean() < 1


def test_flow_options_are_output_settings_and_checked() -> None:
    from conceptseg.settings import output_settings

    settings = output_settings(PrelimConfig("bird", sigma_grid="uniform", joint_attention="joint", batch_size=7))
    assert settings["sigma_grid"] == "uniform" and settings["joint_attention"] == "joint" and "batch_size" not in settings
    with pytest.raises(ValueError, match="sigma grid"):
        PrelimConfig("bird", sigma_grid="karras")
    with pytest.raises(ValueError, match="joint attention"):
        PrelimConfig("bird", joint_attention="both")


def test_the_options_change_flow_maps(tiny_family_models) -> None:
    model = tiny_family_models["sd3"]
    pixels = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    maps = {}
    for grid, norm in (("sampler", "text"), ("uniform", "text"), ("sampler", "joint")):
        runner = PrelimRunner(model, PrelimConfig("bird", steps=3, sigma_grid=grid, joint_attention=norm))
        latents = model.encode_images(pixels)
        noise = image_noise(0, "k", (3, *latents.shape[1:]))[None]
        maps[grid, norm] = attention_maps(model, latents, runner.cond, runner.token_groups, runner.timesteps, noise, 3,
                                          normalisation=norm)
    assert (maps["sampler", "text"] - maps["uniform", "text"]).abs().max() > 1e-6
    assert (maps["sampler", "joint"] < maps["sampler", "text"]).all()  # a joint column is a smaller share
