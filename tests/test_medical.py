"""Medical data and scoring: MIMIC-CXR-JPG pairs and MS-CXR boxes on tiny trees in their real layout,
AUC against boxes on hand-made maps with known answers, and the per-finding evaluation."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from types import SimpleNamespace
from PIL import Image

from conceptseg.data.medical import (FindingCase, read_chest_world, read_finding_cases, read_mimic_cxr_pairs, read_mscxr,
                                     read_pairs, report_text)
from conceptseg.data.readers import read_dataset
from conceptseg import medical_eval
from conceptseg.medical_eval import (FindingEvalConfig, boxes_mask, evaluate_findings, format_table, prompt_for,
                                     wrong_finding)
from conceptseg.metrics import auc_roc

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 
 There is a small right pleural effusion.  No pneumothorax.
 
 IMPRESSION:
 
 Small right pleural effusion.
"""
FINDINGS_ONLY = "FINDINGS: Heart size is normal. Lungs are clear.\n"


def _write_csv(path: Path, rows: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def mimic(tmp_path) -> Path:
    """Two patients, three studies, five images (two lateral), one study without a report."""
    root = tmp_path / "mimic-cxr-jpg"
    images = [  # dicom, subject, study, view, split
        ("d1", "10000032", "50414267", "PA", "train"),
        ("d2", "10000032", "50414267", "LATERAL", "train"),
        ("d3", "10000032", "53189527", "AP", "train"),
        ("d4", "11000011", "56699142", "PA", "test"),
        ("d5", "11000011", "57000000", "PA", "train"),  # no report file
    ]
    meta, split = [], []
    for d, subj, study, view, sp in images:
        meta.append({"dicom_id": d, "subject_id": subj, "study_id": study, "PerformedProcedureStepDescription": "CHEST",
                     "ViewPosition": view, "Rows": 40, "Columns": 30})
        split.append({"dicom_id": d, "study_id": study, "subject_id": subj, "split": sp})
        p = root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}" / f"{d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 30), 100, np.uint8)).save(p)
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", meta, gz=True)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", split, gz=True)
    (root / "files/p10/p10000032/s50414267.txt").write_text(REPORT)
    (root / "files/p10/p10000032/s53189527.txt").write_text(FINDINGS_ONLY)
    (root / "files/p11/p11000011/s56699142.txt").write_text("IMPRESSION: No acute process.")
    return root


def test_report_sections() -> None:
    assert report_text(REPORT) == "Small right pleural effusion."
    assert report_text(REPORT, "findings") == "There is a small right pleural effusion. No pneumothorax."
    assert report_text(REPORT, "both") == "There is a small right pleural effusion. No pneumothorax. Small right pleural effusion."
    assert report_text(FINDINGS_ONLY) == "Heart size is normal. Lungs are clear."  # no impression: the findings
    assert report_text("nothing labelled here") == ""
    with pytest.raises(ValueError, match="section"):
        report_text(REPORT, "history")


def test_mimic_pairs_frontal_split_and_reports(mimic) -> None:
    train = read_mimic_cxr_pairs(mimic, "train")
    assert [p.key for p in train] == ["d1", "d3"]  # lateral d2 and report-less d5 left out; d4 is test
    assert train[0].image == mimic / "files/p10/p10000032/s50414267/d1.jpg" and train[0].image.exists()
    assert train[0].caption() == "Small right pleural effusion."
    assert train[1].caption() == "Heart size is normal. Lungs are clear."
    assert [p.key for p in read_mimic_cxr_pairs(mimic, "test")] == ["d4"]
    assert [p.key for p in read_pairs(f"mimic-cxr:{mimic},section=findings", "all")] == ["d1", "d3", "d4"]
    assert read_pairs(f"mimic-cxr:{mimic},section=findings")[0].caption().startswith("There is a small")
    # reports in a folder of their own
    reports = mimic.parent / "reports"
    (reports / "files/p10/p10000032").mkdir(parents=True)
    (reports / "files/p10/p10000032/s50414267.txt").write_text("IMPRESSION: elsewhere.")
    assert [p.caption() for p in read_mimic_cxr_pairs(mimic, "train", reports)] == ["elsewhere."]
    # as a READERS dataset, for the per-image stages
    assert [s.key for s in read_dataset(f"mimic-cxr:{mimic}", "train")] == ["d1", "d3"]


def test_mimic_errors_name_the_file(mimic) -> None:
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv"):
        read_mimic_cxr_pairs(mimic)
    _write_csv(mimic / "mimic-cxr-2.0.0-split.csv", [{"dicom_id": "d1", "study": "x"}])
    with pytest.raises(ValueError, match=r"split.csv: header lacks \['split'\]"):
        read_mimic_cxr_pairs(mimic)
    with pytest.raises(ValueError, match="options"):
        read_pairs(f"mimic-cxr:{mimic},colour=1")


