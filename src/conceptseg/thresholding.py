"""Binarising a map the paper's way: a Gaussian mixture threshold, then the orphan filter.

The paper fits 2 components (a map of one object over background). `components` > 2 is a named
deviation for maps with more modes, e.g. chest radiographs (background, chest, lesion: METHOD.md
§6): the foreground is the component with the highest mean, and the threshold sits halfway between
that mean and the next lower one. For 2 components that is the paper's mean of the two means.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.mixture import GaussianMixture


def gmm_threshold(values: np.ndarray, seed: int = 0, components: int = 2) -> float:
    """Halfway between the highest and the second-highest component mean of a GMM fitted to the values.

    sklearn defaults, with a fixed random_state so a run is repeatable. For `components=2` this is
    the mean of the two component means (the paper).
    """
    if components < 2:
        raise ValueError(f"a GMM threshold needs at least 2 components, got {components}")
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    if v.size < components or np.ptp(v) == 0:
        return float("inf")  # a flat map has no foreground mode
    gmm = GaussianMixture(n_components=components, random_state=seed).fit(v)
    if components == 2:
        return float(gmm.means_.mean())  # the paper's formula, kept literally
    top, second = np.sort(gmm.means_.ravel())[-2:][::-1]
    return float((top + second) / 2)


def orphan_filter(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote: a pixel is foreground when at least half of its 3x3 neighbourhood is."""
    return ndimage.uniform_filter(np.asarray(mask, dtype=np.float32), size=3) >= 0.5


def binarize(values: np.ndarray, valid: np.ndarray | None = None, orphan: bool = True, seed: int = 0,
             components: int = 2) -> np.ndarray:
    """Foreground = above the GMM threshold (fitted on the `valid` cells only); then the orphan filter."""
    values = np.asarray(values)
    valid = np.ones(values.shape, dtype=bool) if valid is None else valid
    if not np.isfinite(values[valid]).all():
        from conceptseg.geometry import NonFiniteError

        raise NonFiniteError(f"the map holds {int((~np.isfinite(values[valid])).sum())} NaN or infinite values")
    mask = (values > gmm_threshold(values[valid], seed, components)) & valid
    return orphan_filter(mask) & valid if orphan else mask
