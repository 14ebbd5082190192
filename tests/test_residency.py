"""Where models live: the residency policy on the model object, fine-tuning's text encoders off the
device before the first step, frozen parts in the weight dtype, gradient checkpointing on by
default, and `conceptseg run` loading each model once and freeing it when no later stage needs it."""

from __future__ import annotations

import gc
import sys
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg import finetune as ft
from conceptseg.modeling import build_components
from conceptseg.models import from_components, load_model, save_model
from conceptseg.residency import free_device_memory, peak_rss_mb, reset_peak_rss


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A tiny model folder, three images and their preliminary masks."""
    root = tmp_path_factory.mktemp("residency")
    save_model(build_components("tiny"), root / "model")
    (root / "images").mkdir()
    (root / "prelim" / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        m = np.zeros((36, 36), np.uint8)
        m[9:18, 9:18] = 255
        Image.fromarray(m).save(root / "prelim" / "masks" / f"im{i}.png")
    return root


def _cfg(root, out, **kw):
    base = dict(concept="bird", images=root / "images", prelim=root / "prelim", out=out, model=str(root / "model"),
                steps=2, batch_size=2, checkpoint_every=2, progress=False)
    return ft.FinetuneConfig(**{**base, **kw})


class Watch:
    """What fine-tuning's model looks like at its first training step, and its text encoder's passes."""

    def __init__(self, monkeypatch):
        self.encoder = None  # a weak reference to the loaded model's text encoder
        self.passes = 0  # forward passes of that text encoder
        self.first_step: dict | None = None
        real_load, real_loss = ft.load_model, ft.denoising_loss

        def load(*args, **kwargs):
            model = real_load(*args, **kwargs)
            model.text_encoder.register_forward_hook(lambda *_: setattr(self, "passes", self.passes + 1))
            self.encoder = weakref.ref(model.text_encoder)
            return model

        def loss(model, *args, **kwargs):
            if self.first_step is None:
                gc.collect()
                encoder = self.encoder()
                self.first_step = {"encoder": encoder, "passes": self.passes, "vae": model.vae.dtype,
                                   "denoiser": model.denoiser.dtype,
                                   "checkpointing": model.denoiser.is_gradient_checkpointing}
                del encoder
            return real_loss(model, *args, **kwargs)

        monkeypatch.setattr(ft, "load_model", load)
        monkeypatch.setattr(ft, "denoising_loss", loss)


def test_lora_drops_the_text_encoders_before_the_first_step(stage1, tmp_path, monkeypatch):
    """LoRA exports only its adapters: the text encoders are dropped once both prompts are encoded,
    and nothing encodes text while training (the preview included)."""
    watch = Watch(monkeypatch)
    ft.finetune(_cfg(stage1, tmp_path / "lora", method="lora", lora_rank=2))
    assert watch.first_step["encoder"] is None  # released before the first training step
    assert watch.first_step["passes"] == watch.passes == 1  # the conditioning, once


def test_full_moves_the_text_encoders_off_and_holds_frozen_parts_in_the_weight_dtype(stage1, tmp_path, monkeypatch):
    """A full fine-tune under bf16 autocast: fp32 UNet, bf16 frozen VAE and text encoders (diffusers'
    scripts' weight dtype); the text encoders on the CPU from the first step (they are exported with
    the model) and not run again."""
    watch = Watch(monkeypatch)
    out = ft.finetune(_cfg(stage1, tmp_path / "full", mixed_precision="bf16"))
    first = watch.first_step
    assert first["denoiser"] == torch.float32 and first["vae"] == torch.bfloat16
    assert first["encoder"].device.type == "cpu" and first["encoder"].dtype == torch.bfloat16
    assert first["passes"] == watch.passes == 1
    from safetensors.torch import load_file

    exported = {part: {t.dtype for t in load_file(next((out / part).glob("*.safetensors"))).values()} for part in ("unet", "vae")}
    assert exported == {"unet": {torch.float32}, "vae": {torch.bfloat16}}  # the frozen VAE as training held it


def test_gradient_checkpointing_is_on_by_default_and_changes_no_result(stage1, tmp_path, monkeypatch):
    from conceptseg.settings import output_settings

    watch = Watch(monkeypatch)
    default = load_model(ft.finetune(_cfg(stage1, tmp_path / "on")), device="cpu")
    assert watch.first_step["checkpointing"] is True
    watch.first_step = None
    off = load_model(ft.finetune(_cfg(stage1, tmp_path / "off", gradient_checkpointing=False)), device="cpu")
    assert watch.first_step["checkpointing"] is False
    base = load_model(stage1 / "model", device="cpu")
    moved = sum((p - q).abs().sum().item() for p, q in zip(default.unet.parameters(), base.unet.parameters()))
    assert moved > 0
    for (name, p), q in zip(default.unet.named_parameters(), off.unet.parameters()):
        torch.testing.assert_close(p, q, msg=name)  # recomputed activations: the same training, to rounding
    assert "gradient_checkpointing" not in output_settings(_cfg(stage1, tmp_path))  # an execution setting


def test_the_policy_on_the_model_object():
    """cast_frozen, offload_text_encoders (kept: conditioning still works; dropped: it refuses) and release."""
    from conceptseg.families import family_from_components
    from conceptseg.modeling.presets import build_family_components

    sd = from_components(build_components("tiny"), device="cpu", dtype="fp32")
    flux = family_from_components("flux", build_family_components("flux", "tiny"), "cpu", torch.float32)
    for model in (sd, flux):
        model.cast_frozen(torch.bfloat16)
        assert model.vae.dtype == torch.bfloat16 and model.denoiser.dtype == torch.float32
        assert len(model.text_encoders()) == (1 if model is sd else 2)
        assert all(m.dtype == torch.bfloat16 for m in model.text_encoders().values())
        model.offload_text_encoders(keep=True)
        assert all(m.device.type == "cpu" for m in model.text_encoders().values())
        cond = model.conditioning(["a photo of a background"])  # run where the encoders are, returned on the model's device
        embeds = cond if isinstance(cond, torch.Tensor) else cond.prompt_embeds
        assert embeds.device == model.device and embeds.dtype == model.dtype
        model.offload_text_encoders(keep=False)
        assert not model.text_encoders()
        with pytest.raises(RuntimeError, match="text encoders .* were dropped"):
            model.conditioning(["a photo of a background"])
        model.release()
        assert not model.networks() and model.vae is None


def test_peak_resident_memory_is_measured_from_a_reset():
    """`conceptseg run` records each stage's peak RSS: the high-water mark starts again at each stage."""
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its high-water mark")
    block = np.ones(2**23)  # 64 MiB, touched
    high = peak_rss_mb()
    del block
    assert reset_peak_rss()
    assert peak_rss_mb() < high - 48


def test_freeing_hands_the_host_heap_back():
    """glibc keeps freed blocks inside its heap: on the CPU, a run's resident memory stayed near
    fine-tuning's peak for every later stage until `free_device_memory` trimmed the heap."""
    import ctypes
    import os

    if not (sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")):
        pytest.skip("no glibc malloc_trim here")

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [np.ones(2**13) for _ in range(2000)]  # 64 KiB each: inside the heap, not mmap'd
    kept = blocks[1::2]  # every other one stays, so the freed half cannot shrink the heap's top
    del blocks
    before = rss_mb()
    free_device_memory()
    assert rss_mb() < before - 32, "about 62 MiB of freed blocks should go back to the system"
    assert len(kept) == 1000  # held until here, so the freed half stayed scattered through the heap

