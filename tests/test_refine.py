"""Stage 3: the RePaint-style sampler, the refinement formula, M_crop, and the refine command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.cli import main
from conceptseg.geometry import Canvas
from conceptseg.inpaint import inpaint_background, sample_latents
from conceptseg.refine import (
    RefineConfig,
    Refiner,
    crop_inpaint,
    difference_map,
    latent_mask,
    upsample,
)
from conceptseg.thresholding import orphan_filter


def test_known_region_is_the_renoised_original_at_every_step(tiny_model):
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    region = torch.zeros(2, 16, 16)
    region[:, 4:10, 3:12] = 1
    trace = []
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    out = inpaint_background(tiny_model, z0, region, steps=6, generator=gens, trace=trace)
    assert len(trace) == 6
    abar = tiny_model.scheduler.alphas_cumprod
    replay = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    for g in replay:  # the first draws are the initial noise
        torch.randn(4, 16, 16, generator=g)
    known = (region == 0)[:, None].expand_as(z0)
    for t, z in trace:
        eps = torch.stack([torch.randn(4, 16, 16, generator=g) for g in replay])
        expected = abar[t].sqrt() * z0 + (1 - abar[t]).sqrt() * eps
        torch.testing.assert_close(z[known], expected[known], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[known], z0[known])  # at the end the background is the original exactly
    assert (out[~known] - z0[~known]).abs().mean() > 0.1  # the region was regenerated


def test_noise_per_image_does_not_depend_on_batching(tiny_model):
    z0 = torch.randn(3, 4, 16, 16)
    region = torch.zeros(3, 16, 16)
    region[:, 5:11, 5:11] = 1
    together = inpaint_background(tiny_model, z0, region, steps=3, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    alone = inpaint_background(tiny_model, z0[1:2], region[1:2], steps=3, generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


def test_guidance_variant_and_fast_sampler_run(tiny_model):
    z0 = torch.randn(1, 4, 16, 16)
    region = torch.ones(1, 16, 16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = inpaint_background(tiny_model, z0, region, steps=3, generator=g())
    guided = inpaint_background(tiny_model, z0, region, steps=3, guidance=3.0, negative_prompt="a photo of a bird", generator=g())
    assert not torch.allclose(plain, guided)
    assert sample_latents(tiny_model, "a photo of a bird", 2, steps=3, sampler="dpm++", generator=g()).shape == (2, 4, 16, 16)
    # plain sampling guides against the empty prompt: guidance must change the sample
    unguided = sample_latents(tiny_model, "a photo of a bird", 1, steps=3, generator=g())
    assert not torch.allclose(unguided, sample_latents(tiny_model, "a photo of a bird", 1, steps=3, guidance=3.0, generator=g()))
    with pytest.raises(ValueError, match="unknown sampler"):
        inpaint_background(tiny_model, z0, region, sampler="euler-x")


def test_refinement_formula_on_hand_made_arrays(monkeypatch):
    # 32x32 canvas, factor 8 -> 4x4 latent grid. M_pre covers the left half; the object is a 8x8 square
    # inside it; the "inpainted background" equals the image except on that square.
    image = np.full((32, 32, 3), 100, np.uint8)
    image[8:16, 0:8] = 250
    background = np.full((32, 32, 3), 100, np.uint8)
    prelim = np.zeros((32, 32), bool)
    prelim[:, :16] = True
    refiner = Refiner(None, RefineConfig(inpainter="crop"), resolution=32, factor=8)
    monkeypatch.setattr("conceptseg.refine.crop_inpaint", lambda pixels, region: background)
    res = refiner([Image.fromarray(image)], [prelim], ["x"])[0]
    changed = np.zeros((32, 32), bool)
    changed[8:16, 0:8] = True
    # up(M_pre) * g(|x - x_bg|): g is the GMM threshold then the 3x3 majority vote, which trims corners
    np.testing.assert_array_equal(res.mask, orphan_filter(changed) & prelim)
    assert res.mask.sum() == 62  # the 8x8 square less its two inner corners
    np.testing.assert_allclose(res.difference[8:16, 0:8], 150)
    assert res.difference[20:, 20:].max() == 0


def test_refined_mask_never_leaves_prelim_and_keeps_the_original_size(tiny_model, textured):
    refiner = Refiner(tiny_model, RefineConfig(steps=3))
    images = [textured(45, 30, seed=1), textured(20, 50, seed=2)]
    prelims = []
    for im in images:
        m = np.zeros((im.height, im.width), bool)
        m[im.height // 4 : 3 * im.height // 4, im.width // 4 : 3 * im.width // 4] = True
        prelims.append(m)
    for im, pre, res in zip(images, prelims, refiner(images, prelims, ["a", "b"])):
        assert res.mask.shape == (im.height, im.width) and res.background.shape == (im.height, im.width, 3)
        canvas = Canvas(im.width, im.height, 32)
        f = tiny_model.vae_scale_factor
        allowed = canvas.restore(upsample(latent_mask(pre, canvas, f), f))
        assert not (res.mask & ~allowed).any()


def test_crop_inpaint_mirrors_the_largest_background_strip():
    image = np.zeros((10, 10, 3), np.uint8)
    image[:, :, 0] = np.arange(10)[None, :]  # value = column
    region = np.zeros((10, 10), bool)
    region[3:6, 7:9] = True  # largest strip: left of column 7
    filled = crop_inpaint(image, region)
    np.testing.assert_array_equal(filled[~region], image[~region])
    assert filled[4, 7, 0] == 6 and filled[4, 8, 0] == 5  # mirrored across the box's left edge


def test_refine_cli_runs_resumes_and_reports_bad_images(tiny_model_dir, tmp_path, make_image):
    images = tmp_path / "images"
    make_image(images / "a.png", 40, 30)
    make_image(images / "b.png", 24, 48, seed=3)
    (images / "bad.png").write_bytes(b"not a png")
    prelim = tmp_path / "prelim"
    args = ["prelim", "--model", str(tiny_model_dir), "--concept", "bird", "--images", str(images), "--out", str(prelim),
            "--steps", "2", "--device", "cpu"]
    assert main(args) == 0
    out = tmp_path / "refine"
    args = ["refine", "--model", str(tiny_model_dir), "--images", str(images), "--prelim", str(prelim), "--out", str(out),
            "--inpaint-steps", "3", "--device", "cpu"]
    assert main(args) == 0
    for stem, size in [("a", (40, 30)), ("b", (24, 48))]:
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(out / "background" / f"{stem}.png").size == size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["bad"]["status"] == "failed" and "bad.png" in manifest["images"]["bad"]["error"]
    before = (out / "masks" / "a.png").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "masks" / "a.png").stat().st_mtime_ns == before
    assert main(args[:-2] + ["--samples", "2", "--device", "cpu"]) == 2  # other settings: refused without --overwrite
    assert main(args + ["--inpainter", "crop", "--overwrite"]) == 0


def test_difference_to_image_or_reconstruction(tiny_model, textured):
    """The paper compares x_bg with the image x; the option compares it with the VAE's decoding of x,
    so the VAE's own reconstruction error is not taken for foreground."""
    image = textured(32, 32, seed=5)  # the tiny model's canvas size: no resizing anywhere
    prelim = np.zeros((32, 32), bool)
    prelim[:8, :8] = True
    x = np.asarray(image).astype(np.float32)
    recon_x = tiny_model.decode_latents(tiny_model.encode_images(np.asarray(image)[None]))[0].astype(np.float32)
    paper = Refiner(tiny_model, RefineConfig(steps=2))([image], [prelim], ["k"])[0]
    recon = Refiner(tiny_model, RefineConfig(steps=2, difference_to="reconstruction"))([image], [prelim], ["k"])[0]
    np.testing.assert_array_equal(paper.background, recon.background)  # same inpainting, only the reference differs
    bg = paper.background.astype(np.float32)
    np.testing.assert_allclose(paper.difference, np.abs(x - bg).mean(-1), atol=1e-4)
    np.testing.assert_allclose(recon.difference, np.abs(recon_x - bg).mean(-1), atol=1e-4)
    assert np.abs(paper.difference - recon.difference).max() > 1
    with pytest.raises(ValueError, match="difference_to"):
        RefineConfig(difference_to="other")


