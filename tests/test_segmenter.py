"""Stages 5 and 6: the U-Net, train-seg, segment (sizes kept, cut-outs, bad files), ONNX, evaluate."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.cli import main
from conceptseg.data.toyworld import ToyWorldConfig, generate
from conceptseg.evaluate import evaluate_predictions
from conceptseg.modeling.segmenter import UNet
from conceptseg.segmenter import load_segmenter


def test_unet_shapes_and_paper_width():
    net = UNet(width=4)
    for h, w in [(32, 32), (37, 50)]:  # odd sizes come back at the input size
        assert net(torch.randn(2, 3, h, w)).shape == (2, 1, h, w)
    paper = UNet()
    assert paper.inc[0].out_channels == 64 and paper.downs[-1][1][0].out_channels == 1024


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    data = generate(root / "toy", 24, seed=0, config=ToyWorldConfig(size=32), progress=False)
    out = root / "seg"
    args = ["train-seg", "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "4", "--width", "4",
            "--input-size", "32", "--checkpoint-every", "2"]
    assert main(args) == 0
    return data, out, args


def test_train_seg_checkpoints_validates_and_resumes(trained):
    data, out, args = trained
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert [v["step"] for v in state["validation"]] == [2, 4]
    before = (out / "checkpoints" / "step-000004" / "state.json").stat().st_mtime_ns
    assert main(args[:6] + ["6"] + args[7:]) == 0  # --steps 6: resumes at step 4
    assert json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())["step"] == 6
    assert (out / "checkpoints" / "step-000004" / "state.json").stat().st_mtime_ns == before
    # checkpoints_total_limit (default 2): the oldest is pruned; the model is exported once, outside them
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert not any((c / "model").exists() for c in (out / "checkpoints").iterdir())


def test_segment_keeps_sizes_writes_cutouts_and_skips_bad_files(trained, tmp_path, make_image):
    _, out, _ = trained
    images = tmp_path / "images"
    make_image(images / "wide.png", 70, 20)
    make_image(images / "grey.png", 15, 40, mode="L")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dest = tmp_path / "out"
    assert main(["segment", "--segmenter", str(out / "model"), "--images", str(images), "--out", str(dest), "--cutout"]) == 0
    assert Image.open(dest / "masks" / "wide.png").size == (70, 20)
    cut = Image.open(dest / "cutouts" / "grey.png")
    assert cut.size == (15, 40) and cut.mode == "RGBA"
    mask = np.asarray(Image.open(dest / "masks" / "grey.png")) > 127
    np.testing.assert_array_equal(np.asarray(cut)[..., 3] > 0, mask)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["images"]["broken"]["status"] == "failed"


def test_onnx_matches_torch(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from conceptseg.segmenter.predict import export_onnx

    diff = export_onnx(load_segmenter(trained[1] / "model"), tmp_path / "seg.onnx")
    assert diff < 1e-4


def test_evaluate_pools_pixels_and_scores_boxes(tmp_path):
    images, masks, preds = tmp_path / "images", tmp_path / "masks", tmp_path / "pred"
    for d in (images, masks, preds):
        d.mkdir()
    truth = np.zeros((10, 10), np.uint8)
    truth[2:6, 2:6] = 255  # 16 px
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 2:4] = 255  # 8 px inside the truth
    for name in ("a", "b"):
        Image.new("RGB", (10, 10)).save(images / f"{name}.png")
        Image.fromarray(truth).save(masks / f"{name}.png")
    Image.fromarray(pred).save(preds / "a.png")
    Image.fromarray(truth).save(preds / "b.png")
    report = evaluate_predictions(preds, f"folder:{images},masks={masks}", "all", protocol="full")
    s = report["summary"]
    assert s["evaluated"] == 2 and s["missing"] == 0 and "whole image" in s["protocol"]
    assert s["iou"] == pytest.approx(24 / 32)  # pooled: (8 + 16) / (16 + 16), not the mean of 0.5 and 1.0
    assert s["acc"] == pytest.approx((200 - 8) / 200)
    assert report["per_image"]["a"]["iou"] == pytest.approx(0.5)


def test_lr_schedule_constant_is_the_paper_and_cosine_decays(trained, tmp_path):
    from safetensors.torch import load_file

    from conceptseg.segmenter.train import LR_SCHEDULES, TrainSegConfig, train_segmenter

    assert LR_SCHEDULES["constant"](7, 10) == 1.0
    assert LR_SCHEDULES["cosine"](0, 10) == 1.0 and LR_SCHEDULES["cosine"](5, 10) == pytest.approx(0.5)
    assert LR_SCHEDULES["cosine"](9, 10) < 0.03
    data = trained[0]

    def weights(schedule: str, steps: int) -> dict:
        cfg = TrainSegConfig(data=[str(data)], out=tmp_path / f"{schedule}{steps}", steps=steps, batch_size=4, width=4,
                             input_size=32, lr_schedule=schedule, progress=False)
        return load_file(train_segmenter(cfg) / "model.safetensors")

    # the first step runs at the base rate under both; later steps do not
    one_constant, one_cosine = weights("constant", 1), weights("cosine", 1)
    for name, tensor in one_constant.items():
        torch.testing.assert_close(tensor, one_cosine[name])
    constant, cosine = weights("constant", 3), weights("cosine", 3)
    assert any(not torch.allclose(constant[k], cosine[k]) for k in constant)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainSegConfig(data=[], out=tmp_path, lr_schedule="step")


def test_segment_runs_the_net_on_the_short_side_resized_image_without_grey_bars():
    """Prediction uses train-seg's geometry: short side to input_size, whole image, edge padding to a
    multiple of 16, no letterbox. A 160x32 image at input size 32 is the network's input as it is."""
    from conceptseg.segmenter.predict import Segmenter

    torch.manual_seed(0)
    net = UNet(width=4).eval()
    seg = Segmenter(net, input_size=32)
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (32, 160, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(wide).permute(2, 0, 1)[None].float() / 127.5 - 1))[0, 0].numpy()
    np.testing.assert_allclose(seg.probabilities([Image.fromarray(wide)])[0], expected, atol=1e-5)
    # a width that is no multiple of 16: edge-replicated padding, cropped back; the result has the original size
    odd = wide[:, :150]
    padded = np.pad(odd, ((0, 0), (0, 10), (0, 0)), mode="edge")
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1))[0, 0, :, :150].numpy()
    np.testing.assert_allclose(seg.probabilities([Image.fromarray(odd)])[0], expected, atol=1e-5)
    # twice the size: the short side is resized to 32 and the probabilities come back at 320x64
    big = Image.fromarray(wide).resize((320, 64), Image.Resampling.BICUBIC)
    p = seg.probabilities([big, Image.fromarray(odd)])
    assert p[0].shape == (64, 320) and p[1].shape == (32, 150)


def test_a_cosine_run_refuses_a_checkpoint_made_for_another_number_of_steps(trained, tmp_path):
    """The cosine rate at a step depends on `steps`: grown steps cannot continue that schedule."""
    data, _, _ = trained
    args = ["train-seg", "--data", str(data), "--out", str(tmp_path / "cos"), "--batch-size", "4", "--width", "4",
            "--input-size", "32", "--checkpoint-every", "2", "--lr-schedule", "cosine", "--steps"]
    assert main(args + ["2"]) == 0
    with pytest.raises(ValueError, match="schedule_steps: 2 there, 4 now"):  # training.CheckpointMismatch
        from conceptseg.segmenter.train import TrainSegConfig, train_segmenter

        train_segmenter(TrainSegConfig(data=[str(data)], out=tmp_path / "cos", steps=4, batch_size=4, width=4, input_size=32,
                                       checkpoint_every=2, lr_schedule="cosine", progress=False))
