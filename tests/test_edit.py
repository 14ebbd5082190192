"""The generative side as tools: `remove` (inpainted background in the mask, the rest untouched) and `composite`."""

import json

import numpy as np
import pytest
from PIL import Image

from conceptseg.cli import main
from conceptseg.cutout import fit
from conceptseg.edit import EditConfig, composite, grown, remove


def _box_mask(w, h):
    m = np.zeros((h, w), bool)
    m[h // 4 : h // 2 + 2, w // 3 : w // 2 + 3] = True
    return m


@pytest.mark.parametrize("grow", [0, 3])
def test_remove_keeps_every_pixel_outside_the_mask(tiny_model, textured, grow):
    images = [textured(50, 30, seed=1), textured(24, 40, seed=2)]
    masks = [_box_mask(50, 30), _box_mask(24, 40)]
    out = remove(tiny_model, images, masks, ["a", "b"], EditConfig(steps=2, grow=grow))
    for image, mask, result in zip(images, masks, out):
        original = np.asarray(image)
        assert result.shape == original.shape and result.dtype == np.uint8
        region = grown(mask, grow)
        np.testing.assert_array_equal(result[~region], original[~region])
        assert (result[mask] != original[mask]).any()  # the object's pixels were replaced
    assert grown(masks[0], 3).sum() > masks[0].sum()


def test_remove_command_writes_original_sizes_and_names_missing_masks(tiny_model_dir, tmp_path, make_image):
    images, masks = tmp_path / "images", tmp_path / "masks"
    make_image(images / "wide.png", 60, 20, seed=1)
    make_image(images / "tall.png", 20, 45, seed=2)
    make_image(images / "nomask.png", 20, 20, seed=3)
    masks.mkdir()
    for name, (w, h) in {"wide": (60, 20), "tall": (20, 45)}.items():
        Image.fromarray(np.where(_box_mask(w, h), 255, 0).astype(np.uint8)).save(masks / f"{name}.png")
    out = tmp_path / "out"
    assert main(["remove", "--model", str(tiny_model_dir), "--images", str(images), "--masks", str(masks), "--out", str(out),
                 "--steps", "2", "--grow", "0", "--device", "cpu"]) == 0
    result = np.asarray(Image.open(out / "removed" / "wide.png"))
    original = np.asarray(Image.open(images / "wide.png"))
    assert result.shape == original.shape
    np.testing.assert_array_equal(result[~_box_mask(60, 20)], original[~_box_mask(60, 20)])
    assert Image.open(out / "removed" / "tall.png").size == (20, 45)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["nomask"]["status"] == "failed" and "no mask" in manifest["images"]["nomask"]["error"]


def test_composite_alpha(textured):
    image = textured(40, 30, seed=4)
    mask = _box_mask(40, 30)
    background = Image.fromarray(np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8))
    fg, bg = np.asarray(image, np.float64), np.asarray(fit(background, image.size), np.float64)
    hard, alpha = composite(image, mask, background)
    np.testing.assert_array_equal(alpha, mask.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(hard)[mask], fg[mask])
    np.testing.assert_array_equal(np.asarray(hard)[~mask], bg[~mask])
    soft, alpha = composite(image, mask, background, feather=2)
    assert ((alpha > 0) & (alpha < 1)).sum() > 0 and alpha[mask].mean() > 0.5 > alpha[~mask].mean()
    expected = np.round(alpha[..., None] * fg + (1 - alpha[..., None]) * bg)
    assert np.abs(np.asarray(soft, np.float64) - expected).max() <= 1


def test_composite_command_given_or_generated_background(tiny_model_dir, tmp_path, make_image):
    images, masks = tmp_path / "images", tmp_path / "masks"
    make_image(images / "a.png", 36, 28, seed=5)
    masks.mkdir()
    mask = _box_mask(36, 28)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(masks / "a.png")
    back = tmp_path / "back.png"
    Image.new("RGB", (9, 9), (10, 200, 30)).save(back)
    given = tmp_path / "given"
    assert main(["composite", "--images", str(images / "a.png"), "--masks", str(masks), "--background", str(back),
                 "--out", str(given)]) == 0
    result = np.asarray(Image.open(given / "composites" / "a.png"))
    np.testing.assert_array_equal(result[~mask], np.broadcast_to([10, 200, 30], result[~mask].shape))
    np.testing.assert_array_equal(result[mask], np.asarray(Image.open(images / "a.png"))[mask])
    generated = tmp_path / "generated"
    assert main(["composite", "--images", str(images), "--masks", str(masks), "--model", str(tiny_model_dir), "--steps", "2",
                 "--device", "cpu", "--out", str(generated)]) == 0
    made = Image.open(generated / "backgrounds" / "a.png")
    result = np.asarray(Image.open(generated / "composites" / "a.png"))
    np.testing.assert_array_equal(result[~mask], np.asarray(fit(made, (36, 28)))[~mask])


def test_remove_and_composite_take_a_run(tiny_model_dir, tmp_path, make_image, capsys):
    """`--run RUN`: the run's best segmenter makes the masks and its fine-tuned model inpaints."""
    import torch
    from test_share import make_run

    from conceptseg.modeling.segmenter import UNet

    torch.manual_seed(0)
    run = make_run(tmp_path / "run", UNet(width=4), model_dir=tiny_model_dir)
    image = make_image(tmp_path / "images" / "a.png", 30, 20, seed=1)
    assert main(["remove", "--run", str(run), "--images", str(image), "--out", str(tmp_path / "removed"),
                 "--steps", "2", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert f"remove: segmenter {run / 'segmenter' / 'unet_real' / 'model'}" in said
    assert f"remove: model {run / 'finetune' / 'model'} (the run's fine-tuned model)" in said
    assert Image.open(tmp_path / "removed" / "removed" / "a.png").size == (30, 20)
    assert main(["composite", "--run", str(run), "--images", str(image), "--out", str(tmp_path / "comp"),
                 "--steps", "2", "--device", "cpu"]) == 0
    assert "composite: model " in capsys.readouterr().out and (tmp_path / "comp" / "composites" / "a.png").exists()
    assert main(["composite", "--images", str(image), "--out", str(tmp_path / "none")]) == 2
    assert "no masks: give --masks DIR, --segmenter SEGMENTER or --run RUN" in capsys.readouterr().err
