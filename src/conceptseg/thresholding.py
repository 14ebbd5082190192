"""Binarising a map the paper's way: a Gaussian mixture threshold, then the orphan filter.

The paper fits 2 components (a map of one object over background). `components` > 2 is a named
deviation for maps with more modes, e.g. chest radiographs (background, chest, lesion: METHOD.md
§6): the foreground is the component with the highest mean, and the threshold sits halfway between
that mean and the next lower one. For 2 components that is the paper's mean of the two means.

The fit runs in scikit-learn (`method="sklearn"`, the reference) or as the same algorithm in torch
(`method="torch"`: float64, batched over maps, on the maps' device, so a GPU stage does not wait on
the CPU for the EM). The torch fit is sklearn's GaussianMixture step by step: the same k-means
initialisation (sklearn's own KMeans, seeded alike, on the CPU), then EM until the mean
log-likelihood moves by less than 1e-3, at most 100 iterations, reg_covar 1e-6. The thresholds
agree to rounding (tests/test_speed_paths.py; benchmarks/speed_paths.py on the demo's maps).

Why not a k-means in torch too: on maps with two likelihood optima sklearn's result depends on its
k-means seed, and with the loose 1e-3 stopping rule even one optimum is reached at a point that
depends on where k-means started; a torch k-means from other starting centres differed from sklearn
on 7% of the demo's stage-1 maps and 25% of its stage-3 difference maps (thresholds up to 26% of
the map's range apart).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.mixture import GaussianMixture

GMM_METHODS = ("sklearn", "torch")


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


def gmm_thresholds_torch(values: torch.Tensor, valid: torch.Tensor | None = None, seed: int = 0, components: int = 2,
                         max_iter: int = 100, tol: float = 1e-3, reg_covar: float = 1e-6) -> torch.Tensor:
    """`gmm_threshold` of each row of `values` (B, N) over its `valid` cells (B, N bool): sklearn's
    k-means initialisation, then the EM in torch (float64) on `values`' device, all rows at once; (B,)
    float64, inf where a row is flat or has fewer valid cells than components."""
    if components < 2:
        raise ValueError(f"a GMM threshold needs at least 2 components, got {components}")
    x = values.to(torch.float64)
    w = torch.ones_like(x) if valid is None else valid.to(x.device, torch.float64)
    b, k = x.shape[0], components
    count = w.sum(1)  # (B,)
    lo = torch.where(w > 0, x, torch.inf).amin(1)
    hi = torch.where(w > 0, x, -torch.inf).amax(1)
    fit = (count >= k) & (hi > lo)
    if not fit.any():
        return torch.full((b,), torch.inf, dtype=torch.float64, device=x.device)
    x, w, count = x[fit], w[fit], count[fit]
    resp = F.one_hot(_kmeans_labels(x, w, k, seed), k).to(x.dtype) * w[..., None]  # k-means labels as responsibilities
    weights, means, var = _m_step(x, resp, count, reg_covar)
    lower = torch.full_like(count, -torch.inf)
    active = torch.ones_like(count, dtype=torch.bool)  # rows still iterating; a converged row is frozen
    for _ in range(max_iter):
        # E-step (sklearn's _estimate_log_prob for one feature), then the M-step
        log_prob = -0.5 * (np.log(2 * np.pi) + (x[..., None] - means[:, None]) ** 2 / var[:, None]) - 0.5 * var.log()[:, None]
        weighted = log_prob + weights.log()[:, None]
        norm = torch.logsumexp(weighted, dim=-1)  # (B', N)
        new_lower = (norm * w).sum(1) / count  # mean log-likelihood: sklearn's lower bound
        new = _m_step(x, (weighted - norm[..., None]).exp() * w[..., None], count, reg_covar)
        weights, means, var = (torch.where(active[:, None], n, o) for n, o in zip(new, (weights, means, var)))
        converged = active & ((new_lower - lower).abs() < tol)
        lower = torch.where(active, new_lower, lower)
        active = active & ~converged
        if not active.any():
            break
    top2 = means.sort(dim=1, descending=True).values[:, :2]
    out = torch.full((b,), torch.inf, dtype=torch.float64, device=x.device)
    out[fit] = top2.mean(1)  # for 2 components the paper's mean of the two means
    return out


def _kmeans_labels(x: torch.Tensor, w: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """sklearn's initialisation of GaussianMixture exactly: KMeans(k, n_init=1) seeded by `seed` on each
    row's valid values (1-D k-means on the CPU is cheap: 0.1 s for a 512x512 map, an eighth of
    sklearn's whole fit); (B, N) labels, 0 on invalid cells (their weight is 0)."""
    from sklearn.cluster import KMeans

    xs, ws = x.cpu().numpy(), w.cpu().numpy() > 0
    labels = np.zeros(xs.shape, dtype=np.int64)
    for i in range(len(xs)):
        labels[i, ws[i]] = KMeans(n_clusters=k, n_init=1, random_state=np.random.RandomState(seed)).fit(
            xs[i, ws[i]].reshape(-1, 1)).labels_
    return torch.from_numpy(labels).to(x.device)


