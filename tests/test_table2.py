"""benchmarks/table2.py: Table 2 over seeds on a tiny model, the shared stages reused, the aggregates."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conceptseg.geometry import load_mask_file

_spec = importlib.util.spec_from_file_location("table2", Path(__file__).parents[1] / "benchmarks" / "table2.py")
table2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table2)

TINY = ["prelim.steps=2", "finetune.steps=2", "refine.steps=2", "synth.num=2", "synth.steps=2", "segmenter.steps=2",
        "segmenter.width=4", "segmenter.input_size=32"]


def test_two_segmenter_seeds_share_stages_1_to_4_and_are_aggregated(tiny_model_dir, tmp_path):
    argv = ["--out", str(tmp_path / "runs"), "--world-seeds", "7", "--seg-seeds", "0", "1", "--num-images", "10",
            "--model", str(tiny_model_dir), "--device", "cpu", "--scenes", "3", "--json", str(tmp_path / "t2.json")]
    for s in TINY:
        argv += ["--set", s]
    report = table2.main(argv)
    first, second = report["runs"]
    assert (first["segmenter_seed"], second["segmenter_seed"]) == (0, 1)
    # the second seed's stages 1-4 are the first's copied and skipped: same masks, same recorded times
    for stage in ("prelim", "finetune", "refine", "synth"):
        assert second["timings_s"][stage] == first["timings_s"][stage]
    a, b = (tmp_path / "runs" / f"world7-seg{s}" / "refine" / "masks" for s in (0, 1))
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert all((load_mask_file(p) == load_mask_file(b / p.name)).all() for p in a.iterdir())
    # the segmenters were retrained with the other seed
    w0, w1 = ((tmp_path / "runs" / f"world7-seg{s}" / "segmenter" / "unet_real" / "model" / "model.safetensors").read_bytes()
              for s in (0, 1))
    assert w0 != w1
    agg = report["aggregate"]
    assert set(agg["rows"]) == {"prelim", "crop", "unet_prelim", "untuned", "refined", "unet_real", "unet_real_synth", "supervised"}
    ious = [r["rows"]["unet_real"]["iou"] for r in report["runs"]]
    assert agg["rows"]["unet_real"]["iou"]["mean"] == pytest.approx(np.mean(ious))
    assert agg["rows"]["unet_real"]["iou"]["std"] == pytest.approx(np.std(ious, ddof=1))
    assert agg["rows"]["prelim"]["iou"]["std"] == 0  # M_pre does not depend on the segmenter's seed
    assert set(agg["concept_scenes"]) == {"unet_prelim", "unet_real", "unet_real_synth", "supervised"}
    assert json.loads((tmp_path / "t2.json").read_text())["table"] == report["table"]
    # a finished folder is read back, not rerun
    again = table2.main(argv)
    assert [r["wall_s_this_call"] for r in again["runs"]] == [r["wall_s_this_call"] for r in report["runs"]]


def test_concept_scenes_hold_the_concept_and_another_object(tmp_path):
    scenes = table2.concept_scenes(tmp_path, "fish", 1234, 6)
    for paths in scenes:
        concept, other = load_mask_file(paths["concept"]), load_mask_file(paths["other"])
        assert concept.any() and other.any() and not (concept & other).any()
    again = table2.concept_scenes(tmp_path / "again", "fish", 1234, 6)  # deterministic in (world seed, k)
    assert all((tmp_path / "again" / "image" / p["image"].name).read_bytes() == p["image"].read_bytes() for p in scenes)
    assert len(again) == 6


def test_aggregate_mean_std_ratios_and_bar():
    def run(world, seed, prelim, refined, real, synth, sup):
        ious = {"prelim": prelim, "refined": refined, "unet_real": real, "unet_real_synth": synth, "supervised": sup}
        rows = {k: {"acc": 0.9, "iou": v, "miou": 0.8} for k, v in ious.items()}
        pr = {"precision": 0.5, "recall": 0.9}
        return {"world_seed": world, "segmenter_seed": seed, "rows": rows, "mask_quality": {"prelim": pr, "refined": pr},
                "concept_scenes": {}, "timings_s": {"prelim": 10.0, "segmenter/unet_real": 2.0}}

    agg = table2.aggregate([run(1, 0, 0.4, 0.6, 0.8, 0.82, 0.9), run(1, 1, 0.4, 0.6, 0.7, 0.80, 1.0)])
    assert agg["rows"]["unet_real"]["iou"]["mean"] == pytest.approx(0.75)
    assert agg["rows"]["unet_real"]["iou"]["std"] == pytest.approx(np.std([0.8, 0.7], ddof=1))
    assert agg["ratios_to_supervised"]["unet_real"]["mean"] == pytest.approx((0.8 / 0.9 + 0.7 / 1.0) / 2)
    assert agg["bar"]["M_pre < M < U-Net D_s <= U-Net D_s + D'_s"] is True
    assert agg["bar"]["unet_real_synth / supervised (mean of ratios) >= 0.85"] is True  # (0.911 + 0.8) / 2
    assert agg["bar"]["unet_real / supervised (mean of ratios) >= 0.85"] is False  # (0.889 + 0.7) / 2
    assert agg["timing"]["compute_total_s"] == pytest.approx(10 + 2 + 2)