def test_overlay_pastes_the_image_back_outside_the_region(tiny_model, textured):
    """The paper compares the whole decoding with x; `overlay` keeps the decoding inside M_pre's region
    only, so what the VAE decoder changes outside it does not count as difference."""
    image = textured(32, 32, seed=6)
    prelim = np.zeros((32, 32), bool)
    prelim[:8, :8] = True  # on the latent grid: the region is exactly these pixels
    x = np.asarray(image)
    paper = Refiner(tiny_model, RefineConfig(steps=2))([image], [prelim], ["k"])[0]
    pasted = Refiner(tiny_model, RefineConfig(steps=2, overlay=True))([image], [prelim], ["k"])[0]
    np.testing.assert_array_equal(pasted.background[prelim], paper.background[prelim])  # the same inpainting
    np.testing.assert_array_equal(pasted.background[~prelim], x[~prelim])
    assert pasted.difference[~prelim].max() == 0 and paper.difference[~prelim].max() > 1


def test_local_stats_difference_ignores_a_texture_swapped_for_a_like_one():
    """Per-pixel colour difference sees one noise texture replaced by another of the same statistics as
    a change everywhere; the local mean/std difference sees it only where the statistics change."""
    rng = np.random.default_rng(0)
    x = rng.normal(100, 20, (2, 32, 32, 3))
    bg = rng.normal(100, 20, (2, 32, 32, 3))  # "another plausible texture"
    bg[:, 10:20, 10:20] = 220  # and a real change: an object's region filled with something else
    color, local = difference_map(x, bg, "color"), difference_map(x, bg, "local_stats", window=5)
    assert color.shape == local.shape == (2, 32, 32)
    outside, inside = (slice(None), slice(0, 6), slice(0, 6)), (slice(None), slice(13, 17), slice(13, 17))
    assert color[outside].mean() > 0.15 * color[inside].mean()  # the texture swap looks like a change
    assert local[outside].mean() < 0.1 * local[inside].mean()  # here it does not
    np.testing.assert_allclose(color, np.abs(x - bg).mean(-1), rtol=1e-5)
    with pytest.raises(ValueError, match="difference"):
        RefineConfig(difference="other")


