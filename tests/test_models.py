"""Loading models: local diffusers folders, dtypes, helpful errors; the SD 1.x/2.x model's helpers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conceptseg.cli import main
from conceptseg.families.sd import SDModel
from conceptseg.modeling import PRESETS, build_components
from conceptseg.models import (
    COMPONENTS,
    ModelLoadError,
    from_components,
    load_model,
    resolve_dtype,
)


def _params(model: SDModel):
    return [p for m in (model.vae, model.unet, model.text_encoder) for p in m.parameters()]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir) -> SDModel:
    return load_model(tiny_model_dir, device="cpu")


def test_load_saved_folder(loaded, tiny_model, tiny_model_dir) -> None:
    assert isinstance(loaded, SDModel)
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.source == str(tiny_model_dir.resolve())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad for p in _params(loaded))
    assert not loaded.unet.training and not loaded.vae.training and not loaded.text_encoder.training
    # the weights are the ones saved (the same seed-0 tiny preset as the in-memory fixture)
    for name in ("vae", "unet", "text_encoder"):
        saved, ref = getattr(loaded, name).state_dict(), getattr(tiny_model, name).state_dict()
        assert saved.keys() == ref.keys()
        for k in ref:
            assert torch.equal(saved[k], ref[k]), f"{name}.{k}"
    assert loaded.scheduler.config.steps_offset == 1
    torch.testing.assert_close(loaded.alphas_cumprod, tiny_model.alphas_cumprod)


def test_saved_tokenizer_is_clip(loaded, tokenizer) -> None:
    assert loaded.tokenizer.model_max_length == 77
    for prompt in ("a photo of a cat", "a photo of a pneumothorax", "a photo of a human with arms and legs"):
        assert loaded.tokenizer(prompt).input_ids == tokenizer(prompt).input_ids
    assert loaded.encode_prompts(["a photo of a bird", "x"]).shape == (2, 77, PRESETS["tiny"].text_width)


def test_geometry_properties(tiny_model) -> None:
    assert tiny_model.vae_scale_factor == 2
    assert tiny_model.resolution == 32 and tiny_model.latent_resolution == 16


def test_encode_decode_images(tiny_model) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    lat = tiny_model.encode_images(pixels)
    assert lat.shape == (2, 4, 16, 16) and lat.dtype == torch.float32
    torch.testing.assert_close(tiny_model.encode_images(pixels), lat, atol=0, rtol=0)  # deterministic (the mean)
    torch.testing.assert_close(tiny_model.encode_images(pixels[1:]), lat[1:], atol=1e-5, rtol=0)  # per image
    torch.testing.assert_close(tiny_model.encode_images(torch.from_numpy(pixels)), lat, atol=0, rtol=0)
    images = tiny_model.decode_latents(lat)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_load_bf16(tiny_model_dir, tiny_model) -> None:
    m = load_model(tiny_model_dir, device="cpu", dtype="bf16")
    assert m.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in _params(m))
    ref = tiny_model.unet.state_dict()
    for k, v in m.unet.state_dict().items():
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k
    assert m.encode_prompts(["a photo of a bird"]).dtype == torch.bfloat16
    lat = m.encode_images(np.zeros((1, 32, 32, 3), np.uint8))
    assert lat.dtype == torch.bfloat16 and lat.shape == (1, 4, 16, 16)


def test_bf16_prelim_runs_and_agrees_with_fp32(tiny_model_dir, tiny_model, textured) -> None:
    from conceptseg.prelim import preliminary_masks

    m = load_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    im = [textured(32, 24, seed=3)]
    lo = preliminary_masks(m, im, "bird", steps=2)[0].attention
    hi = preliminary_masks(tiny_model, im, "bird", steps=2)[0].attention
    assert lo.dtype == np.float32 and np.isfinite(lo).all()
    # bf16 noise is small next to the map's own spatial variation (another token's map is ~15 std away)
    np.testing.assert_allclose(lo, hi, atol=0.25 * float(hi.std()), rtol=0)
    assert np.corrcoef(lo.ravel(), hi.ravel())[0, 1] > 0.99


def test_resolve_dtype() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("fp32", cuda) == torch.float32
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="fp64"):
        resolve_dtype("fp64", cpu)


def test_from_components_casts_and_freezes() -> None:
    m = from_components(build_components("tiny", seed=3), dtype="bf16", source="mem")
    assert m.dtype == torch.bfloat16 and m.source == "mem"
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in _params(m))
    assert not m.unet.training


def test_missing_unet_folder(tiny_model_dir, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match="unet") as info:
        load_model(broken, device="cpu")
    msg = str(info.value)
    assert str(broken) in msg
    for other in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert f"{other}/" not in msg  # only what is missing is named


def test_missing_weights_and_configs(tiny_model_dir, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for f in (broken / "vae").glob("*.safetensors"):
        f.unlink()
    (broken / "scheduler" / "scheduler_config.json").unlink()
    for f in (broken / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(broken, device="cpu")
    msg = str(info.value)
    assert "vae/ weights" in msg and "scheduler/scheduler_config.json" in msg and "tokenizer/" in msg
    assert "unet" not in msg and "text_encoder" not in msg


def test_file_instead_of_folder(tmp_path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(f, device="cpu")


def test_unreachable_hub_id() -> None:
    hub_id = "conceptseg-tests-nobody/no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model") as info:
        load_model(hub_id, device="cpu")
    assert repr(hub_id) in str(info.value) and "hub" in str(info.value)


def test_cli_reports_missing_component(tiny_model_dir, tmp_path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    (tmp_path / "images").mkdir()
    rc = main(["prelim", "--model", str(broken), "--concept", "bird", "--images", str(tmp_path / "images"),
               "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unet" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_components_list() -> None:
    assert set(COMPONENTS) == {"vae", "unet", "text_encoder", "tokenizer", "scheduler"}
    with pytest.raises((KeyError, ValueError), match="tiny"):  # the message lists the presets
        build_components("no-such-preset")


def test_a_preset_built_for_another_image_size_states_it_and_keeps_its_weights() -> None:
    """The resolution a run takes images at is the folder's (sample_size x the VAE's factor)."""
    parts, native = build_components("tiny", image_size=64), build_components("tiny")
    model = from_components(parts)
    assert model.resolution == 64 and parts["vae"].config.sample_size == 64 and from_components(native).resolution == 32
    assert [p.shape for p in parts["unet"].parameters()] == [p.shape for p in native["unet"].parameters()]


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"unet/ weights \(\*\.safetensors\) \(only pickled \.bin"):
        load_model(folder, device="cpu")
