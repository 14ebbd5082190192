"""Generation quality as the paper reports it: FID of D' against D.

The Frechet distance is computed here; the features come from the field's standard InceptionV3
(torch-fidelity's "inception-v3-compat", the TF-FID port), which needs `pip install torch-fidelity`
and its weights file. Offline, pass the weights with `--inception-weights`; without them the
command says exactly what is missing instead of trying a download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import linalg

from conceptseg.data.readers import list_samples

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the usual jitter when S1 S2 is singular."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_features(images: list[Path], weights: Path | None, batch_size: int = 50, device: str = "cpu") -> np.ndarray:
    """2048-d pool features of the standard FID InceptionV3, images resized to 299 by the extractor."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise RuntimeError(f"FID needs torch-fidelity (pip install 'conceptseg[fid]'): {e}") from None
    if weights is None or not Path(weights).exists():
        raise RuntimeError(f"FID needs the InceptionV3 weights file {INCEPTION_WEIGHTS} (torch-fidelity's "
                           "'inception-v3-compat'); this machine cannot download it: pass --inception-weights PATH")
    import torch

    from conceptseg.geometry import load_rgb

    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)).to(device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        batch = np.stack([np.asarray(load_rgb(p).resize((299, 299))) for p in images[s : s + batch_size]])
        with torch.no_grad():
            out.append(extractor(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device))[0].cpu().numpy())
    return np.concatenate(out)


def fid(real, fake, weights: Path | None, device: str = "cpu") -> float:
    real_stats = statistics(inception_features([s.image for s in list_samples(real)], weights, device=device))
    fake_stats = statistics(inception_features([s.image for s in list_samples(fake)], weights, device=device))
    return frechet_distance(*real_stats, *fake_stats)