def test_added_refine_settings_leave_old_fingerprints_unless_set():
    """`difference` and `window` were added after runs were made: at their defaults they are not in the
    settings that fingerprint a stage, so finished runs are not redone; set, they are."""
    from conceptseg.settings import output_settings

    assert "difference" not in output_settings(RefineConfig()) and "window" not in output_settings(RefineConfig())
    assert output_settings(RefineConfig(difference="local_stats"))["difference"] == "local_stats"
    assert output_settings(RefineConfig(window=7))["window"] == 7
    assert "aggregate" not in output_settings(RefineConfig()) and output_settings(RefineConfig(aggregate="min"))["aggregate"] == "min"


def test_min_over_samples_keeps_only_what_every_inpainting_changes(tiny_model, textured):
    """aggregate="min": the difference map is the smallest over the K inpaintings' maps."""
    image = textured(32, 32, seed=3)
    prelim = np.zeros((32, 32), bool)
    prelim[4:20, 4:20] = True
    one = [Refiner(tiny_model, RefineConfig(steps=2, seed=0))([image], [prelim], ["k"])[0].difference]
    both = Refiner(tiny_model, RefineConfig(steps=2, samples=2, aggregate="min"))([image], [prelim], ["k"])[0]
    mean = Refiner(tiny_model, RefineConfig(steps=2, samples=2))([image], [prelim], ["k"])[0]
    assert (both.difference <= one[0] + 1e-5).all() and (both.difference <= mean.difference + 1e-5).all()
    assert (both.difference < mean.difference - 1e-3).any()
    with pytest.raises(ValueError, match="aggregate"):
        RefineConfig(aggregate="max")
