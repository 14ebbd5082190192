"""Stage 1: preliminary masks M_pre from cross-attention and a GMM threshold (METHOD.md §1).

For each image: encode to latents z0; for each of the T0 smallest timesteps of the 50-step DDIM
grid (1, 21, ..., 781 for T0 = 40) draw fresh noise and form z_t = sqrt(abar_t) z0 +
sqrt(1 - abar_t) eps; one conditional UNet pass with "a photo of a {concept}"; average the
concept token's head-averaged cross-attention over every layer (nearest-upsampled to the latent
grid) and every timestep. The raw map is binarised by a 2-component GMM threshold and a 3x3
orphan filter. The (image, timestep) rows of several images share UNet batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from conceptseg.attention import capture_cross_attention
from conceptseg.geometry import Canvas, load_rgb, to_rgb
from conceptseg.io import Manifest, list_images, process_images, save_mask_png, save_npy
from conceptseg.models import DiffusionModel
from conceptseg.thresholding import binarize
from conceptseg.tokenizer import concept_token_positions


def timestep_grid(t0: int = 40, num_inference_steps: int = 50, num_train_timesteps: int = 1000, offset: int = 1) -> list[int]:
    """The t0 smallest timesteps of the DDIM-uniform grid (t = 1, 21, ..., 981 for 50 of 1000 steps)."""
    ratio = num_train_timesteps // num_inference_steps
    grid = [k * ratio + offset for k in range(num_inference_steps)]
    if not 1 <= t0 <= len(grid):
        raise ValueError(f"T0 must be between 1 and {len(grid)}, got {t0}")
    return grid[:t0]


@dataclass
class PrelimConfig:
    concept: Sequence[str]  # word(s) whose maps are summed, e.g. ("human", "arms", "legs")
    prompt: str | None = None  # default "a photo of a {first word}"
    steps: int = 40  # T0
    batch_size: int = 40  # UNet rows per forward pass (default: one image's T0 rows); images may share a batch
    seed: int = 0
    orphan_filter: bool = True
    gmm_components: int = 2  # the paper's 2; 3 for chest radiographs (background, chest, lesion)

    def __post_init__(self):
        self.concept = [self.concept] if isinstance(self.concept, str) else list(self.concept)
        if not self.concept:
            raise ValueError("give at least one concept word")
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if self.gmm_components < 2:
            raise ValueError(f"gmm_components must be at least 2, got {self.gmm_components}")

    @property
    def full_prompt(self) -> str:
        return self.prompt or f"a photo of a {self.concept[0]}"


@dataclass
class PrelimResult:
    attention: np.ndarray  # raw averaged map over the padded canvas, latent resolution, float32
    mask_latent: np.ndarray  # M_pre on the latent grid (False in the padding)
    mask: np.ndarray  # M_pre at the original image size
    canvas: Canvas = field(repr=False)


def image_noise(seed: int, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise that depends only on (seed, image key): the same in any batch, order, process or device."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))


def attention_maps(model: DiffusionModel, latents: torch.Tensor, cond: torch.Tensor, token_groups: Sequence[Sequence[int]],
                   timesteps: Sequence[int], noise: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean over layers and timesteps of each token group's map: (N images, G groups, h, w), float32.

    latents (N, C, h, w); noise (N, T, C, h, w); cond (1, 77, D) text embedding of the prompt.
    """
    return _mean_maps(model, latents, cond, token_groups, timesteps, noise, batch_size, per_level=False)["all"]


def attention_maps_by_level(model: DiffusionModel, latents: torch.Tensor, cond: torch.Tensor,
                            token_groups: Sequence[Sequence[int]], timesteps: Sequence[int], noise: torch.Tensor,
                            batch_size: int) -> dict[str, torch.Tensor]:
    """As `attention_maps`, but averaged over each UNet resolution's layers separately, keyed by the
    attention grid ("32x32", "16x16", ...): a diagnostic of which levels localise (stage 1 itself
    averages every layer with equal weight)."""
    return _mean_maps(model, latents, cond, token_groups, timesteps, noise, batch_size, per_level=True)


@torch.no_grad()
def _mean_maps(model: DiffusionModel, latents: torch.Tensor, cond: torch.Tensor, token_groups: Sequence[Sequence[int]],
               timesteps: Sequence[int], noise: torch.Tensor, batch_size: int, per_level: bool) -> dict[str, torch.Tensor]:
    n, t_count = latents.shape[0], len(timesteps)
    abar = model.alphas_cumprod.to(latents.device, torch.float32)
    t_all = torch.tensor(timesteps, device=latents.device)
    rows = [(i, j) for i in range(n) for j in range(t_count)]
    totals: dict[str, torch.Tensor] = {}
    with capture_cross_attention(model.unet, token_groups, tuple(latents.shape[-2:]), per_level=per_level) as store:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            img = torch.tensor([i for i, _ in chunk], device=latents.device)
            step = torch.tensor([j for _, j in chunk], device=latents.device)
            t = t_all[step]
            a = abar[t].view(-1, 1, 1, 1)
            eps = noise[img.cpu(), step.cpu()].to(latents.device, torch.float32)
            zt = a.sqrt() * latents[img].float() + (1 - a).sqrt() * eps
            model.unet(zt.to(model.dtype), t, cond.expand(len(chunk), -1, -1)).sample
            means = store.pop_level_means() if per_level else {"all": store.pop_mean()}
            for key, m in means.items():
                if key not in totals:
                    totals[key] = torch.zeros(n, *m.shape[1:], device=latents.device)
                totals[key].index_add_(0, img, m)
    return {key: total / t_count for key, total in totals.items()}


