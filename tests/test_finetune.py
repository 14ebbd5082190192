"""Stage 2: the background rectangle, the branch mixing, the loss, and training that saves, loads and resumes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.finetune import (
    BoxRules, FinetuneConfig, background_box_mask, collect_pairs, finetune, make_optimizer, masked_loss,
    sample_background_box, training_targets,
)
from conceptseg.modeling import build_components
from conceptseg.models import load_model, save_model


def _random_foreground(rng, side=64):
    fg = np.zeros((side, side), bool)
    for _ in range(rng.integers(0, 4)):
        y, x = rng.integers(0, side, 2)
        h, w = rng.integers(2, side // 2, 2)
        fg[y : y + h, x : x + w] = True
    return fg


@pytest.mark.parametrize("side", [64, 32])
def test_box_obeys_every_rule_and_never_covers_foreground(side):
    rules = BoxRules().scaled(side)
    rng = np.random.default_rng(0)
    boxes = 0
    for _ in range(200):
        fg = _random_foreground(rng, side)
        box = sample_background_box(fg, rng)
        loss = background_box_mask(fg, np.random.default_rng(1))
        assert not (loss & fg).any()
        if box is None:
            continue
        boxes += 1
        y0, y1, x0, x1 = box
        h, w = y1 - y0 + 1, x1 - x0 + 1
        assert h > rules.min_side and w > rules.min_side
        assert rules.min_area <= h * w <= rules.max_area
        assert not (h > rules.max_both_sides and w > rules.max_both_sides)
        assert (~fg[y0 : y1 + 1, x0 : x1 + 1]).mean() >= 2 / 3
    assert boxes > 100  # the rules are satisfiable on ordinary masks


def test_box_rules_at_the_published_numbers():
    rules = BoxRules()
    assert rules.accepts(16, 16, 1.0)
    assert not rules.accepts(10, 40, 1.0)  # a side <= 10
    assert not rules.accepts(15, 15, 1.0)  # area < 16^2
    assert not rules.accepts(33, 33, 1.0)  # area > 32^2
    assert not rules.accepts(20, 20, 0.6)  # less than 2/3 background


def test_fallback_is_the_whole_background():
    fg = np.ones((64, 64), bool)
    fg[:5, :5] = False  # too little background for any legal box
    rng = np.random.default_rng(0)
    assert sample_background_box(fg, rng) is None
    np.testing.assert_array_equal(background_box_mask(fg, rng), ~fg)


@pytest.mark.parametrize("fill", [True, False])
def test_sampler_terminates_on_degenerate_masks(fill):
    fg = np.full((64, 64), fill)
    loss = background_box_mask(fg, np.random.default_rng(0))
    if fill:
        assert not loss.any()  # all foreground: nothing, and no endless loop
    else:
        assert loss.sum() >= 16 * 16  # all background: an ordinary legal box


def test_branches_mix_half_and_half_with_the_right_loss_masks():
    rng = np.random.default_rng(0)
    fg = torch.from_numpy(np.stack([_random_foreground(rng, 32) for _ in range(8)]))
    flags = []
    for _ in range(100):
        background, loss_mask = training_targets(fg, rng)
        flags.extend(background)
        for i in range(len(fg)):
            if background[i]:
                assert not (loss_mask[i, 0].bool() & fg[i]).any()
                assert loss_mask[i].sum() < fg[i].numel()
            else:
                assert loss_mask[i].eq(1).all()
    assert 0.45 < np.mean(flags) < 0.55


def test_masked_loss_divides_by_all_positions():
    pred, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, :2, :] = 1  # 16 of 64 positions
    mask[1] = 1
    np.testing.assert_allclose(masked_loss(pred, target, mask).numpy(), [16 / 64, 1.0])


@pytest.fixture(scope="module")
def stage1_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model_dir = root / "model"
    save_model(build_components("tiny"), model_dir)
    images, masks = root / "images", root / "prelim" / "masks"
    images.mkdir()
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 32), (32, 48), (36, 36)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"im{i}.png")
        m = np.zeros((h, w), np.uint8)
        m[h // 4 : h // 2, w // 4 : w // 2] = 255
        Image.fromarray(m).save(masks / f"im{i}.png")
    return root


def _cfg(root, out, **kw):
    base = dict(concept="bird", images=root / "images", prelim=root / "prelim", out=out, model=str(root / "model"),
                steps=2, batch_size=2, checkpoint_every=2, progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_fused_adamw_is_fused_on_the_cpu_too(tmp_path):
    """`plan` counts no foreach temporary for adamw-fused; on the CPU the optimiser was not fused,
    so the run held one more fp32 copy of the trainable weights than planned."""
    param = torch.nn.Parameter(torch.zeros(3))
    cfg = _cfg(tmp_path, tmp_path / "out", optimizer="adamw-fused")
    assert make_optimizer([param], cfg, torch.device("cpu")).defaults["fused"]
    assert not make_optimizer([param], _cfg(tmp_path, tmp_path / "out"), torch.device("cpu")).defaults.get("fused")


def _unet_delta(a, b):
    return sum((p - q).abs().sum().item() for p, q in zip(a.unet.parameters(), b.unet.parameters()))


def test_validation_names_each_bad_pair(stage1_folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    masks = tmp_path / "prelim" / "masks"
    masks.mkdir(parents=True)
    for name, size, mask in [("ok", (20, 20), "part"), ("nomask", (20, 20), None), ("wrongsize", (20, 20), "small"), ("allfg", (20, 20), "full")]:
        Image.new("RGB", size).save(images / f"{name}.png")
        if mask == "part":
            m = np.zeros((20, 20), np.uint8)
            m[5:10, 5:10] = 255
            Image.fromarray(m).save(masks / f"{name}.png")
        elif mask == "small":
            Image.new("L", (10, 10)).save(masks / f"{name}.png")
        elif mask == "full":
            Image.new("L", (20, 20), 255).save(masks / f"{name}.png")
    pairs, problems = collect_pairs(images, tmp_path / "prelim")
    assert [p.image.stem for p in pairs] == ["ok"]
    text = "\n".join(problems)
    assert "nomask.png: no preliminary mask" in text
    assert "wrongsize.png: mask" in text and "10x10" in text
    assert "allfg.png" in text and "all foreground" in text
    with pytest.raises(ValueError, match="no image"):
        finetune(_cfg(stage1_folder, tmp_path / "out", images=images, prelim=tmp_path / "nothing"))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_changes_weights_and_saves_a_loadable_model(stage1_folder, tmp_path, method):
    out = finetune(_cfg(stage1_folder, tmp_path / method, method=method))
    tuned = load_model(out, device="cpu")
    base = load_model(stage1_folder / "model", device="cpu")
    assert _unet_delta(tuned, base) > 0
    assert (out.parent / "preview.png").exists()
    assert not (out.parent / "checkpoints" / "step-000002" / "model").exists()  # exported once, at the end
    if method == "lora":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(stage1_folder / "model", local_files_only=True)
        pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")  # plain diffusers reads it
        assert any("lora" in n for n, _ in pipe.unet.named_parameters())
        text_before = dict(base.text_encoder.named_parameters())
        for n, p in tuned.text_encoder.named_parameters():
            assert torch.equal(p, text_before[n])


def test_resume_continues_where_it_stopped(stage1_folder, tmp_path):
    straight = finetune(_cfg(stage1_folder, tmp_path / "straight", steps=4))
    finetune(_cfg(stage1_folder, tmp_path / "resumed", steps=2))
    resumed = finetune(_cfg(stage1_folder, tmp_path / "resumed", steps=4))
    assert (tmp_path / "resumed" / "checkpoints" / "step-000004").exists()
    a, b = load_model(straight, device="cpu"), load_model(resumed, device="cpu")
    assert _unet_delta(a, b) < 1e-3  # same data order, optimiser and EMA state as an uninterrupted run


def test_two_process_cpu_run_with_accelerate_launch(stage1_folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "conceptseg", "finetune",
           "--model", str(stage1_folder / "model"), "--concept", "bird", "--images", str(stage1_folder / "images"),
           "--prelim", str(stage1_folder / "prelim"), "--out", str(tmp_path / "ddp"), "--steps", "2",
           "--batch-size", "1", "--checkpoint-every", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "model" / "unet" / "config.json").exists()
    tuned = load_model(tmp_path / "ddp" / "model", device="cpu")
    assert _unet_delta(tuned, load_model(stage1_folder / "model", device="cpu")) > 0


# ---------------------------------------------------------------- checkpoints, steps, resume checks

def test_lora_checkpoint_holds_the_adapters_not_the_frozen_denoiser(stage1_folder, tmp_path):
    """A LoRA checkpoint holds the adapters and their optimiser and EMA state, none of the frozen
    UNet; stopped after a checkpoint and resumed, the run equals a straight one."""
    from safetensors.torch import load_file

    run = dict(method="lora", lora_rank=2, checkpoint_every=1, lr=1e-3)
    finetune(_cfg(stage1_folder, tmp_path / "resumed", steps=1, **run))
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000001"
    files = sorted(p.name for p in (ckpt / "accelerate").iterdir())
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))], files  # no denoiser file
    adapters = load_file(ckpt / "accelerate" / "adapters.safetensors")
    unet_tensors = len(load_model(stage1_folder / "model", device="cpu").unet.state_dict())
    assert adapters and all("lora" in k for k in adapters) and len(adapters) < unet_tensors
    optimiser = torch.load(ckpt / "accelerate" / "optimizer.bin", weights_only=True)
    assert len(optimiser["state"]) == len(adapters)
    assert len(load_file(ckpt / "ema.safetensors")) == len(adapters)

    straight = finetune(_cfg(stage1_folder, tmp_path / "straight", steps=2, **run))
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "model")  # as if stopped after the checkpoint of step 1
    resumed = finetune(_cfg(stage1_folder, tmp_path / "resumed", steps=2, **run))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)


def test_steps_count_optimiser_steps_under_gradient_accumulation(stage1_folder, tmp_path):
    import json

    finetune(_cfg(stage1_folder, tmp_path / "acc", steps=2, batch_size=1, gradient_accumulation=2))
    state = json.loads((tmp_path / "acc" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["ema_optimization_step"] == 2  # two optimiser updates, of two micro-batches each
    log = [json.loads(line) for line in (tmp_path / "acc" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r] == [1, 2]


def test_a_checkpoint_made_with_other_settings_is_refused(stage1_folder, tmp_path):
    """Refused with one error naming the checkpoint and the setting (a ValueError: CheckpointMismatch)."""
    out = tmp_path / "ft"
    finetune(_cfg(stage1_folder, out, steps=1, checkpoint_every=1))
    ckpt = out / "checkpoints" / "step-000001"
    with pytest.raises(ValueError, match=r"(?s)step-000001.*lr: 0\.0001 there, 0\.0002 now"):
        finetune(_cfg(stage1_folder, out, steps=2, lr=2e-4))
    with pytest.raises(ValueError, match=r"(?s)step-000001.*method: 'full' there, 'lora' now"):
        finetune(_cfg(stage1_folder, out, steps=2, method="lora"))
    with pytest.raises(ValueError, match="batch_size"):
        finetune(_cfg(stage1_folder, out, steps=2, batch_size=1))
    assert ckpt.exists() and not ckpt.with_name(ckpt.name + ".damaged").exists()  # refused, not set aside


def test_latent_cache_changes_the_training_data(stage1_folder, tmp_path):
    """latent_cache trains on a few fixed views per image instead of a fresh crop and flip each step:
    the batches differ, so it is an output setting (a run that turns it on is redone)."""
    from conceptseg.finetune import _Batches
    from conceptseg.settings import output_settings

    model = load_model(stage1_folder / "model", device="cpu")
    pairs, _ = collect_pairs(stage1_folder / "images", stage1_folder / "prelim")
    fresh = _Batches(pairs, model, _cfg(stage1_folder, tmp_path, latent_cache=0), rank=0)(0)
    cached = _Batches(pairs, model, _cfg(stage1_folder, tmp_path, latent_cache=2), rank=0)(0)
    assert not torch.allclose(fresh[0], cached[0])
    assert output_settings(_cfg(stage1_folder, tmp_path, latent_cache=2))["latent_cache"] == 2
    assert output_settings(_cfg(stage1_folder, tmp_path))["latent_cache"] == 0


def test_finetune_clips_gradients_when_asked(stage1_folder, tmp_path, monkeypatch):
    from accelerate import Accelerator

    calls = []
    real = Accelerator.clip_grad_norm_
    monkeypatch.setattr(Accelerator, "clip_grad_norm_",
                        lambda self, params, max_norm, *a, **k: calls.append(max_norm) or real(self, params, max_norm, *a, **k))
    finetune(_cfg(stage1_folder, tmp_path / "clipped", steps=2, batch_size=1, gradient_accumulation=2, max_grad_norm=1.0))
    assert calls == [1.0, 1.0]  # once per optimiser step, after its micro-batches
    finetune(_cfg(stage1_folder, tmp_path / "unclipped", steps=1))  # the default: the paper's, no clipping
    assert calls == [1.0, 1.0]
