"""Stage 3: refined masks M = up(M_pre) * g(|x - x_bg|) (METHOD.md §3).

x_bg is the image with M_pre's region inpainted by the fine-tuned model and the background prompt
(`inpaint.inpaint_background`), or, for the paper's ablation M_crop, by the largest background
strip beside the foreground mirrored over it. |.| is the per-pixel mean over RGB of the absolute
difference at the model's image resolution; g is stage 1's GMM threshold + orphan filter; `up`
is nearest upsampling of M_pre from the latent grid. Everything is mapped back to the original size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from conceptseg.families.base import DiffusionModel
from conceptseg.geometry import Canvas, load_image_and_mask
from conceptseg.inpaint import BACKGROUND_PROMPT, inpaint_background
from conceptseg.data.readers import Sample, list_samples
from conceptseg.io import Manifest, process_images, save_mask_png, save_png
from conceptseg.models import warn_if_not_toy_world
from conceptseg.settings import added_setting, execution_setting, stage_settings
from conceptseg.thresholding import GMM_METHODS, binarize

INPAINTERS = ("model", "crop")
DIFFERENCES = ("color", "local_stats")


@dataclass
class RefineConfig:
    prompt: str = BACKGROUND_PROMPT
    steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0
    concept_prompt: str | None = None  # for guidance != 1: steer away from this prompt
    sampler: str = "ddim"  # "ddim" (on SD 3.x / FLUX.1: the flow's Euler solver) or "dpm++" (DDPM models)
    samples: int = 1  # K inpaintings per image; their difference maps are averaged
    inpainter: str = "model"  # "model" (the method) or "crop" (the paper's M_crop ablation)
    postprocess: bool = False  # binary closing then fill holes (scipy defaults)
    # |x - x_bg| with x the image (the paper), or "reconstruction": the VAE's decoding of x, so the
    # VAE's own reconstruction error (large for small VAEs) does not count as foreground
    difference_to: str = "image"
    # x_bg outside M_pre's region: the decoded latents (the paper), or the image itself pasted back
    # (`overlay`, as diffusers' inpainting pipelines do with `apply_overlay`): the VAE decoder's
    # GroupNorm and attention carry the hole's content into the whole picture, so outside the hole the
    # decoding differs from x by more than its reconstruction error, which raises the GMM's threshold
    overlay: bool = added_setting(False)
    # how x and x_bg are compared (`difference_map`): "color", the per-pixel mean over RGB of |x - x_bg|
    # (the paper), or "local_stats", the difference of local mean and standard deviation per channel
    # over a `window` x `window` neighbourhood, in which one texture replaced by a similar one barely differs
    difference: str = added_setting("color")
    window: int = added_setting(5)  # for "local_stats"
    # the K samples' difference maps: "mean" (averaged), or "min": a pixel differs only where it differs
    # from every inpainting, so background that one sample happens to redraw differently is not foreground
    aggregate: str = added_setting("mean")
    batch_size: int = execution_setting(4)  # images per inpainting batch
    seed: int = 0
    gmm: str = execution_setting("sklearn")  # g's GMM fit: "sklearn" or "torch" (equal to rounding: thresholding.py)

    def __post_init__(self):
        if self.inpainter not in INPAINTERS:
            raise ValueError(f"inpainter must be one of {INPAINTERS}, not {self.inpainter!r}")
        if self.samples < 1:
            raise ValueError("samples must be at least 1")
        if self.guidance != 1.0 and self.concept_prompt is None and self.inpainter == "model":
            raise ValueError(f"guidance {self.guidance} needs concept_prompt (--concept-prompt): the prompt to guide away "
                             "from; guidance 1 (the paper) needs none")
        if self.gmm not in GMM_METHODS:
            raise ValueError(f"gmm must be one of {GMM_METHODS}, not {self.gmm!r}")
        if self.difference_to not in ("image", "reconstruction"):
            raise ValueError(f"difference_to must be 'image' or 'reconstruction', not {self.difference_to!r}")
        if self.difference not in DIFFERENCES:
            raise ValueError(f"difference must be one of {DIFFERENCES}, not {self.difference!r}")
        if self.aggregate not in ("mean", "min"):
            raise ValueError(f"aggregate must be 'mean' or 'min', not {self.aggregate!r}")


@dataclass
class RefineResult:
    mask: np.ndarray  # M at the original size
    background: np.ndarray  # x_bg at the original size, uint8 RGB (the first sample)
    difference: np.ndarray  # |x - x_bg| over the canvas, float32, image resolution
    canvas: Canvas


def latent_mask(mask: np.ndarray, canvas: Canvas, factor: int) -> np.ndarray:
    """A mask at the original size onto the canvas's latent grid (factor x factor mean-pool + round)."""
    full = canvas.place_mask(mask).astype(np.float32)
    lat = canvas.size // factor
    return np.round(full.reshape(lat, factor, lat, factor).mean(axis=(1, 3))) >= 1