@pytest.fixture
def mscxr(mimic) -> Path:
    root = mimic.parent / "ms-cxr"
    rows = [
        {"dicom_id": "d1", "category_name": "Pleural Effusion", "label_text": "small right pleural effusion",
         "path": "files/p10/p10000032/s50414267/d1.jpg", "x": 2, "y": 20, "w": 8, "h": 10, "image_width": 30, "image_height": 40},
        {"dicom_id": "d1", "category_name": "Pleural Effusion", "label_text": "small right pleural effusion",
         "path": "files/p10/p10000032/s50414267/d1.jpg", "x": 20, "y": 25, "w": 5, "h": 5, "image_width": 30, "image_height": 40},
        {"dicom_id": "d1", "category_name": "Pneumothorax", "label_text": "left apical pneumothorax",
         "path": "files/p10/p10000032/s50414267/d1.jpg", "x": 18, "y": 2, "w": 6, "h": 6, "image_width": 30, "image_height": 40},
        {"dicom_id": "d4", "category_name": "Lung Opacity", "label_text": "Opacities in the left lower lobe",
         "path": "files/p11/p11000011/s56699142/d4.jpg", "x": 3, "y": 4, "w": 10, "h": 12, "image_width": 30, "image_height": 40},
    ]
    _write_csv(root / "MS_CXR_Local_Alignment_v1.0.0.csv", rows)
    return root


def test_mscxr_groups_boxes_per_image_and_finding(mscxr, mimic) -> None:
    cases = {c.key: c for c in read_mscxr(mscxr, images=mimic)}
    assert sorted(cases) == ["d1_pleural_effusion", "d1_pneumothorax", "d4_lung_opacity"]
    eff = cases["d1_pleural_effusion"]
    assert eff.boxes == ((2, 20, 9, 29), (20, 25, 24, 29))  # x, y, w, h -> inclusive corners
    assert eff.image == mimic / "files/p10/p10000032/s50414267/d1.jpg" and eff.image.exists()
    assert eff.finding == "pleural effusion" and eff.word == "effusion" and eff.image_size == (30, 40)
    assert eff.other_findings == ("pneumothorax",)
    assert cases["d4_lung_opacity"].word == "opacity"
    # through READERS: one sample per (image, finding), box = the box around all of them
    samples = {s.key: s for s in read_dataset(f"ms-cxr:{mscxr},images={mimic}", "test")}
    assert samples["d1_pleural_effusion"].box == (2, 20, 24, 29) and samples["d1_pleural_effusion"].label == "pleural effusion"
    assert len(read_finding_cases(f"ms-cxr:{mscxr},images={mimic}")) == 3


def test_mscxr_without_path_column_uses_mimic_metadata(mscxr, mimic) -> None:
    path = mscxr / "MS_CXR_Local_Alignment_v1.0.0.csv"
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        del r["path"]
    _write_csv(path, rows)
    cases = {c.key: c for c in read_mscxr(mscxr, images=mimic)}
    assert cases["d4_lung_opacity"].image == mimic / "files/p11/p11000011/s56699142/d4.jpg"
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        read_mscxr(mscxr)  # images default to the MS-CXR root, which has no metadata
    rows[0]["x"] = "left"
    _write_csv(path, rows)
    with pytest.raises(ValueError, match="line 2: non-numeric"):
        read_mscxr(mscxr, images=mimic)


# ------------------------------------------------------------------ AUC against boxes


def test_boxes_mask_union_inclusive_and_scaled() -> None:
    m = boxes_mask([(1, 2, 3, 4), (3, 4, 5, 5)], (8, 6))
    expected = np.zeros((6, 8), bool)
    expected[2:5, 1:4] = True
    expected[4:6, 3:6] = True
    assert np.array_equal(m, expected)
    # boxes of a 16x12 original on an 8x6 image: halved
    assert np.array_equal(boxes_mask([(2, 4, 7, 9)], (8, 6), boxes_refer_to=(16, 12)), boxes_mask([(1, 2, 3, 4)], (8, 6)))
    with pytest.raises(ValueError, match="x1 < x0"):
        boxes_mask([(5, 0, 4, 1)], (8, 6))


def test_auc_against_boxes_on_hand_made_maps() -> None:
    box = boxes_mask([(0, 0, 3, 4)], (10, 10))  # 20 pixels of 100
    assert auc_roc(box.astype(float), box) == 1.0
    assert auc_roc(-box.astype(float), box) == 0.0
    assert auc_roc(np.zeros((10, 10)), box) == 0.5
    # high on half the box and on 10 of the 80 outside pixels: P(pos > neg) + P(tie) / 2
    m = np.zeros((10, 10))
    m[np.nonzero(box)[0][:10], np.nonzero(box)[1][:10]] = 1
    m[9, :] = 1
    assert auc_roc(m, box) == pytest.approx(0.5 * 70 / 80 + 0.5 * (0.5 * 10 / 80 + 0.5 * 70 / 80))  # 0.6875


