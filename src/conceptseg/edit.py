"""The method's generative side (METHOD.md §3-4) as editing tools.

`remove`: the concept removed. The fine-tuned model inpaints the masked region with the
background prompt (`inpaint.inpaint_background`, as stage 3 does to make x_bg), and its result is
pasted back at the ORIGINAL size inside the mask grown by `grow` pixels (to cover the object's
fringe); every other pixel is the input's own.

`composite`: the cut-out over a new background: a given picture, or one the (fine-tuned) model
generates from the background prompt, one per image, fitted to the image's size.

Masks come from a folder of <key>.png masks (e.g. refine's OUT/masks, or segment's) or from a
trained segmenter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy import ndimage

from conceptseg.cutout import alpha_of, fit, load_background, over
from conceptseg.families.base import DiffusionModel
from conceptseg.geometry import Canvas, load_image_and_mask, load_rgb
from conceptseg.inpaint import BACKGROUND_PROMPT, inpaint_background, sample_latents
from conceptseg.data.readers import Sample, list_samples
from conceptseg.io import Manifest, process_images, save_png
from conceptseg.models import warn_if_not_toy_world
from conceptseg.settings import execution_setting, output_settings, stage_settings


@dataclass
class EditConfig:
    prompt: str = BACKGROUND_PROMPT  # what the model inpaints / generates
    steps: int = 50
    guidance: float = 1.0  # the paper: 1; above 1, guided away from `concept_prompt` (remove) or "" (composite)
    concept_prompt: str | None = None
    sampler: str = "ddim"
    grow: int = 3  # remove: pixels the mask is grown by before pasting the inpainting
    feather: float = 0.0  # composite: Gaussian blur (pixels) of the alpha edge; 0 = hard edge
    seed: int = 0
    batch_size: int = execution_setting(4)


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:edit:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=pixels) if pixels > 0 and mask.any() else mask


def covering_latent_mask(mask: np.ndarray, canvas: Canvas, factor: int) -> np.ndarray:
    """Every latent cell that touches the mask (on the canvas): the inpainted region must cover all of it."""
    full = canvas.place_mask(mask)
    lat = canvas.size // factor
    return full.reshape(lat, factor, lat, factor).any(axis=(1, 3))


def remove(model: DiffusionModel, images: Sequence[Image.Image], masks: Sequence[np.ndarray], keys: Sequence[str],
           config: EditConfig = EditConfig()) -> list[np.ndarray]:
    """Each image (uint8 RGB, original size) with the masked object replaced by inpainted background."""
    warn_if_not_toy_world(model, [im.size for im in images])
    f, res = model.vae_scale_factor, model.resolution
    canvases = [Canvas(im.width, im.height, res) for im in images]
    regions = [grown(np.asarray(m, bool), config.grow) for m in masks]
    pixels = np.stack([c.place(im.convert("RGB")) for c, im in zip(canvases, images)])
    m_lat = torch.from_numpy(np.stack([covering_latent_mask(r, c, f) for r, c in zip(regions, canvases)]))
    z = inpaint_background(model, model.encode_images(pixels), m_lat, config.prompt, steps=config.steps,
                           guidance=config.guidance, negative_prompt=config.concept_prompt, sampler=config.sampler,
                           generator=[_generator(config.seed, k) for k in keys])
    out = []
    for im, canvas, region, background in zip(images, canvases, regions, model.decode_latents(z)):
        out.append(np.where(region[..., None], canvas.restore_image(background), np.asarray(im.convert("RGB"))))
    return out


def generate_backgrounds(model: DiffusionModel, keys: Sequence[str], config: EditConfig = EditConfig()) -> list[Image.Image]:
    """One background per key from the background prompt, at the model's resolution; a key's
    background does not depend on the batch it is made in."""
    gens = [_generator(config.seed, k) for k in keys]
    z = sample_latents(model, config.prompt, len(keys), steps=config.steps, guidance=config.guidance,
                       sampler=config.sampler, generator=gens)
    return [Image.fromarray(b) for b in model.decode_latents(z)]


def composite(image: Image.Image, mask: np.ndarray, background: Image.Image, feather: float = 0.0) -> tuple[Image.Image, np.ndarray]:
    """(the object over `background` fitted to the image's size, the alpha in [0, 1] it used)."""
    alpha = alpha_of(mask)
    if feather > 0:
        alpha = np.asarray(Image.fromarray(alpha, mode="L").filter(ImageFilter.GaussianBlur(feather)))
    a = alpha.astype(np.float32) / 255
    return over(image, a, fit(background, image.size)), a


class MaskSource:
    """Masks for a batch of images: <key>.png from a folder, or a segmenter's predictions."""

    def __init__(self, masks: str | Path | None = None, segmenter=None):
        if (masks is None) == (segmenter is None):
            raise ValueError("give either a masks folder or a segmenter")
        self.folder, self.segmenter = (Path(masks) if masks is not None else None), segmenter
        if self.folder is not None and not self.folder.is_dir():
            raise FileNotFoundError(f"masks folder {self.folder} does not exist")

    def load(self, sample: Sample) -> tuple[Image.Image, np.ndarray | None]:
        if self.folder is None:
            return load_rgb(sample.image), None
        return load_image_and_mask(sample.image, self.folder / f"{sample.key}.png")

    def fill(self, loaded: list[tuple[Image.Image, np.ndarray | None]]) -> tuple[list[Image.Image], list[np.ndarray]]:
        images = [im for im, _ in loaded]
        masks = [m for _, m in loaded]
        if self.segmenter is not None:
            masks = self.segmenter.masks(images)
        return images, masks

    def describe(self) -> str:
        return str(self.folder.resolve()) if self.folder is not None else f"segmenter (input size {self.segmenter.input_size})"


def run_remove(model: DiffusionModel, images, masks: MaskSource, out: Path, config: EditConfig, overwrite: bool = False,
               progress: bool = True, split: str = "all", shard: tuple[int, int] = (0, 1)) -> dict:
    """`conceptseg remove`: OUT/removed/<key>.png (original size), OUT/manifest.json; resumable."""
    out = Path(out)
    samples = list_samples(images, split)[shard[0] :: shard[1]]
    settings = stage_settings(config, out, model=model.source, masks=masks.describe())
    settings.pop("feather")  # composite's
    manifest = Manifest.open(out, "remove", settings, overwrite, shard, outputs=("removed",))

    def process(batch: list[Sample], loaded: list) -> None:
        ims, ms = masks.fill(loaded)
        for s, mask, result in zip(batch, ms, remove(model, ims, ms, [s.key for s in batch], config)):
            save_png(out / "removed" / f"{s.key}.png", result)
            manifest.record(s.key, "done", removed=round(float(mask.mean()), 4))

    return process_images(samples, manifest, config.batch_size, lambda s: (out / "removed" / f"{s.key}.png").exists(),
                          masks.load, process, overwrite, progress)


def run_composite(images, masks: MaskSource, out: Path, config: EditConfig, background: str | Path | None = None,
                  model: DiffusionModel | None = None, overwrite: bool = False, progress: bool = True, split: str = "all",
                  shard: tuple[int, int] = (0, 1)) -> dict:
    """`conceptseg composite`: OUT/composites/<key>.png over `background`, or over a background
    `model` generates per image (kept in OUT/backgrounds/<key>.png); OUT/manifest.json."""
    if (background is None) == (model is None):
        raise ValueError("give either a background picture or a model to generate backgrounds with")
    out = Path(out)
    back = load_background(background) if background is not None else None
    samples = list_samples(images, split)[shard[0] :: shard[1]]
    generated = {k: getattr(config, k) for k in ("prompt", "steps", "guidance", "sampler", "seed")}
    settings = output_settings({"feather": config.feather, "masks": masks.describe(),
                                **({"background": Path(background).resolve()} if back is not None else
                                   {"model": model.source, **generated})}, out.parent)
    manifest = Manifest.open(out, "composite", settings, overwrite, shard, outputs=("composites", "backgrounds"))

    def process(batch: list[Sample], loaded: list) -> None:
        ims, ms = masks.fill(loaded)
        backs = [back] * len(ims) if back is not None else generate_backgrounds(model, [s.key for s in batch], config)
        for s, image, mask, b in zip(batch, ims, ms, backs):
            if back is None:
                save_png(out / "backgrounds" / f"{s.key}.png", b)
            result, _ = composite(image, mask, b, config.feather)
            save_png(out / "composites" / f"{s.key}.png", result)
            manifest.record(s.key, "done", foreground=round(float(mask.mean()), 4))

    return process_images(samples, manifest, config.batch_size, lambda s: (out / "composites" / f"{s.key}.png").exists(),
                          masks.load, process, overwrite, progress)
