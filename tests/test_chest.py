"""The chest world: deterministic rows, exact per-finding masks and boxes, reports with negations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conceptseg.cli import main
from conceptseg.data.chest import (FINDINGS, NEGATIONS, ChestWorldConfig, Finding, _finding_list, generate, render_chest,
                                   write_report)
from conceptseg.data.imagefolder import read_imagefolder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("chest") / "data", 24, seed=3, progress=False)


def _rows(root):
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def test_layout_and_fields(world) -> None:
    rows = _rows(world)
    assert len(rows) == 24
    assert {r["split"] for r in rows} == {"train", "test"}
    assert any(not r["findings"] for r in rows) and any(len(r["findings"]) > 1 for r in rows)
    for r in rows:
        im = Image.open(world / r["file_name"])
        assert im.mode == "L" and im.size == (64, 64)
        assert [f["finding"] for f in r["findings"]] == r["classes"]
        assert r["object_mask_file_names"] == [f["mask_file_name"] for f in r["findings"]]
        union = np.zeros((64, 64), bool)
        for f in r["findings"]:
            m = np.asarray(Image.open(world / f["mask_file_name"])) > 127
            assert m.any(), f
            ys, xs = np.nonzero(m)
            assert f["box"] == [xs.min(), ys.min(), xs.max(), ys.max()]  # the mask's tight box
            union |= m
        assert np.array_equal(np.asarray(Image.open(world / r["mask_file_name"])) > 127, union)
    # the project's imagefolder reader takes it: reports as captions, finding names as classes
    read = read_imagefolder(world, "test")
    assert read and all(row.caption for row in read)


def test_deterministic_resumable_and_worker_independent(world, tmp_path) -> None:
    again = generate(tmp_path / "a", 24, seed=3, progress=False, workers=2)
    assert (again / "metadata.jsonl").read_bytes() == (world / "metadata.jsonl").read_bytes()
    for r in _rows(world):
        for name in [r["file_name"], *r["object_mask_file_names"]]:
            assert (again / name).read_bytes() == (world / name).read_bytes(), name
    other = generate(tmp_path / "b", 6, seed=4, progress=False)
    assert (other / "images/00000.png").read_bytes() != (world / "images/00000.png").read_bytes()
    # a resumed, extended run keeps the first rows and adds new ones
    (again / "images/00001.png").unlink()
    generate(again, 26, seed=3, progress=False)
    assert (again / "images/00001.png").read_bytes() == (world / "images/00001.png").read_bytes()
    assert len(_rows(again)) == 26 and _rows(again)[:24] == _rows(world)


def _healthy_and_sick(finding: Finding, seed: int = 11):
    """The same draw with and without the finding: the anatomy, exposure and noise come first."""
    sick = render_chest(np.random.default_rng(seed), [finding])
    healthy = render_chest(np.random.default_rng(seed), [])
    return healthy, sick


@pytest.mark.parametrize("finding", [Finding("consolidation", "right", "moderate", "mid"),
                                     Finding("pleural effusion", "left", "large"),
                                     Finding("pneumothorax", "right", "large")])
def test_mask_is_exactly_the_changed_pixels(finding) -> None:
    healthy, sick = _healthy_and_sick(finding)
    mask = sick.masks[0]
    changed = sick.image != healthy.image
    assert mask.sum() > 20
    assert changed[mask].mean() > 0.9  # inside the mask the picture differs (a few pixels clip to the same grey)
    if finding.name == "pneumothorax":  # outside, only the visceral pleural line, on the lung's edge next to the air
        from scipy import ndimage

        assert not (changed & ~mask & ~ndimage.binary_dilation(mask)).any()
    else:
        assert not (changed & ~mask).any()


def test_sides_sizes_and_zones() -> None:
    rng = np.random.default_rng
    def centre_x(f):
        return np.nonzero(render_chest(rng(5), [f]).masks[0])[1].mean()
    # the patient's right is the image's left
    assert centre_x(Finding("pleural effusion", "right", "moderate")) < 32 < centre_x(Finding("pleural effusion", "left", "moderate"))
    assert centre_x(Finding("pneumothorax", "right", "moderate")) < 32 < centre_x(Finding("pneumothorax", "left", "moderate"))
    area = {s: render_chest(rng(5), [Finding("pleural effusion", "left", s)]).masks[0].sum() for s in ("small", "moderate", "large")}
    assert area["small"] < area["moderate"] < area["large"]
    area = {s: render_chest(rng(5), [Finding("pneumothorax", "left", s)]).masks[0].sum() for s in ("small", "moderate", "large")}
    assert area["small"] < area["moderate"] < area["large"]
    rows = {z: np.nonzero(render_chest(rng(5), [Finding("consolidation", "left", "small", z)]).masks[0])[0].mean()
            for z in ("upper", "mid", "lower")}
    assert rows["upper"] < rows["mid"] < rows["lower"]
    heart = {s: render_chest(rng(5), [Finding("cardiomegaly", None, s)]).masks[0] for s in ("small", "large")}
    widths = {s: np.ptp(np.nonzero(m.any(0))[0]) for s, m in heart.items()}
    assert widths["small"] < widths["large"]
    assert 0.5 < widths["small"] / (64 * 0.61)  # cardiothoracic ratio above 0.5: enlarged


def test_findings_per_image_and_constraints() -> None:
    rng = np.random.default_rng(0)
    lists = [_finding_list(rng, 0.2) for _ in range(2000)]
    assert 0.15 < np.mean([not f for f in lists]) < 0.25
    assert max(len(f) for f in lists) == 3
    for fs in lists:
        names = [f.name for f in fs]
        assert len(set(names)) == len(names)
        ptx = next((f.side for f in fs if f.name == "pneumothorax"), None)
        eff = next((f.side for f in fs if f.name == "pleural effusion"), None)
        for f in fs:
            if f.name in ("consolidation", "pleural effusion"):
                assert f.side != ptx
            if f.name == "consolidation" and f.side == eff:
                assert f.zone != "lower"
    assert {f.name for fs in lists for f in fs} == set(FINDINGS)


def test_reports_name_findings_with_size_side_and_negate_absent_ones(tokenizer) -> None:
    rng = np.random.default_rng(1)
    r = write_report(rng, [Finding("pleural effusion", "right", "moderate"), Finding("consolidation", "left", "large", "upper")],
                     negate_fraction=1.0)
    assert r.startswith("Moderate right pleural effusion")
    assert "Large consolidation in the left upper lung." in r
    assert any(n in r for n in NEGATIONS["pneumothorax"]) and any(n in r for n in NEGATIONS["cardiomegaly"])
    assert not any(n in r for n in NEGATIONS["consolidation"] + NEGATIONS["pleural effusion"])
    healthy = write_report(rng, [], negate_fraction=1.0)
    assert all(any(n in healthy for n in NEGATIONS[f]) for f in FINDINGS)
    # every report fits the text encoder's 77 tokens
    rng = np.random.default_rng(2)
    for _ in range(300):
        fs = _finding_list(rng, 0.2)
        assert len(tokenizer(write_report(rng, fs, 1.0)).input_ids) <= 77


def test_cli_and_bad_config(tmp_path, capsys) -> None:
    assert main(["toyworld", "--domain", "chest", "--out", str(tmp_path / "c"), "--num", "3", "--classes", "pneumothorax"]) == 0
    rows = _rows(tmp_path / "c")
    assert len(rows) == 3 and all(set(r["classes"]) <= {"pneumothorax"} for r in rows)
    with pytest.raises(ValueError, match="findings"):
        generate(tmp_path / "d", 2, config=ChestWorldConfig(findings=("fracture",)))
    with pytest.raises(ValueError, match="size"):
        render_chest(np.random.default_rng(0), [], size=16)
