"""`train-t2i`: from scratch on a tiny toy world, resumed from a checkpoint, and fine-tuned."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conceptseg.data.imagefolder import read_imagefolder
from conceptseg.data.toyworld import ToyWorldConfig, generate
from conceptseg.modeling import build_components
from conceptseg.train_t2i import TrainT2IConfig, train_t2i

OLD_NS = 1_000_000_000 * 10**9  # an mtime in 2001: a rewritten file gets "now"
PROMPT = "a photo of a star"


def _cfg(data: Path, out: Path, **changes) -> TrainT2IConfig:
    kw = dict(data=data, out=out, preset="tiny", steps=4, vae_steps=2, batch_size=4, checkpoint_every=2,
              samples_per_prompt=1, sample_prompts=[PROMPT], progress=False)
    kw.update(changes)
    return TrainT2IConfig(**kw)


def _weights(model_dir: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((Path(model_dir) / component).glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fraction_changed(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return sum(not torch.equal(a[k], b[k]) for k in a) / len(a)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def _run(cfg: TrainT2IConfig) -> tuple[Path, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        final = train_t2i(cfg)
    return final, buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("toy") / "data", 16, seed=0, config=ToyWorldConfig(size=32), progress=False)


@pytest.fixture(scope="module")
def scratch(dataset, tmp_path_factory) -> SimpleNamespace:
    """A 4-step run from scratch (checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("scratch") / "run"
    final, log = _run(_cfg(dataset, out))
    return SimpleNamespace(out=out, final=final, log=log)


@pytest.fixture(scope="module")
def resumed(dataset, scratch, tmp_path_factory) -> SimpleNamespace:
    """A copy of the 4-step run, continued to 6 steps; the old files aged so a rewrite shows."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(scratch.out, out)
    kept = [p for d in ("checkpoints/step-000004", "vae") for p in _files(out / d)]
    for p in kept:
        os.utime(p, ns=(OLD_NS, OLD_NS))
    contents = {p: p.read_bytes() for p in kept}
    final, log = _run(_cfg(dataset, out, steps=6))
    return SimpleNamespace(out=out, final=final, log=log, kept=contents)


# ------------------------------------------------------------------ from scratch


def test_scratch_layout(scratch, dataset) -> None:
    out = scratch.out
    assert scratch.final == out / "model"
    for step in (2, 4):
        ckpt = out / "checkpoints" / f"step-{step:06d}"
        state = json.loads((ckpt / "state.json").read_text())
        assert (state["step"], state["ema_optimization_step"]) == (step, step)
        assert state["settings"]["lr"] == 1e-3 and "steps" not in state["settings"]  # steps may grow
        assert (ckpt / "accelerate").is_dir() and (ckpt / "ema.safetensors").exists()
        assert not (ckpt / "model").exists()  # the model is exported once, at the end (an SD export is GBs)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # the final model holds the EMA weights of the last step
    ema = load_file(out / "checkpoints" / "step-000004" / "ema.safetensors")
    unet = _weights(out / "model", "unet")
    from diffusers import UNet2DConditionModel

    order = [n for n, _ in UNet2DConditionModel.from_pretrained(out / "model" / "unet").named_parameters()]
    assert all(torch.equal(unet[name], ema[str(i)]) for i, name in enumerate(order))
    cfg = json.loads((out / "train_config.json").read_text())
    n_train = sum(r.split != "test" for r in read_imagefolder(dataset))
    assert cfg["num_images"] == n_train and 0 < n_train < 16
    assert cfg["lr"] == 1e-3 and cfg["train_text_encoder"] is True and cfg["preset"] == "tiny"
    assert not (out / ".model.tmp").exists()


def test_scratch_model_loads_with_diffusers(scratch, tokenizer) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(scratch.out / "model", local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.tokenizer(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    assert pipe.tokenizer.model_max_length == 77
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_scratch_samples(scratch) -> None:
    with Image.open(scratch.out / "samples.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"  # one prompt x one sample of 32x32


def test_scratch_weights_changed_from_initialisation(scratch) -> None:
    init = build_components("tiny", seed=0)  # train_t2i builds its model with cfg.seed = 0
    model = scratch.out / "model"
    assert _fraction_changed(_weights(model, "unet"), init["unet"].state_dict()) > 0.9
    assert _fraction_changed(_weights(model, "text_encoder"), init["text_encoder"].state_dict()) > 0.9
    assert _fraction_changed(_weights(model, "vae"), init["vae"].state_dict()) > 0.9
    # the first checkpoint differs from the second: training went on between them
    assert not _same(load_file(scratch.out / "checkpoints/step-000002/ema.safetensors"),
                     load_file(scratch.out / "checkpoints/step-000004/ema.safetensors"))


def test_scratch_vae_scaling_factor(scratch, dataset) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(scratch.out / "vae")
    assert _same(vae.state_dict(), _weights(scratch.out / "model", "vae"))
    factor = vae.config.scaling_factor
    assert factor != pytest.approx(0.18215)  # not the SD default: measured on the data
    assert json.loads((scratch.out / "model" / "vae" / "config.json").read_text())["scaling_factor"] == factor
    images = np.stack([np.asarray(Image.open(r.image).convert("RGB")) for r in read_imagefolder(dataset) if r.split != "test"])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert factor == pytest.approx(1.0 / float(mean.std()), rel=1e-4)


# ------------------------------------------------------------------ resumed


def test_resume_continues_from_the_last_checkpoint(resumed, scratch) -> None:
    out = resumed.out
    assert "resumed from" in resumed.log and "step-000004" in resumed.log and "at step 4" in resumed.log
    state = json.loads((out / "checkpoints/step-000006/state.json").read_text())
    assert (state["step"], state["ema_optimization_step"]) == (6, 6)
    # checkpoints_total_limit 2: the oldest is gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    # the kept checkpoint and the trained VAE were neither rewritten nor changed
    for p, data in resumed.kept.items():
        assert p.stat().st_mtime_ns == OLD_NS, p
        assert p.read_bytes() == data, p
    assert not _same(_weights(out / "model", "unet"), _weights(scratch.final, "unet"))  # 2 more steps
    assert json.loads((out / "train_config.json").read_text())["steps"] == 6


def test_resume_equals_an_uninterrupted_run(resumed, dataset, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("straight") / "run"
    _run(_cfg(dataset, out, steps=6))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    for comp in ("unet", "text_encoder", "vae"):
        a, b = _weights(out / "model", comp), _weights(resumed.out / "model", comp)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=f"{comp}.{k}")


def test_rerun_after_the_last_step_changes_nothing(resumed, dataset) -> None:
    ckpt = resumed.out / "checkpoints/step-000006"
    files = _files(ckpt)
    for p in files:
        os.utime(p, ns=(OLD_NS, OLD_NS))
    before = _weights(resumed.out / "model", "unet")
    _run(_cfg(dataset, resumed.out, steps=6))
    assert all(p.stat().st_mtime_ns == OLD_NS for p in files)
    assert _same(_weights(resumed.out / "model", "unet"), before)


# ------------------------------------------------------------------ fine-tuning


def test_finetune_trains_only_the_unet(scratch, dataset, tmp_path_factory, monkeypatch) -> None:
    import conceptseg.train_t2i as t2i

    devices = []
    real_grid = t2i.sample_grid
    monkeypatch.setattr(t2i, "sample_grid", lambda *a, device=None, **k: devices.append(device) or real_grid(*a, device=device, **k))
    base = scratch.out / "model"
    out = tmp_path_factory.mktemp("finetune") / "run"
    cfg = _cfg(dataset, out, base_model=str(base), preset=None, steps=2, samples_per_prompt=2,
               sample_prompts=[PROMPT, "a photo of a car"])
    final, _ = _run(cfg)
    assert final == out / "model"
    assert _same(_weights(final, "text_encoder"), _weights(base, "text_encoder"))  # frozen
    assert _same(_weights(final, "vae"), _weights(base, "vae"))  # not trained, not re-scaled
    assert json.loads((final / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((base / "vae" / "config.json").read_text())["scaling_factor"]
    assert _fraction_changed(_weights(final, "unet"), _weights(base, "unet")) > 0.9
    assert not (out / "vae").exists()  # no VAE stage when fine-tuning
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 1e-5 and saved["train_text_encoder"] is False
    assert json.loads((out / "checkpoints/step-000002/state.json").read_text())["step"] == 2
    with Image.open(out / "samples.png") as im:
        assert im.size == (2 * 32, 2 * 32)  # one row per prompt, one column per sample
    assert devices == [torch.device("cpu")]  # the sample grid runs on the trainer's device


def test_cli_unknown_preset_is_a_clean_error(dataset, tmp_path, capsys) -> None:
    from conceptseg.cli import main

    rc = main(["train-t2i", "--data", str(dataset), "--out", str(tmp_path / "out"), "--preset", "nope", "--steps", "1"])
    assert rc == 2
    assert "nope" in capsys.readouterr().err


def test_a_checkpoint_without_its_ema_file_still_resumes(scratch, dataset, tmp_path_factory) -> None:
    """Checkpoints written before ema.safetensors existed kept the EMA only in a model export: the
    EMA is rebuilt from it, so continuing gives the same weights as continuing one that has the file."""
    with_file = tmp_path_factory.mktemp("with_ema") / "run"
    without = tmp_path_factory.mktemp("without_ema") / "run"
    shutil.copytree(scratch.out, with_file)
    shutil.copytree(scratch.out, without)
    (without / "checkpoints/step-000004/ema.safetensors").unlink()
    shutil.copytree(scratch.out / "model", without / "checkpoints/step-000004/model")  # that run's layout: the final = step 4 EMA
    _run(_cfg(dataset, with_file, steps=6))
    _run(_cfg(dataset, without, steps=6))
    for comp in ("unet", "text_encoder"):
        a, b = _weights(with_file / "model", comp), _weights(without / "model", comp)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=f"{comp}.{k}")


def test_decoder_fine_tuning_keeps_the_encoder(dataset, scratch, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("decoder") / "run"
    shutil.copytree(scratch.out, out)
    shutil.rmtree(out / "model")
    _run(_cfg(dataset, out, decoder_steps=2))
    before, after = _weights(scratch.out / "model", "vae"), _weights(out / "model", "vae")
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)  # the latent space the UNet learned
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    assert (out / "vae_decoder" / "config.json").exists()


# ------------------------------------------------------------------ fine-tuning on the chest world, streamed


def test_finetune_on_chest_reports_streams_and_resumes(scratch, tmp_path_factory, monkeypatch) -> None:
    """train-t2i --base-model on chest radiographs with reports: images are read per step (never all
    at once), and a run stopped at step 2 and resumed to 4 equals a straight 4-step run."""
    import conceptseg.train_t2i as t2i
    from conceptseg.data.chest import ChestWorldConfig, generate as generate_chest

    data = generate_chest(tmp_path_factory.mktemp("chest") / "data", 12, seed=0, progress=False, config=ChestWorldConfig(size=32))
    monkeypatch.setattr(t2i, "_load_pairs", lambda *a, **k: pytest.fail("fine-tuning loaded every image"))
    loaded = []
    real_encode = t2i._encode_batch
    monkeypatch.setattr(t2i, "_encode_batch", lambda vae, paths, *a: loaded.append(len(paths)) or real_encode(vae, paths, *a))
    base = scratch.out / "model"
    kw = dict(base_model=str(base), preset=None, lr=1e-3, train_text_encoder=True, sample_prompts=["Moderate right pleural effusion."])
    root = tmp_path_factory.mktemp("chest_ft")
    _run(_cfg(data, root / "stopped", steps=2, **kw))
    assert loaded == [4, 4]  # one batch of 4 images per step
    shutil.copytree(root / "stopped", root / "resumed")
    _, log = _run(_cfg(data, root / "resumed", steps=4, **kw))
    assert "at step 2" in log
    _run(_cfg(data, root / "straight", steps=4, **kw))
    for comp in ("unet", "text_encoder"):
        a, b = _weights(root / "straight" / "model", comp), _weights(root / "resumed" / "model", comp)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=f"{comp}.{k}")
        assert _fraction_changed(a, _weights(base, comp)) > 0
    assert _same(_weights(root / "straight" / "model", "vae"), _weights(base, "vae"))
    saved = json.loads((root / "straight" / "train_config.json").read_text())
    assert saved["num_images"] == sum(r.split != "test" for r in read_imagefolder(data))