class PrelimRunner:
    """Stage 1 for a model and a config: images in, PrelimResults out."""

    def __init__(self, model: DiffusionModel, config: PrelimConfig):
        self.model, self.config = model, config
        self.token_groups = concept_token_positions(model.tokenizer, config.full_prompt, config.concept)
        self.timesteps = timestep_grid(config.steps, offset=model.scheduler.config.get("steps_offset", 1) or 0)
        self.cond = model.encode_prompts([config.full_prompt])

    def encode(self, images: Sequence[Image.Image], keys: Sequence[str]) -> tuple[list[Canvas], torch.Tensor, torch.Tensor]:
        """Stage 1's inputs: each image's canvas, its latents (N, C, h, w) and its noise (N, T, C, h, w)."""
        canvases = [Canvas(im.width, im.height, self.model.resolution) for im in images]
        latents = self.model.encode_images(np.stack([c.place(to_rgb(im)) for c, im in zip(canvases, images)]))
        noise = torch.stack([image_noise(self.config.seed, k, (len(self.timesteps), *latents.shape[1:])) for k in keys])
        return canvases, latents, noise

    def __call__(self, images: Sequence[Image.Image], keys: Sequence[str]) -> list[PrelimResult]:
        m, cfg = self.model, self.config
        lat = m.latent_resolution
        canvases, latents, noise = self.encode(images, keys)
        maps = attention_maps(m, latents, self.cond, self.token_groups, self.timesteps, noise, cfg.batch_size)
        maps = maps.sum(1).cpu().numpy().astype(np.float32)  # several words: their maps are summed
        results = []
        for canvas, amap in zip(canvases, maps):
            valid = canvas.valid(lat)
            mask_latent = binarize(amap, valid, orphan=cfg.orphan_filter, seed=cfg.seed, components=cfg.gmm_components)
            results.append(PrelimResult(amap, mask_latent, canvas.restore(mask_latent), canvas))
        return results


def preliminary_masks(model: DiffusionModel, images: Sequence[Image.Image | np.ndarray | str | Path],
                      concept: str | Sequence[str], **options) -> list[PrelimResult]:
    """Python API of stage 1: M_pre (and the raw attention map) for each image."""
    runner = PrelimRunner(model, PrelimConfig(concept, **options))
    pil, keys = [], []
    for i, im in enumerate(images):
        if isinstance(im, (str, Path)):
            pil.append(load_rgb(im))
            keys.append(Path(im).stem)
        else:
            pil.append(Image.fromarray(im) if isinstance(im, np.ndarray) else im)
            keys.append(str(i))
    per_batch = max(1, runner.config.batch_size // len(runner.timesteps))
    return [r for s in range(0, len(pil), per_batch) for r in runner(pil[s : s + per_batch], keys[s : s + per_batch])]


def run_prelim(model: DiffusionModel, images: str | Path | Sequence[Path], out: Path, config: PrelimConfig,
               overwrite: bool = False, progress: bool = True, shard: tuple[int, int] = (0, 1), split: str = "all") -> dict:
    """The `prelim` command: OUT/attention/<stem>.npy, OUT/masks/<stem>.png, OUT/manifest.json.

    Images whose outputs exist are skipped (unless `overwrite`); unreadable images are reported
    by name, recorded in the manifest and skipped. `shard=(k, n)` takes every n-th image from k.
    """
    out = Path(out)
    files = list_images(images, split)[shard[0] :: shard[1]]
    settings = {**asdict(config), "prompt": config.full_prompt, "model": model.source, "dtype": str(model.dtype).replace("torch.", "")}
    settings.pop("batch_size")  # does not change the outputs
    if config.gmm_components == 2:
        settings.pop("gmm_components")  # the paper's default: folders made before the option still resume
    manifest = Manifest.open(out, "prelim", settings, overwrite, shard)
    runner = PrelimRunner(model, config)

    def is_done(p: Path) -> bool:
        return (out / "masks" / f"{p.stem}.png").exists() and (out / "attention" / f"{p.stem}.npy").exists()

    def process(names: list[Path], images: list[Image.Image]) -> None:
        for p, res in zip(names, runner(images, [p.stem for p in names])):
            save_npy(out / "attention" / f"{p.stem}.npy", res.attention)
            save_mask_png(out / "masks" / f"{p.stem}.png", res.mask)
            manifest.record(p.name, "done", foreground=round(float(res.mask.mean()), 4))

    per_batch = max(1, config.batch_size // len(runner.timesteps))
    return process_images(files, manifest, per_batch, is_done, load_rgb, process, overwrite, progress)