def upsample(mask_latent: np.ndarray, factor: int) -> np.ndarray:
    return np.kron(mask_latent.astype(np.uint8), np.ones((factor, factor), np.uint8)).astype(bool)


def crop_inpaint(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """M_crop's background: the largest background strip beside the region's bounding box, mirrored over it."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return image.copy()
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = region.shape
    strips = {"left": x0 * h, "right": (w - 1 - x1) * h, "top": y0 * w, "bottom": (h - 1 - y1) * w}
    side = max(strips, key=strips.get)
    if strips[side] == 0:
        return image.copy()

    def mirror(i: np.ndarray, edge_lo: int, edge_hi: int, n: int, towards_low: bool) -> np.ndarray:
        # reflect indices across the strip's edge, bouncing inside the strip when the box is wider
        width = edge_lo if towards_low else n - 1 - edge_hi
        d = (i - edge_lo) if towards_low else (edge_hi - i)
        d = d % (2 * width)
        d = np.where(d >= width, 2 * width - 1 - d, d)
        return edge_lo - 1 - d if towards_low else edge_hi + 1 + d

    rows, cols = np.mgrid[:h, :w]
    if side in ("left", "right"):
        cols = mirror(cols, x0, x1, w, side == "left")
    else:
        rows = mirror(rows, y0, y1, h, side == "top")
    filled = image[rows, cols]
    return np.where(region[..., None], filled, image)


def _generators(seed: int, keys: list[str], sample: int) -> list[torch.Generator]:
    out = []
    for k in keys:
        digest = hashlib.sha256(f"{seed}:{sample}:{k}".encode()).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
    return out


def difference_map(x: np.ndarray, background: np.ndarray, kind: str = "color", window: int = 5) -> np.ndarray:
    """(..., H, W, 3) images -> (..., H, W) float32 difference (`RefineConfig.difference`)."""
    x, background = x.astype(np.float32), background.astype(np.float32)
    if kind == "color":
        return np.abs(x - background).mean(-1)
    if kind != "local_stats":
        raise ValueError(f"difference must be one of {DIFFERENCES}, not {kind!r}")
    size = (1,) * (x.ndim - 3) + (window, window, 1)  # over H and W only

    def mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = ndimage.uniform_filter(a, size, mode="reflect")
        return mean, np.sqrt(np.maximum(ndimage.uniform_filter(a * a, size, mode="reflect") - mean * mean, 0))

    (mx, sx), (mb, sb) = mean_std(x), mean_std(background)
    return (np.abs(mx - mb) + np.abs(sx - sb)).mean(-1)


class Refiner:
    """Stage 3 for a (fine-tuned) model and a config: images + M_pre in, RefineResults out."""

    def __init__(self, model: DiffusionModel | None, config: RefineConfig, resolution: int | None = None, factor: int | None = None):
        if config.inpainter == "model" and model is None:
            raise ValueError("the model inpainter needs a fine-tuned model")
        self.model, self.config = model, config
        self.resolution = resolution or model.resolution
        self.factor = factor or model.vae_scale_factor

    def __call__(self, images: list[Image.Image], prelim_masks: list[np.ndarray], keys: list[str]) -> list[RefineResult]:
        cfg, f = self.config, self.factor
        if self.model is not None:
            warn_if_not_toy_world(self.model, [im.size for im in images])
        canvases = [Canvas(im.width, im.height, self.resolution) for im in images]
        pixels = np.stack([c.place(im) for c, im in zip(canvases, images)])
        m_lat = np.stack([latent_mask(m, c, f) for m, c in zip(prelim_masks, canvases)])
        regions = np.stack([upsample(m, f) for m in m_lat])
        backgrounds = []  # per sample: (N, S, S, 3) uint8
        reference = pixels  # what x_bg is compared with: the image x (the paper)
        if cfg.inpainter == "crop":
            backgrounds.append(np.stack([crop_inpaint(p, r) for p, r in zip(pixels, regions)]))
        else:
            z0 = self.model.encode_images(pixels)
            if cfg.difference_to == "reconstruction":
                reference = self.model.decode_latents(z0)
            for k in range(cfg.samples):
                z = inpaint_background(self.model, z0, torch.from_numpy(m_lat), cfg.prompt, steps=cfg.steps, eta=cfg.eta,
                                       guidance=cfg.guidance, negative_prompt=cfg.concept_prompt, sampler=cfg.sampler,
                                       generator=_generators(cfg.seed, keys, k))
                decoded = self.model.decode_latents(z)
                backgrounds.append(np.where(regions[..., None], decoded, pixels) if cfg.overlay else decoded)
        maps = [difference_map(reference, b, cfg.difference, cfg.window) for b in backgrounds]
        diffs = np.min(maps, axis=0) if cfg.aggregate == "min" else np.mean(maps, axis=0)
        results = []
        for i, canvas in enumerate(canvases):
            valid = canvas.valid(self.resolution)
            mask = regions[i] & binarize(diffs[i], valid, seed=cfg.seed, method=cfg.gmm,
                                         device=self.model.device if self.model is not None else None)
            if cfg.postprocess:
                mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask))
            results.append(RefineResult(canvas.restore(mask), canvas.restore_image(backgrounds[0][i]), diffs[i].astype(np.float32), canvas))
        return results


def prelim_geometry(prelim_dir: Path) -> tuple[int, int]:
    """(canvas resolution, latent factor) that stage 1 wrote its masks with, from its manifest."""
    path = Path(prelim_dir) / "manifest.json"
    geometry = json.loads(path.read_text()).get("geometry") if path.exists() else None
    if not geometry:
        raise FileNotFoundError(f"{path} is missing or records no geometry: run `conceptseg prelim` into {prelim_dir} first")
    return geometry["resolution"], geometry["vae_scale_factor"]


def outputs_done(out: Path, key: str) -> bool:
    """Whether stage 3's outputs for `key` are in `out` (its mask and inpainted background)."""
    return (Path(out) / "masks" / f"{key}.png").exists() and (Path(out) / "background" / f"{key}.png").exists()


def run_refine(model: DiffusionModel | None, images: str | Path | Sequence, prelim_dir: Path, out: Path, config: RefineConfig,
               overwrite: bool = False, progress: bool = True, shard: tuple[int, int] = (0, 1), split: str = "all") -> dict:
    """The `refine` command: OUT/masks/<key>.png, OUT/background/<key>.png, OUT/manifest.json; resumable.

    The crop inpainter (M_crop) needs no model: it works on stage 1's canvas, read from its manifest."""
    out = Path(out)
    samples = list_samples(images, split)[shard[0] :: shard[1]]
    settings = stage_settings(config, out, model=model.source if model is not None else None, prelim=Path(prelim_dir))
    manifest = Manifest.open(out, "refine", settings, overwrite, shard, outputs=("masks", "background"))
    if model is None:
        resolution, factor = prelim_geometry(prelim_dir)
        refiner = Refiner(None, config, resolution=resolution, factor=factor)
    else:
        refiner = Refiner(model, config)

    def is_done(s: Sample) -> bool:
        return outputs_done(out, s.key)

    def load(s: Sample) -> tuple[Image.Image, np.ndarray]:
        return load_image_and_mask(s.image, Path(prelim_dir) / "masks" / f"{s.key}.png", "preliminary mask (run `conceptseg prelim` first)")

    def process(batch: list[Sample], loaded: list[tuple[Image.Image, np.ndarray]]) -> None:
        images, masks = [im for im, _ in loaded], [m for _, m in loaded]
        for s, prelim_mask, res in zip(batch, masks, refiner(images, masks, [s.key for s in batch])):
            save_png(out / "background" / f"{s.key}.png", res.background)
            save_mask_png(out / "masks" / f"{s.key}.png", res.mask)
            manifest.record(s.key, "done", foreground=round(float(res.mask.mean()), 4),
                            kept_of_prelim=round(float(res.mask.sum() / max(prelim_mask.sum(), 1)), 4))

    return process_images(samples, manifest, config.batch_size, is_done, load, process, overwrite, progress)
