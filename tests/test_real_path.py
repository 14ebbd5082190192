"""The real path (issue 12): what the 64-px miniature could not show, each a regression test.

Two trainers with different mixed precision in one process; checkpoint retention; one sample
identity from reader to output (Stanford Cars' repeated file names); v-prediction targets;
missing predictions and the paper's test protocol in scoring; one definition of the settings
that change outputs; the small traps.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from conceptseg.data.readers import list_samples, read_dataset
from conceptseg.evaluate import centre_crop_view, evaluate_samples
from conceptseg.settings import output_settings


# ---------------------------------------------------------------- one Accelerator per process

def _toy_pairs(root: Path, n: int = 6) -> str:
    from conceptseg.data.toyworld import ToyWorldConfig, generate

    return str(generate(root, n, seed=0, config=ToyWorldConfig(size=32), progress=False))


def test_trainers_with_different_mixed_precision_share_one_process(tmp_path):
    """accelerate refused a second Accelerator with another mixed precision: `conceptseg run` died at
    stage 5 after a bf16 fine-tune. Each trainer now brings its own precision."""
    from conceptseg.segmenter.train import TrainSegConfig, train_segmenter

    data = _toy_pairs(tmp_path / "toy")
    common = dict(data=[data], steps=2, batch_size=2, width=4, input_size=32, checkpoint_every=2, progress=False)
    for mode in ("bf16", "no", "fp16"):
        out = train_segmenter(TrainSegConfig(out=tmp_path / mode, mixed_precision=mode, **common))
        assert (out / "model.safetensors").exists()
    # the checkpoint holds this trainer's one model, not the previous trainers' too
    state = sorted(p.name for p in (tmp_path / "no" / "checkpoints" / "step-000002" / "accelerate").iterdir())
    assert [n for n in state if n.startswith("model")] == ["model.safetensors"]
    fp16_state = json.loads((tmp_path / "fp16" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert "grad_scaler" in fp16_state  # the fp16 scaler resumes with its scale


def test_bf16_autocast_really_runs_in_bf16(tmp_path):
    from conceptseg.training import Precision

    lin = torch.nn.Linear(4, 4)
    with Precision("bf16", torch.device("cpu")).autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with Precision("no", torch.device("cpu")).autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="mixed precision"):
        Precision("fp8", torch.device("cpu"))


# ---------------------------------------------------------------- checkpoints

def test_checkpoints_are_pruned_and_a_damaged_one_is_skipped(tmp_path):
    from conceptseg.segmenter.train import TrainSegConfig, train_segmenter

    data = _toy_pairs(tmp_path / "toy")
    cfg = TrainSegConfig(data=[data], out=tmp_path / "seg", steps=6, batch_size=2, width=4, input_size=32,
                         checkpoint_every=1, checkpoints_total_limit=3, progress=False)
    train_segmenter(cfg)
    ckpts = tmp_path / "seg" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004", "step-000005", "step-000006"]
    # truncate the newest checkpoint's weights: the next run names it and resumes from the one before
    weights = ckpts / "step-000006" / "accelerate" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    import shutil

    shutil.rmtree(tmp_path / "seg" / "model")
    train_segmenter(cfg)
    assert (ckpts / "step-000006.damaged").exists()
    assert json.loads((ckpts / "step-000006" / "state.json").read_text())["step"] == 6  # redone from step 5
    assert (tmp_path / "seg" / "model" / "model.safetensors").exists()


# ---------------------------------------------------------------- one sample identity

def _cars_tree(root: Path) -> Path:
    """Stanford Cars' real layout: cars_train/00001.jpg and cars_test/00001.jpg are different cars."""
    (root / "devkit").mkdir(parents=True)
    for part, colour in (("train", (200, 30, 30)), ("test", (30, 30, 200))):
        (root / f"cars_{part}").mkdir()
        names = ["00001.jpg", "00002.jpg"]
        for i, name in enumerate(names):
            Image.new("RGB", (48 + 8 * i, 32), colour).save(root / f"cars_{part}" / name)
        annos = np.array([(5, 5, 30, 25, 1, n) for n in names],
                         dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")])
        savemat(root / "devkit" / ("cars_train_annos.mat" if part == "train" else "cars_test_annos_withlabels.mat"),
                {"annotations": annos})
    return root


def test_cars_repeated_file_names_get_distinct_outputs(tiny_model, tmp_path):
    from conceptseg.prelim import PrelimConfig, run_prelim

    root = _cars_tree(tmp_path / "cars")
    samples = list_samples(f"cars:{root}", "all")
    assert sorted(s.key for s in samples) == ["test_00001", "test_00002", "train_00001", "train_00002"]
    summary = run_prelim(tiny_model, f"cars:{root}", tmp_path / "prelim", PrelimConfig("car", steps=2), progress=False, split="all")
    assert summary["processed"] == 4
    assert sorted(p.stem for p in (tmp_path / "prelim" / "masks").iterdir()) == sorted(s.key for s in samples)
    assert Image.open(tmp_path / "prelim" / "masks" / "test_00002.png").size == (56, 32)


def test_folder_listing_recurses_and_keeps_distinct_names_distinct(tmp_path, make_image):
    make_image(tmp_path / "imgs" / "001.Albatross" / "a.jpg", 10, 8)
    make_image(tmp_path / "imgs" / "002.Gull" / "a.jpg", 10, 8)
    make_image(tmp_path / "imgs" / "café.png", 10, 8)
    make_image(tmp_path / "imgs" / "cafè.png", 10, 8)
    make_image(tmp_path / "imgs" / ".hidden" / "x.png", 10, 8)
    keys = [s.key for s in list_samples(tmp_path / "imgs")]
    assert sorted(keys) == sorted(["001.Albatross__a", "002.Gull__a", "café", "cafè"])
    assert [s.key for s in list_samples(tmp_path / "imgs" / "café.png")] == ["café"]  # one file
    assert len(list_samples(str(tmp_path / "imgs" / "*.png"))) == 2  # a glob
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_samples(tmp_path / "nowhere")


# ---------------------------------------------------------------- v-prediction

def test_min_snr_weight_has_the_v_prediction_form():
    from conceptseg.training import min_snr_weight

    abar = torch.tensor([0.9, 0.5, 0.01])
    t = torch.arange(3)
    snr = abar / (1 - abar)
    np.testing.assert_allclose(min_snr_weight(abar, t, 5.0, "v_prediction"), torch.clamp(snr, max=5) / (snr + 1), rtol=1e-6)
    np.testing.assert_allclose(min_snr_weight(abar, t, 5.0, "epsilon"), torch.clamp(snr, max=5) / snr, rtol=1e-6)


# ---------------------------------------------------------------- scoring

def _scored_folder(tmp_path: Path, width: int = 40, height: int = 10):
    images, masks, preds = tmp_path / "images", tmp_path / "masks", tmp_path / "pred"
    for d in (images, masks, preds):
        d.mkdir()
    truth = np.zeros((height, width), np.uint8)
    truth[:, width // 2 - 3 : width // 2 + 3] = 255  # a stripe in the centre
    truth[:, :4] = 255  # and one at the left edge, outside the paper's centre crop
    for name in ("a", "b"):
        Image.new("RGB", (width, height)).save(images / f"{name}.png")
        Image.fromarray(truth).save(masks / f"{name}.png")
    Image.fromarray(truth).save(preds / "a.png")  # b has no prediction
    return read_dataset(f"folder:{images},masks={masks}", "all"), preds, truth > 0


def test_a_missing_prediction_counts_as_an_empty_mask(tmp_path):
    samples, preds, truth = _scored_folder(tmp_path)
    s = evaluate_samples(preds, samples, protocol="full")["summary"]
    assert (s["evaluated"], s["missing"]) == (1, 1)
    assert s["iou"] == pytest.approx(0.5)  # a perfect and an empty prediction, pooled; dropping b would say 1.0


def test_the_paper_protocol_scores_the_centre_crop(tmp_path):
    samples, preds, truth = _scored_folder(tmp_path)
    view = centre_crop_view(truth, 128)
    assert view.shape == (128, 128) and not view[:, :10].any()  # the left stripe lies outside the crop
    (preds / "b.png").write_bytes((preds / "a.png").read_bytes())
    full = evaluate_samples(preds, samples, protocol="full")["summary"]
    paper = evaluate_samples(preds, samples, protocol="paper")["summary"]
    assert "centre crop" in paper["protocol"] and paper["iou"] == pytest.approx(1.0) and full["iou"] == pytest.approx(1.0)
    # a prediction that misses only the edge stripe is perfect under the paper's protocol
    edge_free = truth.copy()
    edge_free[:, :4] = False
    Image.fromarray(edge_free.astype(np.uint8) * 255).save(preds / "b.png")
    assert evaluate_samples(preds, samples, protocol="paper")["summary"]["iou"] == pytest.approx(1.0)
    assert evaluate_samples(preds, samples, protocol="full")["summary"]["iou"] < 0.9


# ---------------------------------------------------------------- settings that change outputs

def test_execution_settings_are_not_output_settings(tmp_path):
    from conceptseg.finetune import FinetuneConfig
    from conceptseg.refine import RefineConfig
    from conceptseg.synth import SynthConfig

    ft = FinetuneConfig("bird", images=[], prelim=tmp_path / "run" / "prelim", out=tmp_path / "run" / "finetune")
    settings = output_settings(ft, tmp_path / "run")
    for execution in ("checkpoint_every", "gradient_checkpointing", "checkpoints_total_limit", "progress"):
        assert execution not in settings
    assert settings["latent_cache"] == 0  # fixed views instead of a fresh crop and flip each step: other training data
    assert settings["prelim"] == "prelim" and settings["out"] == "finetune"  # relative to the run: a moved run keeps them
    assert settings["steps"] == 1000 and settings["mixed_precision"] == "no"
    synth = output_settings(SynthConfig("bird", num=10, refine=RefineConfig(batch_size=32)))
    assert "batch_size" not in synth["refine"] and "num" not in synth  # refine.batch_size no longer redoes D'


def test_refine_guidance_without_a_prompt_to_guide_from_is_refused():
    from conceptseg.refine import RefineConfig

    with pytest.raises(ValueError, match="concept_prompt"):
        RefineConfig(guidance=3.0)
    RefineConfig(guidance=3.0, concept_prompt="a photo of a bird")


def test_crop_baseline_takes_its_canvas_from_stage_one(tiny_model, tmp_path, make_image):
    """M_crop used --model's resolution (the 64-px toy model by default) instead of stage 1's canvas."""
    from conceptseg.prelim import PrelimConfig, run_prelim
    from conceptseg.refine import RefineConfig, prelim_geometry, run_refine

    make_image(tmp_path / "images" / "a.png", 50, 30)
    run_prelim(tiny_model, tmp_path / "images", tmp_path / "prelim", PrelimConfig("bird", steps=2), progress=False)
    assert prelim_geometry(tmp_path / "prelim") == (tiny_model.resolution, tiny_model.vae_scale_factor)
    run_refine(None, tmp_path / "images", tmp_path / "prelim", tmp_path / "crop", RefineConfig(inpainter="crop"), progress=False)
    assert Image.open(tmp_path / "crop" / "masks" / "a.png").size == (50, 30)
    with pytest.raises(FileNotFoundError, match="no geometry|missing"):
        prelim_geometry(tmp_path / "images")


def test_the_run_manifest_survives_a_machine_without_git(monkeypatch):
    import subprocess

    from conceptseg import pipeline

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert pipeline._git_commit() is None


@pytest.mark.long
def test_the_real_path_benchmark_runs_in_its_cpu_form(tmp_path):
    """benchmarks/real_path.py in its CPU form on Stanford Cars' layout (file names repeated across
    splits) with a v-prediction model: `conceptseg run` with configs/cars.yaml's settings scaled down,
    the fine-tune in bf16 autocast and the segmenters in fp32 in one process, every stage, box IoU."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "real_path.py"
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--device", "cpu", "--models", "sd21-768-like",
                           "--datasets", "cars", "--work", str(tmp_path / "work"), "--json", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["dataset"] == "cars" and result["images"] == {"train": 4, "test": 4}
    assert {"prelim", "finetune", "refine", "crop", "synth", "segmenter/unet_real", "segment/unet_real"} <= set(result["stages"])
    assert all(s["items_per_s"] and s["items_per_s"] > 0 for s in result["stages"].values())
    rows = {k: v for k, v in result["metrics"].items() if isinstance(v, dict)}
    assert {"prelim", "refined", "unet_real", "unet_real_synth"} <= set(rows)
    assert all("box_iou" in r and r["evaluated"] + r["missing"] == 4 for r in rows.values())
    masks = tmp_path / "work" / "cars-sd21-768-like" / "run" / "prelim" / "masks"
    assert sorted(p.stem for p in masks.iterdir()) == ["test_00001", "test_00002", "test_00003", "test_00004",
                                                      "train_00001", "train_00002", "train_00003", "train_00004"]
    config = json.loads((tmp_path / "work" / "cars-sd21-768-like" / "run" / "manifest.json").read_text())["config"]
    assert config["finetune"]["mixed_precision"] == "bf16" and config["segmenter"]["mixed_precision"] == "no"


@pytest.mark.long
def test_the_real_scale_check_runs_in_its_tiny_form(tmp_path):
    """benchmarks/real_scale_cpu.py with the tiny preset: a folder as the hub ships SD 1.5 (safety
    checker, feature extractor, PNDM), `conceptseg run` every stage, per-stage peak RSS beside the
    plan, the checkpoint limit kept, and a second run that rewrites nothing (the script exits non-zero
    on a broken promise)."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "real_scale_cpu.py"
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--image-size", "64", "--work", str(tmp_path / "work"),
                           "--json", str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == [] and result["images"] == {"train": 4, "test": 2}
    assert result["model"]["model_index"]["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert not result["model"]["safety_checker_built"] and result["plan"]["resolution"] == 64
    assert result["checkpoints_kept"]["finetune"] == result["checkpoints_total_limit"]["finetune"] == 1
    assert result["rerun"]["rewritten"]["outputs"] == [] and result["finetune_mixed_precision"] == "bf16"
    stages = result["stages"]
    assert all(s["peak_rss_mb"] > result["baseline_rss_mb"] for s in stages.values())
    assert all(stages[k]["plan_memory_mb"] > 0 for k in ("prelim", "finetune", "refine", "synth", "segmenter/unet_real"))
