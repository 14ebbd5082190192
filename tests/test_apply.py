"""`conceptseg segment` as a tool: file / folder / glob inputs, each output kind, threshold, COCO RLE, ONNX."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.cli import main
from conceptseg.modeling.segmenter import UNet
from conceptseg.segmenter.predict import load_segmenter, save_segmenter


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("seg") / "model"
    save_segmenter(UNet(width=4), out, input_size=32)
    return out


@pytest.fixture
def photos(tmp_path, make_image):
    d = tmp_path / "photos"
    make_image(d / "a.png", 48, 32, seed=1)
    make_image(d / "b.png", 30, 41, seed=2)
    make_image(d / "c.jpg", 40, 40, seed=3)
    return d


def _masks(folder):
    return sorted(p.name for p in (folder / "masks").glob("*.png"))


def test_segment_takes_a_file_a_folder_or_a_glob(segmenter_dir, photos, tmp_path):
    seg = ["segment", "--segmenter", str(segmenter_dir)]
    assert main(seg + ["--images", str(photos / "b.png"), "--out", str(tmp_path / "one")]) == 0
    assert _masks(tmp_path / "one") == ["b.png"]
    assert main(seg + ["--images", str(photos), "--out", str(tmp_path / "all")]) == 0
    assert _masks(tmp_path / "all") == ["a.png", "b.png", "c.png"]
    assert main(seg + ["--images", str(photos / "*.png"), "--out", str(tmp_path / "glob")]) == 0
    assert _masks(tmp_path / "glob") == ["a.png", "b.png"]
    assert main(seg + ["--images", str(photos / "*.gif"), "--out", str(tmp_path / "none")]) == 2
    assert main(seg + ["--images", str(photos / "missing.png"), "--out", str(tmp_path / "none")]) == 2


def test_each_output_kind(segmenter_dir, photos, tmp_path):
    back = tmp_path / "back.png"
    Image.new("RGB", (10, 5), (0, 0, 255)).save(back)
    out = tmp_path / "out"
    assert main(["segment", "--segmenter", str(segmenter_dir), "--images", str(photos / "a.png"), "--out", str(out),
                 "--output", "mask", "rgba", "color", "background", "--color", "#00ff00", "--background", str(back)]) == 0
    image = np.asarray(Image.open(photos / "a.png").convert("RGB"))
    raw = np.asarray(Image.open(out / "masks" / "a.png"))
    assert raw.shape == (32, 48) and set(np.unique(raw)) <= {0, 255}
    mask = raw == 255
    assert 0 < mask.sum() < mask.size  # random weights: some of each, so both branches are checked
    rgba = np.asarray(Image.open(out / "cutouts" / "a.png"))
    np.testing.assert_array_equal(rgba[..., 3], raw)
    np.testing.assert_array_equal(rgba[..., :3][mask], image[mask])
    on_color = np.asarray(Image.open(out / "on_color" / "a.png"))
    np.testing.assert_array_equal(on_color[~mask], np.broadcast_to([0, 255, 0], on_color[~mask].shape))
    np.testing.assert_array_equal(on_color[mask], image[mask])
    on_back = np.asarray(Image.open(out / "on_background" / "a.png"))
    assert on_back.shape == image.shape
    np.testing.assert_array_equal(on_back[~mask], np.broadcast_to([0, 0, 255], on_back[~mask].shape))
    np.testing.assert_array_equal(on_back[mask], image[mask])
    # a background output without a background picture is one clear error
    assert main(["segment", "--segmenter", str(segmenter_dir), "--images", str(photos), "--out", str(tmp_path / "x"),
                 "--output", "background"]) == 2


def test_threshold_moves_the_masks(segmenter_dir, photos):
    image = Image.open(photos / "a.png")
    probs = load_segmenter(segmenter_dir).probabilities([image])[0]
    for t in (0.3, 0.5, 0.7):
        np.testing.assert_array_equal(load_segmenter(segmenter_dir, threshold=t).masks([image])[0], probs > t)
    assert load_segmenter(segmenter_dir, threshold=0.0).masks([image])[0].all()


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_coco_rle_decodes_back_to_the_masks(segmenter_dir, photos, tmp_path):
    mask_api = pytest.importorskip("pycocotools.mask")
    from conceptseg import coco_rle

    out = tmp_path / "out"
    assert main(["segment", "--segmenter", str(segmenter_dir), "--images", str(photos), "--out", str(out), "--rle"]) == 0
    rows = json.loads((out / "masks_coco_rle.json").read_text())
    assert [r["image_id"] for r in rows] == ["a", "b", "c"]
    for row in rows:
        mask = np.asarray(Image.open(out / "masks" / f"{row['image_id']}.png")) == 255
        seg = row["segmentation"]
        assert seg["size"] == list(mask.shape)
        decoded = mask_api.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
        np.testing.assert_array_equal(coco_rle.decode(seg), mask)
    odd = np.zeros((5, 7), bool)
    odd[1:4, 2] = True
    np.testing.assert_array_equal(coco_rle.decode(coco_rle.encode(odd)), odd)


def test_onnx_segmenter_matches_torch_and_picks_providers(segmenter_dir, photos, tmp_path):
    pytest.importorskip("onnxruntime")
    from conceptseg.segmenter.predict import OnnxSegmenter, onnx_providers

    onnx_path = tmp_path / "seg.onnx"
    assert main(["export-onnx", "--segmenter", str(segmenter_dir), "--out", str(onnx_path)]) == 0
    images = [Image.open(p) for p in sorted(photos.iterdir())]
    expected = load_segmenter(segmenter_dir).probabilities(images)
    seg = load_segmenter(onnx_path, provider="cpu")
    assert isinstance(seg, OnnxSegmenter) and seg.input_size == 32 and seg.provider == "CPUExecutionProvider"
    for got, want in zip(seg.probabilities(images), expected):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert "CPUExecutionProvider" in onnx_providers("auto")
    with pytest.raises(ValueError, match="not available here"):
        onnx_providers("nosuchprovider")
    out = tmp_path / "out"
    assert main(["segment", "--segmenter", str(onnx_path), "--provider", "auto", "--images", str(photos), "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "b.png")) == 255, expected[1] > 0.5)


def test_segment_takes_a_run_or_any_folder_of_its_segmenter_stage(photos, tmp_path, capsys):
    from test_share import make_run

    torch.manual_seed(0)
    run = make_run(tmp_path / "run", UNet(width=4))
    best = run / "segmenter" / "unet_real" / "model"
    for how in (["--run", str(run)], ["--segmenter", str(run)], ["--segmenter", str(run / "segmenter")]):
        assert main(["segment", *how, "--images", str(photos / "a.png"), "--out", str(tmp_path / "o" / how[0] / str(len(how[1])))]) == 0
        said = capsys.readouterr().out
        assert f"segment: segmenter {best} (U-Net on D_s, the run's best: IoU 76.3" in said, said
    stage = run / "segmenter" / "unet_real_synth"
    assert main(["segment", "--segmenter", str(stage), "--images", str(photos / "a.png"), "--out", str(tmp_path / "stage")]) == 0
    assert f"segmenter {stage / 'model'} (the model of stage folder {stage})" in capsys.readouterr().out
    assert main(["segment", "--run", str(stage), "--images", str(photos / "a.png"), "--out", str(tmp_path / "stage2")]) == 0
    assert f"segmenter {stage / 'model'}" in capsys.readouterr().out
    assert _masks(tmp_path / "stage") == ["a.png"]
    # a folder of the run that holds no segmenter, and a folder in no run: one line naming what to pass
    assert main(["segment", "--segmenter", str(run / "prelim"), "--images", str(photos), "--out", str(tmp_path / "x")]) == 2
    assert f"is a folder of run {run} but holds no segmenter" in capsys.readouterr().err
    assert main(["segment", "--run", str(photos), "--images", str(photos), "--out", str(tmp_path / "x")]) == 2
    assert "is not a run folder nor inside one" in capsys.readouterr().err
    assert main(["export-onnx", "--segmenter", str(stage), "--out", str(tmp_path / "s.onnx"), "--no-check"]) == 0


def test_best_row_reads_the_runs_scores(tmp_path):
    import shutil

    from test_share import make_run

    from conceptseg.runs import best_row, pick_model, resolve_model

    run = make_run(tmp_path / "tie", UNet(width=4), {"unet_real": 0.7, "unet_real_synth": 0.7, "unet_prelim": 0.5})
    assert best_row(run)[0] == "unet_real_synth"  # a tie: the row the run's report shows
    (run / "metrics.json").unlink()
    assert best_row(run) == ("unet_real_synth", "U-Net on D_s + D'_s; the run has no scores, so the segmenter its report shows")
    only_sup = make_run(tmp_path / "sup", UNet(width=4), {"supervised": 0.9})
    shutil.rmtree(only_sup / "segmenter" / "unet_real")
    with pytest.raises(FileNotFoundError, match="no trained segmenter of the method"):
        best_row(only_sup)
    with pytest.raises(FileNotFoundError, match="has no fine-tuned model yet"):
        pick_model(run)
    assert resolve_model(None).source is None and resolve_model("user/sd").source == "user/sd"
