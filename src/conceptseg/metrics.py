"""Segmentation metrics as the paper reports them: pooled over all test pixels, not averaged per image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score


@dataclass
class PooledCounts:
    """Confusion counts summed over every pixel of every image added."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
        self.tp += int(np.sum(pred & truth))
        self.fp += int(np.sum(pred & ~truth))
        self.fn += int(np.sum(~pred & truth))
        self.tn += int(np.sum(~pred & ~truth))

    @property
    def acc(self) -> float:
        total = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.tn) / total if total else float("nan")

    @property
    def iou(self) -> float:
        """Foreground IoU; 1.0 when both prediction and truth are empty everywhere."""
        union = self.tp + self.fp + self.fn
        return self.tp / union if union else 1.0

    @property
    def bg_iou(self) -> float:
        union = self.tn + self.fp + self.fn
        return self.tn / union if union else 1.0

    @property
    def miou(self) -> float:
        return (self.iou + self.bg_iou) / 2

    def as_dict(self) -> dict[str, float]:
        return {"acc": self.acc, "iou": self.iou, "miou": self.miou}


def pooled_scores(preds, truths) -> dict[str, float]:
    counts = PooledCounts()
    for p, t in zip(preds, truths, strict=True):
        counts.add(p, t)
    return counts.as_dict()


def auc_roc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Pixel-wise AUC-ROC of a raw map against a binary mask (NaN when the truth has one class only)."""
    truth = np.asarray(truth, dtype=bool).ravel()
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64).ravel()))
