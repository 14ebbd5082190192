"""conceptseg.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conceptseg.metrics import PooledCounts, auc_roc, pooled_scores

# Image A (1x4): pred 1 1 0 0, truth 1 0 0 0 -> tp 1, fp 1, fn 0, tn 2 (IoU 1/2)
A_PRED, A_TRUTH = np.array([[1, 1, 0, 0]]), np.array([[1, 0, 0, 0]])
# Image B (2x4): everything predicted and true -> tp 8 (IoU 1)
B_PRED, B_TRUTH = np.ones((2, 4)), np.ones((2, 4))


def test_pooled_over_two_images_is_not_the_per_image_mean():
    c = PooledCounts()
    c.add(A_PRED, A_TRUTH)
    c.add(B_PRED, B_TRUTH)
    assert (c.tp, c.fp, c.fn, c.tn) == (9, 1, 0, 2)
    assert c.acc == pytest.approx(11 / 12)
    assert c.iou == pytest.approx(9 / 10)  # pooled; the per-image mean would be (1/2 + 1) / 2 = 0.75
    assert c.bg_iou == pytest.approx(2 / 3)  # tn / (tn + fp + fn)
    assert c.miou == pytest.approx((9 / 10 + 2 / 3) / 2)
    assert c.as_dict() == pytest.approx({"acc": 11 / 12, "iou": 9 / 10, "miou": 47 / 60})
    assert pooled_scores([A_PRED, B_PRED], [A_TRUTH, B_TRUTH]) == pytest.approx(c.as_dict())


def test_single_image_counts():
    c = PooledCounts()
    c.add(np.array([[1, 1], [0, 0]], bool), np.array([[1, 0], [1, 0]], bool))  # tp fp / fn tn
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 1, 1)
    assert (c.acc, c.iou, c.bg_iou, c.miou) == pytest.approx((0.5, 1 / 3, 1 / 3, 1 / 3))


def test_empty_prediction_non_empty_truth():
    c = PooledCounts()
    truth = np.zeros((2, 2), bool)
    truth[0, 0] = True
    c.add(np.zeros((2, 2), bool), truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (0, 0, 1, 3)
    assert c.iou == 0.0
    assert c.bg_iou == pytest.approx(3 / 4)
    assert c.miou == pytest.approx(3 / 8)
    assert c.acc == pytest.approx(3 / 4)


def test_empty_truth_and_empty_prediction():
    c = PooledCounts()
    c.add(np.zeros((2, 3), bool), np.zeros((2, 3), bool))
    assert c.tn == 6 and c.iou == 1.0 and c.bg_iou == 1.0  # nothing to get wrong: IoU 1 by convention
    assert c.miou == 1.0 and c.acc == 1.0
    full = PooledCounts()
    full.add(np.ones((2, 2)), np.ones((2, 2)))
    assert full.bg_iou == 1.0 and full.miou == 1.0  # no background anywhere: background IoU 1


def test_no_pixels_and_size_mismatch():
    assert math.isnan(PooledCounts().acc)
    with pytest.raises(ValueError, match="differ in size"):
        PooledCounts().add(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        pooled_scores([A_PRED], [A_TRUTH, B_TRUTH])  # one prediction per truth


def test_auc_roc():
    truth = np.array([[0, 0], [1, 1]])
    assert auc_roc(np.array([[0.1, 0.2], [0.8, 0.9]]), truth) == 1.0  # perfect
    assert auc_roc(np.array([[0.9, 0.8], [0.2, 0.1]]), truth) == 0.0  # inverted
    assert auc_roc(np.full((2, 2), 0.3), truth) == 0.5  # all tied
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ranked right
    assert auc_roc(np.array([0.1, 0.4, 0.35, 0.8]), truth.ravel()) == pytest.approx(3 / 4)
    assert math.isnan(auc_roc(np.array([0.1, 0.9]), np.array([0, 0])))  # no positives
    assert math.isnan(auc_roc(np.array([0.1, 0.9]), np.array([1, 1])))  # no negatives
