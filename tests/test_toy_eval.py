"""The embedded model's yardstick: which numbers it makes, and that its references mean what they say."""

import pytest

from conceptseg.data.toyworld import ToyWorldConfig, generate
from conceptseg.toy_eval import ToyEvalConfig, _centre_prior, evaluate_toy_model
from conceptseg.metrics import auc_roc


def test_centre_prior_scores_a_centred_object_perfectly():
    prior = _centre_prior((20, 20))
    truth = prior > -0.2  # a centred disc
    assert auc_roc(prior, truth) == 1.0
    assert auc_roc(prior, ~truth) == 0.0  # everything but the centre: the prior is exactly wrong


def test_report_has_every_requested_part(tiny_model, tmp_path):
    data = generate(tmp_path / "toy", 40, seed=0, config=ToyWorldConfig(size=32, test_fraction=0.5), progress=False)
    cfg = ToyEvalConfig(per_class=1, steps=2, classify_timesteps=(100, 500), binding_scenes=2)
    report = evaluate_toy_model(tiny_model, data, cfg, progress=False)
    for key in ("correct_word", "wrong_word", "random_init"):
        assert 0.0 <= report[key]["auc"] <= 1.0 and 0.0 <= report[key]["prelim_iou"] <= 1.0
    assert 0.0 <= report["class_by_denoising_accuracy"] <= 1.0
    assert 0.0 <= report["binding_auc"] <= 1.0 and 0.0 <= report["centre_prior_auc"] <= 1.0
    levels = report["auc_per_level"]  # the tiny UNet cross-attends at its two finest levels
    assert list(levels) == ["16x16", "8x8"] and all(0.0 <= v <= 1.0 for v in levels.values())
    only = evaluate_toy_model(tiny_model, data, ToyEvalConfig(per_class=1, steps=2, parts=("centre_prior",)), progress=False)
    assert set(only) == {"images", "per_class", "config", "centre_prior_auc"}
    with pytest.raises(ValueError, match="unknown evaluation part"):
        evaluate_toy_model(tiny_model, data, ToyEvalConfig(per_class=1, parts=("nope",)), progress=False)
