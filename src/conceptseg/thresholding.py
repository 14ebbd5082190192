"""Binarising a map the paper's way: a 2-component Gaussian mixture threshold, then the orphan filter."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.mixture import GaussianMixture


def gmm_threshold(values: np.ndarray, seed: int = 0) -> float:
    """The mean of the two component means of a 2-component GMM fitted to the values.

    sklearn defaults, with a fixed random_state so a run is repeatable.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    if v.size < 2 or np.ptp(v) == 0:
        return float("inf")  # a flat map has no foreground mode
    gmm = GaussianMixture(n_components=2, random_state=seed).fit(v)
    return float(gmm.means_.mean())


def orphan_filter(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote: a pixel is foreground when at least half of its 3x3 neighbourhood is."""
    return ndimage.uniform_filter(np.asarray(mask, dtype=np.float32), size=3) >= 0.5


def binarize(values: np.ndarray, valid: np.ndarray | None = None, orphan: bool = True, seed: int = 0) -> np.ndarray:
    """Foreground = above the GMM threshold (fitted on the `valid` cells only); then the orphan filter."""
    values = np.asarray(values)
    valid = np.ones(values.shape, dtype=bool) if valid is None else valid
    if not np.isfinite(values[valid]).all():
        from conceptseg.geometry import NonFiniteError

        raise NonFiniteError(f"the map holds {int((~np.isfinite(values[valid])).sum())} NaN or infinite values")
    mask = (values > gmm_threshold(values[valid], seed)) & valid
    return orphan_filter(mask) & valid if orphan else mask