def _m_step(x: torch.Tensor, resp: torch.Tensor, count: torch.Tensor, reg_covar: float):
    """sklearn's _estimate_gaussian_parameters for one feature; weights normalised to sum to 1."""
    nk = resp.sum(1) + 10 * torch.finfo(x.dtype).eps  # (B, K)
    means = (resp * x[..., None]).sum(1) / nk
    var = (resp * (x[..., None] - means[:, None]) ** 2).sum(1) / nk + reg_covar
    return nk / nk.sum(1, keepdim=True), means, var


def orphan_filter(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote: a pixel is foreground when at least half of its 3x3 neighbourhood is."""
    return ndimage.uniform_filter(np.asarray(mask, dtype=np.float32), size=3) >= 0.5


def orphan_filter_torch(masks: torch.Tensor) -> torch.Tensor:
    """`orphan_filter` of each (H, W) mask of (B, H, W): at least 5 of the 9 cells around a pixel (scipy's
    uniform_filter >= 0.5 with its edge-repeating border), counted in integers."""
    count = F.avg_pool2d(F.pad(masks[:, None].float(), (1, 1, 1, 1), mode="replicate"), 3, stride=1, divisor_override=1)
    return count[:, 0] >= 5


def binarize(values: np.ndarray, valid: np.ndarray | None = None, orphan: bool = True, seed: int = 0,
             components: int = 2, method: str = "sklearn", device: str | torch.device | None = None) -> np.ndarray:
    """Foreground = above the GMM threshold (fitted on the `valid` cells only); then the orphan filter.

    `method="torch"` fits on `device` (default: the CPU); the result is a numpy array either way."""
    if method == "torch":
        t = torch.as_tensor(np.asarray(values), device=device)
        return binarize_maps(t[None], None if valid is None else np.asarray(valid)[None], orphan, seed, components, "torch")[0]
    if method != "sklearn":
        raise ValueError(f"unknown GMM method {method!r}; use one of {', '.join(GMM_METHODS)}")
    values = np.asarray(values)
    valid = np.ones(values.shape, dtype=bool) if valid is None else valid
    _check_finite(values[valid])
    mask = (values > gmm_threshold(values[valid], seed, components)) & valid
    return orphan_filter(mask) & valid if orphan else mask


def binarize_maps(maps: torch.Tensor, valid: np.ndarray | None = None, orphan: bool = True, seed: int = 0,
                  components: int = 2, method: str = "sklearn") -> np.ndarray:
    """`binarize` of each map of (B, H, W) `maps` (a tensor on any device), (B, H, W) bool numpy. "torch"
    fits every map at once on the maps' device; "sklearn" one by one on the CPU."""
    if method == "sklearn":
        arrays = maps.detach().float().cpu().numpy()
        return np.stack([binarize(a, None if valid is None else valid[i], orphan, seed, components) for i, a in enumerate(arrays)])
    if method != "torch":
        raise ValueError(f"unknown GMM method {method!r}; use one of {', '.join(GMM_METHODS)}")
    b = maps.shape[0]
    ok = torch.ones(maps.shape, dtype=torch.bool, device=maps.device) if valid is None else torch.as_tensor(valid, device=maps.device)
    finite = torch.isfinite(maps) | ~ok
    if not finite.all():
        _check_finite(maps[ok].cpu().numpy())
    threshold = gmm_thresholds_torch(maps.reshape(b, -1), ok.reshape(b, -1), seed, components)
    # compared in the maps' dtype, as numpy compares a float32 map with sklearn's Python-float threshold
    mask = (maps > threshold.to(maps.dtype)[:, None, None]) & ok
    if orphan:
        mask = orphan_filter_torch(mask) & ok
    return mask.cpu().numpy()


def _check_finite(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        from conceptseg.geometry import NonFiniteError

        raise NonFiniteError(f"the map holds {int((~np.isfinite(values)).sum())} NaN or infinite values")
