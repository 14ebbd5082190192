"""Sharing a segmenter: save_pretrained / from_pretrained (huggingface_hub's mixin), old folders, the model card, push."""

from dataclasses import asdict

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from conceptseg.cli import main
from conceptseg.io import write_json
from conceptseg.modeling.segmenter import SegmenterNet, UNet
from conceptseg.pipeline import RunConfig
from conceptseg.segmenter import load_segmenter
from conceptseg.segmenter.predict import Segmenter, save_segmenter


@pytest.fixture
def net():
    torch.manual_seed(0)
    return UNet(width=4).eval()


def _same_outputs(a: Segmenter, b: Segmenter, textured) -> None:
    images = [textured(40, 24, seed=1), textured(20, 33, seed=2)]
    for x, y in zip(a.probabilities(images), b.probabilities(images)):
        np.testing.assert_array_equal(x, y)


def test_save_pretrained_from_pretrained_roundtrip(net, tmp_path, textured):
    seg = Segmenter(net, input_size=32)
    folder = seg.save_pretrained(tmp_path / "seg")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = Segmenter.from_pretrained(folder)
    assert isinstance(again.net, SegmenterNet) and again.input_size == 32
    for k, v in net.state_dict().items():
        torch.testing.assert_close(again.net.state_dict()[k], v, rtol=0, atol=0)
    _same_outputs(seg, again, textured)
    # the mixin's own entry point loads it too
    assert SegmenterNet.from_pretrained(str(folder)).input_size == 32


def test_old_segmenter_folders_still_load_and_bad_weights_are_refused(net, tmp_path, textured):
    old = tmp_path / "old"  # what train-seg wrote before the mixin: save_file + config.json
    old.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, old / "model.safetensors")
    write_json(old / "config.json", {**net.config, "input_size": 32, "architecture": "milesial-unet"})
    _same_outputs(Segmenter(net, 32), load_segmenter(old), textured)
    wrong = tmp_path / "wrong"
    save_segmenter(UNet(width=8), wrong, 32)
    write_json(wrong / "config.json", {**net.config, "input_size": 32, "architecture": "milesial-unet"})  # width 4, weights width 8
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_segmenter(wrong)
    with pytest.raises(FileNotFoundError, match="not a segmenter folder"):
        load_segmenter(tmp_path)


def _fake_run(root, net):
    cfg = RunConfig(concept=["fish"], images="imagefolder:data/toy", test_images="imagefolder:data/toy", out=str(root))
    cfg.synth.num = 0
    write_json(root / "manifest.json", {"config": asdict(cfg), "versions": {"conceptseg": "0.1.0", "torch": "2.13.0"},
                                        "git_commit": "abc123", "counts": {"images": {"train": 321, "test": 79}}})
    write_json(root / "metrics.json", {"prelim": {"acc": 0.954, "iou": 0.428, "miou": 0.69},
                                       "unet_real": {"acc": 0.989, "iou": 0.763, "miou": 0.876}})
    save_segmenter(net, root / "segmenter" / "unet_real" / "model", 32)
    write_json(root / "segmenter" / "unet_real" / "train_config.json", {"steps": 300, "width": 4, "input_size": 32, "lr": 0.002})


def make_run(root, net, scores=None, model_dir=None):
    """A run folder as `conceptseg run` lays it out (stages.json, manifest.json, metrics.json,
    segmenter/<row>/model, finetune/model), with `scores` as each segmenter row's IoU."""
    import shutil

    scores = {"unet_real": 0.763, "unet_real_synth": 0.70, "supervised": 0.91} if scores is None else scores
    _fake_run(root, net)
    write_json(root / "stages.json", {"prelim": "0" * 16})
    write_json(root / "metrics.json", {"protocol": "paper", **{r: {"acc": 0.9, "iou": v, "miou": 0.8} for r, v in scores.items()}})
    for row in scores:
        save_segmenter(net, root / "segmenter" / row / "model", 32)
    write_json(root / "prelim" / "manifest.json", {"stage": "prelim", "settings": {}, "images": {}})
    if model_dir is not None:
        shutil.copytree(model_dir, root / "finetune" / "model")
    return root


def test_share_picks_the_best_scored_segmenter_or_the_stage_folder_given(net, tmp_path, capsys):
    run = make_run(tmp_path / "run", net)
    assert main(["share", "--run", str(run), "--out", str(tmp_path / "best")]) == 0
    said = capsys.readouterr().out
    # unet_real (IoU 76.3) beats unet_real_synth (70.0), which the report would show; supervised is not the method's
    assert f"segmenter {run / 'segmenter' / 'unet_real' / 'model'}" in said and "IoU 76.3" in said and "saved unet_real " in said
    assert "\"U-Net on D_s\" of the table" in (tmp_path / "best" / "README.md").read_text()
    assert main(["share", "--run", str(run / "segmenter" / "unet_real_synth"), "--out", str(tmp_path / "synth")]) == 0
    assert "saved unet_real_synth " in capsys.readouterr().out
    assert "\"U-Net on D_s + D'_s\" of the table" in (tmp_path / "synth" / "README.md").read_text()
    assert main(["share", "--run", str(run), "--row", "supervised", "--out", str(tmp_path / "sup")]) == 0
    assert main(["share", "--run", str(run), "--row", "unet_prelim", "--out", str(tmp_path / "none")]) == 2
    assert "run " + str(run) + " has these segmenters: supervised, unet_real, unet_real_synth" in capsys.readouterr().err


def test_share_writes_a_model_card_from_the_run(net, tmp_path, textured):
    run, out = tmp_path / "run", tmp_path / "shared"
    _fake_run(run, net)
    assert main(["share", "--run", str(run), "--out", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "conceptseg" and "fish" in card.data.tags
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"acc": 98.9, "iou": 76.3, "miou": 87.6}
    text = card.text
    assert "| U-Net on D_s | 98.9 | 76.3 | 87.6 |" in text and "| preliminary masks M_pre | 95.4 | 42.8 | 69.0 |" in text
    assert "embedded:toy" in text and "321 images" in text and "lr: 0.002" in text and "concept:\n- fish" in text
    _same_outputs(Segmenter(net, 32), load_segmenter(out), textured)
    assert main(["share", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # not a run folder


def test_push_to_hub_uploads_the_saved_folder(net, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = Segmenter(net, 32).push_to_hub("me/fish-seg", model_card="---\nlibrary_name: conceptseg\n---\nhello", private=True)
    assert url.endswith("/commit/1") and calls["create"] == ("me/fish-seg", True, True)
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"] and calls["card"].endswith("hello")
