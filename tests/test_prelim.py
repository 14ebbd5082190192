"""Stage 1 (preliminary masks): timestep grid, batching invariance, corrupt inputs and the CLI."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.cli import main
from conceptseg.prelim import (
    PrelimConfig,
    PrelimRunner,
    attention_maps,
    attention_maps_by_level,
    image_noise,
    preliminary_masks,
    run_prelim,
    timestep_grid,
)
from conceptseg.settings import model_identity

LAT = 16  # latent side of the tiny preset
OLD_NS = 1_000_000_000 * 10**9  # an mtime in 2001: a rewritten file gets "now"

# ------------------------------------------------------------------ timestep grid


def test_timestep_grid_default() -> None:
    grid = timestep_grid()
    assert grid == list(range(1, 782, 20))
    assert len(grid) == 40 and grid[0] == 1 and grid[-1] == 781


def test_timestep_grid_full_and_short() -> None:
    assert timestep_grid(50)[-1] == 981 and len(timestep_grid(50)) == 50
    assert timestep_grid(3) == [1, 21, 41]
    assert timestep_grid(2, offset=0) == [0, 20]


@pytest.mark.parametrize("t0", [0, -1, 51])
def test_timestep_grid_invalid(t0) -> None:
    with pytest.raises(ValueError, match="T0"):
        timestep_grid(t0)


def test_runner_uses_the_scheduler_offset(tiny_model) -> None:
    runner = PrelimRunner(tiny_model, PrelimConfig("bird", steps=3))
    assert tiny_model.scheduler.config.steps_offset == 1
    assert runner.timesteps == [1, 21, 41]
    assert runner.token_groups == [[5]]
    assert runner.cond.shape == (1, 77, 32)


def test_prelim_config() -> None:
    cfg = PrelimConfig("bird")
    assert cfg.concept == ["bird"] and cfg.full_prompt == "a photo of a bird" and cfg.steps == 40
    cfg = PrelimConfig(("human", "arms"), prompt="a photo of a human with arms")
    assert cfg.concept == ["human", "arms"] and cfg.full_prompt == "a photo of a human with arms"
    with pytest.raises(ValueError):
        PrelimConfig([])
    with pytest.raises(ValueError):
        PrelimConfig("bird", batch_size=0)


def test_image_noise_depends_only_on_seed_and_key() -> None:
    a = image_noise(0, "img1", (3, 4, 2, 2))
    assert torch.equal(a, image_noise(0, "img1", (3, 4, 2, 2)))
    assert not torch.equal(a, image_noise(0, "img2", (3, 4, 2, 2)))
    assert not torch.equal(a, image_noise(1, "img1", (3, 4, 2, 2)))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, image_noise(0, "img1", (3, 4, 2, 2)))


# ------------------------------------------------------------------ batching


@pytest.fixture(scope="module")
def latents_and_noise(tiny_model):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    latents = tiny_model.encode_images(pixels)
    noise = torch.stack([image_noise(0, f"k{i}", (3, *latents.shape[1:])) for i in range(3)])
    return latents, noise


def test_attention_maps_independent_of_batch_size(tiny_model, latents_and_noise) -> None:
    latents, noise = latents_and_noise
    cond = tiny_model.encode_prompts(["a photo of a bird"])
    groups = [[5], [1, 2]]
    ts = [1, 21, 41]
    one = attention_maps(tiny_model, latents, cond, groups, ts, noise, batch_size=1)
    assert one.shape == (3, 2, LAT, LAT) and one.dtype == torch.float32
    for bs in (9, 4, 2):  # all rows in one batch; batches that straddle images
        torch.testing.assert_close(attention_maps(tiny_model, latents, cond, groups, ts, noise, batch_size=bs), one,
                                   atol=1e-5, rtol=0)
    # ...and the maps do differ between images, so the comparison can fail
    assert (one[0] - one[1]).abs().max() > 1e-4


def test_attention_maps_by_level_has_each_cross_attention_resolution(tiny_model, latents_and_noise) -> None:
    latents, noise = latents_and_noise
    cond = tiny_model.encode_prompts(["a photo of a bird"])
    ts = timestep_grid(3)
    levels = attention_maps_by_level(tiny_model, latents, cond, [[5]], ts, noise[:, :3], batch_size=4)
    unet = tiny_model.unet
    latent = latents.shape[-1]
    expected = {f"{latent >> i}x{latent >> i}" for i, on in enumerate(unet.config.down_block_types) if "CrossAttn" in on}
    assert set(levels) == expected
    overall = attention_maps(tiny_model, latents, cond, [[5]], ts, noise[:, :3], batch_size=4)
    for maps in levels.values():
        assert maps.shape == overall.shape
        assert not torch.allclose(maps, overall)  # each level differs from the equal-weight mean
    assert overall.min() >= min(m.min() for m in levels.values()) - 1e-6
    assert overall.max() <= max(m.max() for m in levels.values()) + 1e-6


def test_attention_maps_mean_over_timesteps(tiny_model, latents_and_noise) -> None:
    latents, noise = latents_and_noise
    cond = tiny_model.encode_prompts(["a photo of a bird"])
    ts = [1, 21, 41]
    all_t = attention_maps(tiny_model, latents, cond, [[5]], ts, noise, batch_size=9)
    per_t = [attention_maps(tiny_model, latents, cond, [[5]], [t], noise[:, j : j + 1], batch_size=3) for j, t in enumerate(ts)]
    torch.testing.assert_close(all_t, sum(per_t) / 3, atol=1e-5, rtol=0)
    assert (per_t[0] - per_t[2]).abs().max() > 1e-5  # the timestep and its noise matter


def test_runner_results_independent_of_batching(tiny_model, textured) -> None:
    runner = PrelimRunner(tiny_model, PrelimConfig("bird", steps=3, batch_size=6))
    images = [textured(40, 24, seed=1), textured(24, 40, seed=2)]
    together = runner(images, ["a", "b"])
    apart = runner(images[:1], ["a"]) + runner(images[1:], ["b"])
    reordered = runner(images[::-1], ["b", "a"])[::-1]
    for t, others in zip(together, zip(apart, reordered)):
        for o in others:
            np.testing.assert_allclose(t.attention, o.attention, atol=1e-5, rtol=0)
            assert np.array_equal(t.mask_latent, o.mask_latent)
            assert np.array_equal(t.mask, o.mask)
    for res, im in zip(together, images):
        assert res.attention.shape == (LAT, LAT) and res.attention.dtype == np.float32
        assert res.mask_latent.shape == (LAT, LAT) and res.mask_latent.dtype == bool
        assert res.mask.shape == (im.height, im.width) and res.mask.dtype == bool
        assert not (res.mask_latent & ~res.canvas.valid(LAT)).any()  # never foreground in the padding
    # the key (not the position in the batch) chooses the noise
    swapped = runner(images, ["b", "a"])
    assert np.abs(swapped[0].attention - together[0].attention).max() > 1e-6


def test_several_concept_words_are_summed(tiny_model, textured) -> None:
    prompt = "a photo of a human with arms and legs"
    im = [textured(32, 32, seed=3)]
    both = PrelimRunner(tiny_model, PrelimConfig(["human", "legs"], prompt=prompt, steps=2))(im, ["x"])[0]
    human = PrelimRunner(tiny_model, PrelimConfig(["human"], prompt=prompt, steps=2))(im, ["x"])[0]
    legs = PrelimRunner(tiny_model, PrelimConfig(["legs"], prompt=prompt, steps=2))(im, ["x"])[0]
    np.testing.assert_allclose(both.attention, human.attention + legs.attention, atol=1e-5, rtol=0)


def test_preliminary_masks_api(tiny_model, textured, tmp_path) -> None:
    textured(50, 20, seed=4).save(tmp_path / "wide.png")
    arr = np.asarray(textured(20, 30, seed=5))
    res = preliminary_masks(tiny_model, [tmp_path / "wide.png", arr, textured(7, 9, mode="L")], "bird", steps=2)
    assert [r.mask.shape for r in res] == [(20, 50), (30, 20), (9, 7)]
    assert [r.canvas.width for r in res] == [50, 20, 7]


# ------------------------------------------------------------------ run_prelim and the CLI


def _write_bad_images(folder) -> None:
    rng = np.random.default_rng(0)
    (folder / "garbage.png").write_bytes(rng.bytes(700))
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / "full.jpg")
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])


def test_run_prelim_skips_and_reports_corrupt_images(tiny_model, make_image, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    make_image(images / "good.png", 30, 20)
    make_image(images / "zgood.jpg", 20, 26, seed=1)
    _write_bad_images(images)
    out = tmp_path / "out"
    summary = run_prelim(tiny_model, images, out, PrelimConfig("bird", steps=2, batch_size=2), progress=False)
    assert summary == {"images": 4, "processed": 2, "skipped_done": 0, "failed": 2}
    printed = capsys.readouterr().out
    assert "garbage.png" in printed and "truncated.jpg" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    entries = manifest["images"]
    assert set(entries) == {"good", "zgood", "garbage", "truncated"}  # the samples' keys
    for bad in ("garbage.png", "truncated.jpg"):
        stem = bad.split(".")[0]
        assert entries[stem]["status"] == "failed" and bad in entries[stem]["error"]
        assert not (out / "masks" / f"{stem}.png").exists()
    for name, size in (("good.png", (30, 20)), ("zgood.jpg", (20, 26))):
        stem = name.split(".")[0]
        assert entries[stem]["status"] == "done"
        assert Image.open(out / "masks" / f"{stem}.png").size == size
        assert (out / "attention" / f"{stem}.npy").exists()
    assert manifest["counts"] == {"done": 2, "failed": 2}


def _prelim_args(model_dir, images, out, *extra) -> list[str]:
    return ["prelim", "--model", str(model_dir), "--concept", "bird", "--images", str(images), "--out", str(out),
            "--steps", "3", "--batch-size", "4", "--device", "cpu", *extra]


def _outputs(out) -> list:
    return sorted(p for sub in ("attention", "masks") for p in (out / sub).iterdir())


def _age(files) -> None:
    for p in files:
        os.utime(p, ns=(OLD_NS, OLD_NS))


# stem -> the ORIGINAL (displayed) size of the image: masks come back at this size
SIZES = {"wide": (40, 24), "tall": (20, 44), "square": (32, 32), "odd": (37, 11), "rotated": (24, 40), "depth": (30, 18)}
NAMES = {"wide.png", "tall.png", "square.png", "odd.jpg", "rotated.jpg", "depth.png"}


@pytest.fixture
def image_folder(tmp_path, make_image, textured):
    folder = tmp_path / "images"
    make_image(folder / "wide.png", 40, 24, seed=0)
    make_image(folder / "tall.png", 20, 44, seed=1, mode="L")
    make_image(folder / "square.png", 32, 32, seed=2, mode="RGBA")
    make_image(folder / "odd.jpg", 37, 11, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x24, displayed 24x40
    textured(40, 24, seed=4).save(folder / "rotated.jpg", exif=exif)
    depth = (np.random.default_rng(5).random((18, 30)) * 60000).astype(np.uint16)
    Image.fromarray(depth).save(folder / "depth.png")  # 16-bit grayscale
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_cli_prelim_end_to_end_and_resume(tiny_model_dir, image_folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_prelim_args(tiny_model_dir, image_folder, out)) == 0
    assert "6 done, 0 already done, 0 failed" in capsys.readouterr().out

    for stem, size in SIZES.items():
        att = np.load(out / "attention" / f"{stem}.npy")
        assert att.dtype == np.float32 and att.shape == (LAT, LAT) and np.isfinite(att).all()
        with Image.open(out / "masks" / f"{stem}.png") as m:
            assert m.mode == "L" and m.size == size
            assert set(np.unique(np.asarray(m))) <= {0, 255}
    assert len(_outputs(out)) == 2 * len(SIZES)  # nothing for notes.txt

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "prelim"
    settings = manifest["settings"]
    assert settings["concept"] == ["bird"] and settings["prompt"] == "a photo of a bird"
    assert settings["steps"] == 3 and settings["seed"] == 0 and settings["orphan_filter"] is True
    assert settings["model"] == model_identity(tiny_model_dir) and settings["dtype"] == "float32"  # the model by its content
    assert "batch_size" not in settings
    assert {k: v["status"] for k, v in manifest["images"].items()} == dict.fromkeys((n.split(".")[0] for n in NAMES), "done")
    assert manifest["counts"] == {"done": 6}
    assert "torch" in manifest["versions"]

    files = _outputs(out)
    before = {p: p.read_bytes() for p in files}
    _age(files)

    # the same run again: nothing is redone; a different batch size is not a different setting
    for extra in ([], ["--batch-size", "1"]):
        capsys.readouterr()
        assert main(_prelim_args(tiny_model_dir, image_folder, out) + extra) == 0
        assert "0 done, 6 already done" in capsys.readouterr().out
        assert all(p.stat().st_mtime_ns == OLD_NS for p in files)

    # a missing output is redone on its own
    (out / "masks" / "wide.png").unlink()
    assert main(_prelim_args(tiny_model_dir, image_folder, out)) == 0
    assert "1 done, 5 already done" in capsys.readouterr().out
    assert (out / "masks" / "wide.png").read_bytes() == before[out / "masks" / "wide.png"]
    assert (out / "attention" / "tall.npy").stat().st_mtime_ns == OLD_NS

    # --overwrite redoes everything, with identical results (the noise depends on the image only)
    _age(_outputs(out))
    assert main(_prelim_args(tiny_model_dir, image_folder, out, "--overwrite")) == 0
    assert "6 done, 0 already done" in capsys.readouterr().out
    for p in files:
        assert p.stat().st_mtime_ns != OLD_NS, p
        if p.suffix == ".png":
            assert p.read_bytes() == before[p], p
        else:
            np.testing.assert_allclose(np.load(p), np.load(io.BytesIO(before[p])), atol=1e-6, rtol=0)


def test_cli_prelim_refuses_changed_settings(tiny_model_dir, image_folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_prelim_args(tiny_model_dir, image_folder, out)) == 0
    files = _outputs(out)
    _age(files)
    manifest_before = (out / "manifest.json").read_bytes()
    capsys.readouterr()

    assert main(_prelim_args(tiny_model_dir, image_folder, out) + ["--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "(steps)" in err and "--overwrite" in err
    assert main(_prelim_args(tiny_model_dir, image_folder, out) + ["--seed", "7", "--no-orphan-filter"]) == 2
    assert "(orphan_filter, seed)" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == OLD_NS for p in files)
    assert (out / "manifest.json").read_bytes() == manifest_before

    # with --overwrite the new settings are used and recorded
    assert main(_prelim_args(tiny_model_dir, image_folder, out) + ["--steps", "2", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["steps"] == 2
    assert all(p.stat().st_mtime_ns != OLD_NS for p in files)


def test_cli_prelim_reports_corrupt_images(tiny_model_dir, make_image, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    make_image(images / "fine.png", 24, 30)
    _write_bad_images(images)
    out = tmp_path / "out"
    assert main(_prelim_args(tiny_model_dir, images, out)) == 0
    captured = capsys.readouterr()
    assert "1 done, 0 already done, 2 failed" in captured.out
    assert "garbage.png" in captured.out + captured.err
    entries = json.loads((out / "manifest.json").read_text())["images"]
    assert entries["fine"]["status"] == "done"
    assert entries["garbage"]["status"] == "failed" and "garbage.png" in entries["garbage"]["error"]
    assert entries["truncated"]["status"] == "failed" and "truncated.jpg" in entries["truncated"]["error"]
    assert [p.name for p in _outputs(out)] == ["fine.npy", "fine.png"]


def test_cli_prelim_errors(tiny_model_dir, image_folder, tmp_path, capsys) -> None:
    assert main(_prelim_args(tiny_model_dir, tmp_path / "nowhere", tmp_path / "out")) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(_prelim_args(tiny_model_dir, image_folder, tmp_path / "out") + ["--prompt", "a photo of a cat"]) == 2
    assert "'bird'" in capsys.readouterr().err
    (image_folder / "square.jpg").write_bytes((image_folder / "odd.jpg").read_bytes())
    assert main(_prelim_args(tiny_model_dir, image_folder, tmp_path / "out")) == 2
    assert "square" in capsys.readouterr().err
