"""Which synthetic pairs (D', D'_m) to train on: a named deviation from the paper, off by default.

The paper trains on every synthetic image with its stage-1+3 mask. The embedded toy model's
samples of "a photo of a fish" often hold several small fish, and their masks pieces of background
(docs/demo.md). `plausible` keeps a pair only when its mask looks like one object of a size the
real images' masks have: its largest connected region holds at least `one_object` of its pixels,
and its foreground fraction lies between the `low` and `high` quantiles of the refined masks M of D.
No ground truth is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from conceptseg.data.readers import Sample
from conceptseg.geometry import load_mask_file

FILTERS = ("none", "plausible")


def largest_share(mask: np.ndarray) -> float:
    """Share of the mask's pixels in its largest 8-connected region (0 for an empty mask)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    return float(np.bincount(labels.ravel())[1:].max() / mask.sum()) if n else 0.0


def plausible(synthetic: Sequence[Sample], reference_masks: Sequence[Path], one_object: float = 0.9,
              low: float = 0.05, high: float = 0.95) -> list[Sample]:
    """The synthetic samples whose masks pass both tests (see the module's docstring)."""
    fractions = [load_mask_file(p).mean() for p in reference_masks]
    lo, hi = np.quantile(fractions, [low, high])
    kept = []
    for s in synthetic:
        mask = load_mask_file(s.mask)
        if lo <= mask.mean() <= hi and largest_share(mask) >= one_object:
            kept.append(s)
    return kept
