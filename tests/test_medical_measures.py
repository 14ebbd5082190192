"""The localisation measures of the medical evaluation on hand-made maps with known answers: CNR,
pointing game, mIoU of M_pre against boxes, the negation measure; and the key layout of
`conceptseg demo --medical`'s findings.json (on a tiny random-weight model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conceptseg import medical_eval
from conceptseg.data.chest import FINDING_WORDS, FINDINGS, NEGATIONS, Finding, _sentence
from conceptseg.data.medical import FindingCase, ReportedImage, negates, read_chest_world_images, read_reported_images
from conceptseg.medical_eval import (COMPARABLE, FindingEvalConfig, boxes_mask, case_iou, cnr, evaluate_findings,
                                     format_table, negation_row, pointing_hit)

# ------------------------------------------------------------------ CNR


def _cnr_map() -> tuple[np.ndarray, np.ndarray]:
    """4x4; inside the 2x2 top-left box 2, 4, 2, 4 (mean 3, variance 1); outside six 0s and six 2s
    (mean 1, variance 1): CNR = |3 - 1| / sqrt(1 + 1) = sqrt(2)."""
    region = boxes_mask([(0, 0, 1, 1)], (4, 4))
    amap = np.zeros((4, 4))
    amap[region] = [2, 4, 2, 4]
    amap[~region] = [0, 2] * 6
    return amap, region


def test_cnr_known_answer_and_population_variance() -> None:
    amap, region = _cnr_map()
    assert cnr(amap, region) == pytest.approx(np.sqrt(2))  # sample variances (4/3, 12/11) would give 1.31
    assert cnr(-amap, region) == pytest.approx(np.sqrt(2))  # |difference|: the sign does not matter


def test_cnr_is_invariant_to_an_affine_rescale() -> None:
    amap, region = _cnr_map()
    for a, b in ((5.0, -7.0), (-3.0, 1.0), (1e-3, 0.5)):  # raw attention, a min-max normalised map, a flipped one
        assert cnr(a * amap + b, region) == pytest.approx(cnr(amap, region))
    rng = np.random.default_rng(0)
    noisy = rng.random((8, 8))
    box = boxes_mask([(1, 2, 4, 6)], (8, 8))
    normalised = (noisy - noisy.min()) / (noisy.max() - noisy.min())
    assert cnr(normalised, box) == pytest.approx(cnr(noisy, box))


def test_cnr_over_the_union_of_two_boxes_and_undefined_cases() -> None:
    """1 on the first box, 3 on the second (inside: mean 2, variance 1); outside 14 zeros and 14
    twos (mean 1, variance 1): CNR = 1 / sqrt(2). The first box alone would give another number."""
    region = boxes_mask([(0, 0, 1, 1), (4, 4, 5, 5)], (6, 6))
    amap = np.zeros((6, 6))
    amap[:2, :2], amap[4:, 4:] = 1, 3
    amap[~region] = [0, 2] * 14
    assert cnr(amap, region) == pytest.approx(1 / np.sqrt(2))
    assert cnr(amap, boxes_mask([(0, 0, 1, 1)], (6, 6))) != pytest.approx(1 / np.sqrt(2))
    assert np.isnan(cnr(amap, np.ones((6, 6), bool)))  # nothing outside
    assert np.isnan(cnr(np.ones((6, 6)), region))  # constant map: no contrast, no noise


# ------------------------------------------------------------------ pointing game


def test_pointing_game_hits_and_misses() -> None:
    box = boxes_mask([(2, 2, 4, 4)], (8, 8))
    amap = np.zeros((8, 8))
    amap[3, 3] = 1.0
    assert pointing_hit(amap, box) == 1.0
    amap[7, 0] = 2.0  # the maximum moves outside the box, the box still holds a high value
    assert pointing_hit(amap, box) == 0.0
    # two boxes: a maximum in the second one is a hit
    two = boxes_mask([(0, 0, 1, 1), (6, 6, 7, 7)], (8, 8))
    amap = np.zeros((8, 8))
    amap[7, 7] = 1.0
    assert pointing_hit(amap, two) == 1.0 and pointing_hit(amap, boxes_mask([(0, 0, 1, 1)], (8, 8))) == 0.0
    # ties: a hit when any maximal pixel is inside
    amap = np.zeros((8, 8))
    amap[0, 7] = amap[3, 3] = 1.0
    assert pointing_hit(amap, box) == 1.0
    amap[3, 3] = 0.5
    assert pointing_hit(amap, box) == 0.0


def test_case_iou_against_boxes() -> None:
    box = boxes_mask([(0, 0, 3, 3)], (8, 8))  # 16 pixels
    pred = np.zeros((8, 8), bool)
    pred[:2, :2] = True  # 4 of them
    assert case_iou(pred, box) == 0.25
    pred[6:, 6:] = True  # and 4 outside
    assert case_iou(pred, box) == pytest.approx(4 / 20)


# ------------------------------------------------------------------ per finding, through evaluate_findings


def _image(tmp_path: Path, name: str = "im.png", size: int = 8) -> Path:
    path = tmp_path / name
    Image.fromarray(np.zeros((size, size), np.uint8)).save(path)
    return path


def test_measures_per_finding_are_means_over_cases_then_findings(tmp_path, monkeypatch) -> None:
    """Effusion: two cases, the first a hit with the map equal to _cnr_map's, the second a miss; M_pre
    exactly its 4-pixel box (IoU 1), then 4 of a 16-pixel box (IoU 0.25). Pneumothorax: one hit. The
    means over findings differ from the means over cases (pointing 0.75 against 2/3)."""
    img = _image(tmp_path, size=4)
    big = _image(tmp_path, "big.png", size=8)
    cases = [FindingCase("a_eff", img, "pleural effusion", "effusion", "pleural effusion", ((0, 0, 1, 1),)),
             FindingCase("b_eff", big, "pleural effusion", "effusion", "pleural effusion", ((0, 0, 3, 3),)),
             FindingCase("c_ptx", big, "pneumothorax", "pneumothorax", "pneumothorax", ((4, 4, 7, 7),))]
    amap_a, _ = _cnr_map()
    miss = np.zeros((8, 8))
    miss[0:4, 0:4], miss[7, 0] = 1.0, 5.0  # high on the box, its maximum outside
    hit = np.zeros((8, 8))
    hit[4:, 4:] = [[1, 2, 1, 2]] * 4
    half = np.zeros((8, 8), bool)
    half[:2, :2] = True
    known = {"a_eff": (amap_a, boxes_mask([(0, 0, 1, 1)], (4, 4))), "b_eff": (miss, half),
             "c_ptx": (hit, boxes_mask([(4, 4, 7, 7)], (8, 8)))}
    monkeypatch.setattr(medical_eval, "_maps", lambda model, sub, prompts, cfg, progress, desc: [known[c.key] for c in sub])
    report = evaluate_findings({"m": SimpleNamespace(source="m")}, cases, FindingEvalConfig(wrong_word=False))
    m = report["models"]["m"]
    eff, ptx = m["per_finding"]["pleural effusion"], m["per_finding"]["pneumothorax"]
    assert eff["pointing_game"] == 0.5 and ptx["pointing_game"] == 1.0 and m["mean_pointing_game"] == 0.75
    cnr_b, cnr_c = cnr(miss, boxes_mask([(0, 0, 3, 3)], (8, 8))), cnr(hit, boxes_mask([(4, 4, 7, 7)], (8, 8)))
    assert eff["cnr"] == pytest.approx((np.sqrt(2) + cnr_b) / 2) and ptx["cnr"] == pytest.approx(cnr_c)
    assert m["mean_cnr"] == pytest.approx(((np.sqrt(2) + cnr_b) / 2 + cnr_c) / 2)
    assert eff["prelim_miou_boxes"] == pytest.approx(0.625)  # per case: (1 + 0.25) / 2
    assert eff["prelim_iou"] == pytest.approx(8 / 20)  # pooled: the other measure, kept
    assert m["mean_prelim_miou_boxes"] == pytest.approx((0.625 + 1.0) / 2)
    for key in ("mean_auc", "mean_cnr", "mean_pointing_game", "mean_prelim_miou_boxes", "mean_prelim_iou"):
        assert key in m
    assert "mean_cnr" in report["centre_prior"] and "mean_pointing_game" in report["centre_prior"]
    table = format_table(report)
    assert "CNR m" in table and "pointing m" in table and "mIoU M_pre boxes m" in table and COMPARABLE in table
    mean_row = table.split("\n\n")[1].splitlines()[-1]  # the localisation table's
    assert mean_row.startswith("| **mean** | 3 |") and mean_row.endswith(f"| {m['mean_cnr']:.3f} | 0.750 | 0.812 |")


def test_centre_prior_points_at_a_central_box(tmp_path) -> None:
    img = _image(tmp_path, size=9)
    central = FindingCase("a", img, "cardiomegaly", "cardiomegaly", "cardiomegaly", ((3, 3, 5, 5),))
    corner = FindingCase("b", img, "pneumothorax", "pneumothorax", "pneumothorax", ((0, 0, 2, 2),))
    cp = medical_eval.centre_prior([central, corner], [medical_eval._truth(c) for c in (central, corner)])
    assert cp["per_finding"]["cardiomegaly"]["pointing_game"] == 1.0 and cp["per_finding"]["pneumothorax"]["pointing_game"] == 0.0
    assert cp["per_finding"]["cardiomegaly"]["cnr"] > 1.0 and cp["mean_pointing_game"] == 0.5


# ------------------------------------------------------------------ negation


def test_negates_the_chest_worlds_negations_and_not_its_findings() -> None:
    rng = np.random.default_rng(0)
    for name in FINDINGS:
        word = FINDING_WORDS[name]
        for sentence in NEGATIONS[name]:
            assert negates(f"Mild cardiomegaly. {sentence}", word), sentence
        for size in ("small", "moderate", "large"):
            for _ in range(4):
                positive = _sentence(rng, Finding(name, None if name == "cardiomegaly" else "left", size, "mid"))
                assert not negates(f"{positive} No acute process.", word), positive
    assert not negates("Normal chest radiograph. Nodular opacity.", "opacity")  # "no" inside a word is no cue
    assert negates("Heart size is normal, no cardiomegaly or effusions.", "effusion")


def _reported(tmp_path: Path) -> list[ReportedImage]:
    img = _image(tmp_path)
    return [
        ReportedImage("h1", img, "The lungs are clear. No pneumothorax.", ()),
        ReportedImage("h2", img, "Normal chest radiograph.", ()),
        ReportedImage("card", img, "Mild cardiomegaly. No pneumothorax.", ("cardiomegaly",)),
        ReportedImage("eff", img, "Small right pleural effusion. No pneumothorax. No cardiomegaly.", ("pleural effusion",)),
        ReportedImage("silent", img, "Small left pleural effusion.", ("pleural effusion",)),  # negates nothing
        ReportedImage("ptx", img, "Large left pneumothorax. No cardiomegaly.", ("pneumothorax",)),
    ]


def _negation_maps(values: dict[tuple[str, str], float]):
    """Fake stage 1: a constant map per (word, image key); default 0.1."""
    def fake(model, sub, prompts, cfg, progress, desc):
        return [(np.full((8, 8), values.get((word, c.key), 0.1), np.float32), np.zeros((8, 8), bool))
                for c, (_, word) in zip(sub, prompts)]
    return fake


def test_negation_measure_on_hand_made_maps(tmp_path, monkeypatch) -> None:
    """"pneumothorax" lights up the abnormal images whose report negates it (0.3 against 0.1 on healthy
    ones): ratio 3. "cardiomegaly" does not (0.1 everywhere on negated, 0.2 on healthy): ratio 0.5.
    Images outside the groups (the one with a pneumothorax, the one whose report is silent) carry
    100, so counting them would show."""
    images = _reported(tmp_path)
    cases = [FindingCase("card_c", images[2].image, "cardiomegaly", "cardiomegaly", "mild cardiomegaly", ((0, 0, 3, 3),)),
             FindingCase("ptx_p", images[5].image, "pneumothorax", "pneumothorax", "large left pneumothorax", ((0, 0, 3, 3),))]
    values = {("pneumothorax", "card"): 0.3, ("pneumothorax", "eff"): 0.3, ("pneumothorax", "ptx"): 100.0,
              ("pneumothorax", "silent"): 100.0, ("cardiomegaly", "h1"): 0.2, ("cardiomegaly", "h2"): 0.2,
              ("cardiomegaly", "silent"): 100.0, ("cardiomegaly", "card"): 100.0}
    monkeypatch.setattr(medical_eval, "_maps", _negation_maps(values))
    report = evaluate_findings({"m": SimpleNamespace(source="m")}, cases, FindingEvalConfig(wrong_word=False), images=images)
    neg = report["models"]["m"]["negation"]
    ptx, card = neg["per_finding"]["pneumothorax"], neg["per_finding"]["cardiomegaly"]
    assert (ptx["negated_images"], ptx["healthy_images"]) == (2, 2)  # card and eff; not ptx, not silent
    assert ptx["mean_negated"] == pytest.approx(0.3) and ptx["mean_healthy"] == pytest.approx(0.1)
    assert ptx["ratio"] == pytest.approx(3.0)
    assert card["negated_images"] == 2 and card["ratio"] == pytest.approx(0.5)  # eff and ptx negate it
    assert neg["lit_up"] == ["pneumothorax"]
    table = format_table(report)
    assert "negation, m:" in table and "| pneumothorax | 2 | 2 | 0.3 | 0.1 | 3.000 |" in table
    # the cap applies to each group
    capped = evaluate_findings({"m": SimpleNamespace(source="m")}, cases,
                               FindingEvalConfig(wrong_word=False, negation_images=1), images=images)
    assert capped["models"]["m"]["negation"]["per_finding"]["pneumothorax"]["healthy_images"] == 1


def test_negation_absent_without_healthy_images(tmp_path, monkeypatch) -> None:
    images = _reported(tmp_path)
    cases = [FindingCase("card_c", images[2].image, "cardiomegaly", "cardiomegaly", "mild cardiomegaly", ((0, 0, 3, 3),))]
    monkeypatch.setattr(medical_eval, "_maps", _negation_maps({}))
    m = evaluate_findings({"m": SimpleNamespace(source="m")}, cases, FindingEvalConfig(wrong_word=False))["models"]["m"]
    assert "MS-CXR" in m["negation"]["absent"]  # no images with reports given
    sick = [im for im in images if im.findings]
    m = evaluate_findings({"m": SimpleNamespace(source="m")}, cases, FindingEvalConfig(wrong_word=False), images=sick)["models"]["m"]
    assert m["negation"] == {"absent": "no healthy images in the split"}
    off = evaluate_findings({"m": SimpleNamespace(source="m")}, cases, FindingEvalConfig(wrong_word=False, negation=False),
                            images=images)
    assert "negation" not in off["models"]["m"]
    assert "negation, m: absent" in format_table({**off, "models": {"m": m}})
    row = negation_row([np.full((2, 2), 0.1)], [np.full((2, 2), 0.2), np.full((2, 2), 0.4)])
    assert row["ratio"] == pytest.approx(0.1 / 0.3) and row["healthy_images"] == 2


def test_reported_images_of_the_chest_world(tmp_path) -> None:
    from conceptseg.data.chest import ChestWorldConfig, generate

    data = generate(tmp_path / "chest", 12, seed=1234, progress=False, config=ChestWorldConfig(size=32, test_fraction=1.0))
    images = read_chest_world_images(data, "test")
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert [im.report for im in images] == [r["caption"] for r in rows]
    assert [im.findings for im in images] == [tuple(f["finding"] for f in r["findings"]) for r in rows]
    assert any(not im.findings for im in images)  # healthy images are there
    assert read_reported_images(f"chest:{data}", "test") == images
    assert read_reported_images("ms-cxr:/nowhere,images=/elsewhere") is None  # MS-CXR: absent, nothing read
    assert read_chest_world_images(data, "train") == []


# ------------------------------------------------------------------ configs and the demo's JSON


@pytest.mark.parametrize("name", ["mscxr.yaml", "chest.yaml"])
def test_configs_compute_the_same_measures(name) -> None:
    from conceptseg.medical_experiment import _eval_config, load_medical_config

    cfg = load_medical_config(Path(__file__).parents[1] / "configs" / name)
    e = _eval_config(cfg.evaluate, cfg.evaluate.per_finding, True)
    assert isinstance(e, FindingEvalConfig) and e.negation and e.prompt == "photo"
    assert not _eval_config(cfg.evaluate, 1, False).negation  # the curve: AUC only
    if name == "mscxr.yaml":
        assert read_reported_images(cfg.eval_data) is None  # negation reported absent on MS-CXR


def test_demo_medical_json_keys(tiny_model_dir, tmp_path) -> None:
    """`conceptseg demo --medical`'s findings.json, built on a tiny random model (for both the base
    and the fine-tuned one): AUC, CNR and pointing game per finding and mean, negation, for both."""
    from conceptseg.demo import medical_demo_config
    from conceptseg.medical_experiment import run_medical

    cfg = medical_demo_config(tmp_path / "demo", model=str(tiny_model_dir), num_images=4)  # rows 0-2: every finding; row 3: healthy
    cfg = dataclasses.replace(cfg, base_model=str(tiny_model_dir),
                              evaluate=dataclasses.replace(cfg.evaluate, steps=2, batch_size=8, per_finding=1, negation_images=1))
    run_medical(cfg, progress=False)
    report = json.loads((tmp_path / "demo" / "findings.json").read_text())
    assert set(report["models"]) == {"base", "fine-tuned"}
    for m in report["models"].values():
        for key in ("mean_auc", "mean_cnr", "mean_pointing_game", "mean_prelim_miou_boxes"):
            assert key in m
        assert m["per_finding"]
        for row in m["per_finding"].values():
            assert {"auc", "cnr", "pointing_game", "prelim_miou_boxes", "wrong_word_auc"} <= set(row)
            assert row["pointing_game"] in (0.0, 1.0) and 0.0 <= row["prelim_miou_boxes"] <= 1.0
        neg = m["negation"]
        assert "absent" not in neg and set(neg["per_finding"]) == set(m["per_finding"])
        assert all(r["healthy_images"] == 1 for r in neg["per_finding"].values())
    assert {"mean_auc", "mean_cnr", "mean_pointing_game"} <= set(report["centre_prior"])