def _cases(tmp_path: Path) -> list[FindingCase]:
    img = tmp_path / "im.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(img)
    return [
        FindingCase("a_eff", img, "pleural effusion", "effusion", "small right pleural effusion", ((0, 5, 4, 9),),
                    other_findings=("cardiomegaly",)),
        FindingCase("a_card", img, "cardiomegaly", "cardiomegaly", "mild cardiomegaly", ((3, 3, 6, 6),),
                    other_findings=("pleural effusion",)),
        FindingCase("b_eff", img, "pleural effusion", "effusion", "large left pleural effusion", ((5, 5, 9, 9),)),
        FindingCase("c_ptx", img, "pneumothorax", "pneumothorax", "left apical pneumothorax", ((6, 0, 9, 3),)),
    ]


def test_prompts_and_wrong_findings(tmp_path) -> None:
    eff, card, _, ptx = _cases(tmp_path)
    assert prompt_for(eff, "finding") == ("pleural effusion", "effusion")
    assert prompt_for(eff, "photo") == ("a photo of a pleural effusion", "effusion")
    assert prompt_for(eff, "phrase") == ("small right pleural effusion", "effusion")
    odd = FindingCase("x", eff.image, "lung opacity", "opacity", "Opacities in the left lower lobe", eff.boxes)
    assert prompt_for(odd, "phrase") == ("lung opacity", "opacity")  # the word is not in the phrase
    # a wrong finding in phrase mode: the same phrase with the other finding
    assert prompt_for(eff, "phrase", "pneumothorax", "pneumothorax") == ("small right pneumothorax", "pneumothorax")
    assert prompt_for(eff, "finding", "pneumothorax", "pneumothorax") == ("pneumothorax", "pneumothorax")
    assert prompt_for(odd, "phrase", "pneumothorax", "pneumothorax") == ("pneumothorax", "pneumothorax")
    findings = ["cardiomegaly", "pleural effusion", "pneumothorax"]
    assert wrong_finding(eff, findings) == "pneumothorax"  # the next one the image does not have
    assert wrong_finding(card, findings) == "pneumothorax"  # effusion is present: skipped
    assert wrong_finding(ptx, findings) == "cardiomegaly"  # cyclic


def test_evaluation_with_hand_made_maps(tmp_path, monkeypatch) -> None:
    """Stage 1 replaced by known maps: the right word's map is the box itself, a wrong word's the
    box inverted; the table's numbers follow."""
    cases = _cases(tmp_path)
    {c.key: c for c in cases}

    def fake_maps(model, sub, prompts, cfg, progress, desc):
        out = []
        for c, (prompt, word) in zip(sub, prompts):
            box = boxes_mask(c.boxes, (10, 10))
            right = word == c.word
            amap = box.astype(np.float32) if right else (~box).astype(np.float32)
            out.append((amap, box if c.finding != "pneumothorax" else np.zeros_like(box)))
        return out

    monkeypatch.setattr(medical_eval, "_maps", fake_maps)
    report = evaluate_findings({"m": SimpleNamespace(source="m")}, cases, FindingEvalConfig())
    m = report["models"]["m"]
    assert set(m["per_finding"]) == {"cardiomegaly", "pleural effusion", "pneumothorax"}
    assert m["per_finding"]["pleural effusion"]["cases"] == 2
    assert all(r["auc"] == 1.0 and r["wrong_word_auc"] == 0.0 for r in m["per_finding"].values())
    assert m["mean_auc"] == 1.0 and m["mean_wrong_word_auc"] == 0.0
    assert m["per_finding"]["cardiomegaly"]["prelim_iou"] == 1.0 and m["per_finding"]["pneumothorax"]["prelim_iou"] == 0.0
    assert m["mean_prelim_iou"] == pytest.approx(2 / 3)
    # the centre prior: the central box scores high, a corner box low
    cp = report["centre_prior"]["per_finding"]
    assert cp["cardiomegaly"]["auc"] > 0.9 and cp["pneumothorax"]["auc"] < 0.4
    table = format_table(report)
    assert "| cardiomegaly | 1 |" in table and "**mean**" in table and "AUC m" in table
    # per_finding caps the cases
    capped = evaluate_findings({"m": SimpleNamespace(source="m")}, cases, FindingEvalConfig(per_finding=1, wrong_word=False))
    assert capped["cases"] == 3 and "wrong_word_auc" not in capped["models"]["m"]["per_finding"]["pleural effusion"]
    with pytest.raises(ValueError, match="prompt"):
        FindingEvalConfig(prompt="caption")


def test_chest_world_end_to_end_with_a_tiny_model(tiny_model_dir, tmp_path, capsys) -> None:
    """The CLI on a small chest world with a random tiny model: every finding scored, JSON written;
    a random model's AUC is not far from chance (a sanity check of the plumbing, not of quality)."""
    from conceptseg.cli import main
    from conceptseg.data.chest import ChestWorldConfig, generate

    data = generate(tmp_path / "chest", 16, seed=1, progress=False, config=ChestWorldConfig(size=32, test_fraction=1.0))
    cases = read_chest_world(data, "test")
    assert cases and all(c.masks and c.masks[0].exists() for c in cases)
    out = tmp_path / "report.json"
    assert main(["evaluate-findings", "--model", str(tiny_model_dir), "--dataset", f"chest:{data}", "--per-finding", "2",
                 "--steps", "2", "--batch-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prompt: photo" in printed and "| **mean** |" in printed
    report = json.loads(out.read_text())
    m = report["models"][str(tiny_model_dir)]
    assert set(m["per_finding"]) == {c.finding for c in cases}
    for row in m["per_finding"].values():
        assert 0.0 <= row["auc"] <= 1.0 and 0.0 <= row["auc_mask"] <= 1.0 and "wrong_word_auc" in row
    assert main(["evaluate-findings", "--dataset", "cxr:/nowhere"]) == 2


def test_medical_experiment_from_yaml(tiny_model_dir, tmp_path, capsys) -> None:
    """`conceptseg medical CONFIG`: fine-tune a tiny model on chest reports for 2 steps, score the base
    and the fine-tuned model per finding, and the curve over the 2 checkpoints."""
    from conceptseg.cli import main
    from conceptseg.data.chest import ChestWorldConfig, generate
    from conceptseg.medical_experiment import load_medical_config

    data = generate(tmp_path / "chest", 12, seed=2, progress=False, config=ChestWorldConfig(size=32, test_fraction=0.5))
    config = tmp_path / "chest.yaml"
    config.write_text(f"out: {tmp_path / 'run'}\nbase_model: {tiny_model_dir}\ntrain_data: {data}\neval_data: chest:{data}\n"
                      "finetune: {steps: 2, batch_size: 2, checkpoint_every: 1, lr: 1.0e-3, samples_per_prompt: 1, sample_prompts: [No effusion.]}\n"
                      "evaluate: {per_finding: 1, steps: 2, batch_size: 8, curve_per_finding: 1}\n")
    assert main(["medical", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "AUC fine-tuned" in printed and "step 2: mean AUC" in printed
    report = json.loads((tmp_path / "run" / "findings.json").read_text())
    assert set(report["models"]) == {"base", "fine-tuned"}
    assert report["models_used"]["fine-tuned"] == str(tmp_path / "run" / "finetune" / "model")
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 1, 2]
    assert all(0 <= p["mean_auc"] <= 1 for p in curve["points"])
    # bad configs: one clear error naming the file and the setting
    config.write_text("out: x\neval_data: chest:y\nfinetune: {stepz: 3}\n")
    with pytest.raises(ValueError, match=r"chest.yaml.finetune: unknown setting\(s\) stepz; known: steps"):
        load_medical_config(config)
    config.write_text("out: x\neval_data: chest:y\n")
    assert load_medical_config(config).evaluate.prompt == "photo"  # stage 1's y_f by default
    assert load_medical_config(config, ["evaluate.prompt=finding"]).evaluate.prompt == "finding"


def test_medical_finetune_settings_default_to_train_t2i(tmp_path) -> None:
    """A medical config's `finetune:` keys are train-t2i's: each omitted one takes TrainT2IConfig's default."""
    import dataclasses

    from conceptseg.medical_experiment import load_medical_config
    from conceptseg.train_t2i import TrainT2IConfig

    config = tmp_path / "m.yaml"
    config.write_text("out: x\neval_data: chest:y\nfinetune: {steps: 7}\n")
    section = dataclasses.asdict(load_medical_config(config).finetune)
    reference = dataclasses.asdict(TrainT2IConfig(data="d", out=Path("o")))
    assert section.pop("steps") == 7 and section == {k: reference[k] for k in section}


def test_medical_demo_config(tmp_path) -> None:
    from conceptseg.demo import medical_demo_config

    cfg = medical_demo_config(tmp_path / "demo", num_images=4)
    assert cfg.model == "embedded:chest" and cfg.base_model is None and cfg.train_data is None
    assert cfg.eval_data == f"chest:{tmp_path / 'demo' / 'data'}" and cfg.evaluate.curve_per_finding is None
    cases = read_finding_cases(cfg.eval_data, cfg.eval_split)
    assert cases  # every row held out
