"""Stage 1: preliminary masks M_pre from cross-attention and a GMM threshold (METHOD.md §1).

For each image: encode to latents z0; for each of the T0 smallest timesteps of the 50-step DDIM
grid (1, 21, ..., 781 for T0 = 40) draw fresh noise and form z_t = sqrt(abar_t) z0 +
sqrt(1 - abar_t) eps; one conditional UNet pass with "a photo of a {concept}"; average the
concept token's head-averaged cross-attention over every layer (nearest-upsampled to the latent
grid) and every timestep. The raw map is binarised by a 2-component GMM threshold and a 3x3
orphan filter. The (image, timestep) rows of several images share UNet batches.

The same averaging runs on SDXL, SD 3.x and FLUX.1 through the family's model object
(`conceptseg.families`: its conditioning, noise levels, noising, forward pass and capture; maps
on its finest attention grid); docs/families.md says what each family captures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conceptseg.data.readers import Sample, list_samples
from conceptseg.geometry import Canvas, load_rgb, to_rgb
from conceptseg.families.base import DiffusionModel
from conceptseg.concept_attention import MAP_KINDS, check_supports_concept_attention, embed_concepts, foreground_map
from conceptseg.io import Manifest, process_images, save_mask_png, save_npy
from conceptseg.joint_attention import NORMALISATIONS
from conceptseg.models import warn_if_not_toy_world
from conceptseg.schedules import SIGMA_GRIDS, timestep_grid  # noqa: F401  (timestep_grid: still importable from here)
from conceptseg.settings import added_setting, execution_setting, stage_settings
from conceptseg.thresholding import GMM_METHODS, binarize, binarize_maps


@dataclass
class PrelimConfig:
    concept: Sequence[str]  # word(s) whose maps are summed, e.g. ("human", "arms", "legs")
    prompt: str | None = None  # default "a photo of a {first word}"
    steps: int = 40  # T0
    batch_size: int = execution_setting(40)  # UNet rows per forward pass (default: one image's T0 rows); images may share a batch
    seed: int = 0
    orphan_filter: bool = True
    gmm_components: int = 2  # the paper's 2; 3 for chest radiographs (background, chest, lesion)
    # flow-matching families (SD 3.x, FLUX.1) only; docs/families.md
    sigma_grid: str = "sampler"  # T0 smallest sigmas of the default sampler's 50-step grid, or "uniform" k/50
    joint_attention: str = "text"  # image-to-text block renormalised over text keys, or "joint" softmax columns
    # "cross-attention" (the paper's; default) or "concept-attention" (ConceptAttention, SD 3.x / FLUX.1 only:
    # docs/concept_attention.md); there several words compete per pixel and the first is the foreground
    maps: str = added_setting("cross-attention")
    concept_layers: tuple[int, ...] | None = added_setting(None)  # concept-attention: joint blocks averaged (None: all; -1: the last)
    # the GMM fit: "sklearn" or "torch" (the same algorithm and k-means start, EM on the maps' device;
    # thresholds equal to rounding, so, like compile, not an output setting: thresholding.py)
    gmm: str = execution_setting("sklearn")
    # speed only (docs/speed.md): torch.compile of the denoiser pass with the capture; its mode
    # ("reduce-overhead": CUDA graphs, "max-autotune") and backend; UNet weights in channels_last
    compile: bool = execution_setting(False)
    compile_mode: str | None = execution_setting(None)
    compile_backend: str = execution_setting("inductor")
    channels_last: bool = execution_setting(False)

    def __post_init__(self):
        self.concept = [self.concept] if isinstance(self.concept, str) else list(self.concept)
        if not self.concept:
            raise ValueError("give at least one concept word")
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if self.gmm_components < 2:
            raise ValueError(f"gmm_components must be at least 2, got {self.gmm_components}")
        if self.sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"unknown sigma grid {self.sigma_grid!r}; use one of {', '.join(SIGMA_GRIDS)}")
        if self.joint_attention not in NORMALISATIONS:
            raise ValueError(f"unknown joint attention reading {self.joint_attention!r}; use one of {', '.join(NORMALISATIONS)}")
        if self.maps not in MAP_KINDS:
            raise ValueError(f"unknown map kind {self.maps!r}; use one of {', '.join(MAP_KINDS)}")
        if self.maps == "concept-attention" and self.compile:
            raise ValueError("compile is not available with concept-attention maps; drop --compile")
        if self.concept_layers is not None:
            self.concept_layers = tuple(int(i) for i in self.concept_layers)
        if self.gmm not in GMM_METHODS:
            raise ValueError(f"unknown GMM method {self.gmm!r}; use one of {', '.join(GMM_METHODS)}")

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


def attention_maps(model: DiffusionModel, latents: torch.Tensor, cond, token_groups: Sequence[Sequence[int]],
                   timesteps: Sequence, noise: torch.Tensor, batch_size: int, *, forward: Callable | None = None,
                   pad_to: int | None = None, channels_last: bool = False, **capture_options) -> torch.Tensor:
    """Mean over layers and timesteps of each token group's map: (N images, G groups, h, w), float32.

    latents (N, C, h, w); noise (N, T, C, h, w); cond the prompt's `model.text_conditioning` ((1, 77, D)
    text embedding for SD 1.x/2.x); timesteps the model's `noise_levels`; (h, w) the model's
    attention grid. capture_options: `normalisation` for joint-attention families.
    `forward`: a replacement for `rows_maps` (its `torch.compile`d form, `compiled_rows_maps`);
    `pad_to`: every pass gets exactly this many rows, a short last batch padded with copies of its
    last row whose maps are dropped (static shapes: no recompiling, CUDA graphs replay);
    `channels_last`: the noised latents in that layout (for a UNet whose weights are).
    """
    return _mean_maps(model, latents, cond, token_groups, timesteps, noise, batch_size, per_level=False,
                      forward=forward, pad_to=pad_to, channels_last=channels_last, **capture_options)["all"]


def rows_maps(model: DiffusionModel, store, noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """One denoiser pass over B noised rows under `model.capture_attention`'s `store`: the layer mean
    of the captured maps, (B, G, h, w).

    The store is reset and read inside this function, so under torch.compile the running sum over
    layers is traced into the graph and the maps leave as its return value: nothing written in the
    compiled region is read after it (compiled code need not write such state back, and a CUDA-graph
    replay reuses its output memory). The denoiser's own output is not used: the compiled graph drops
    the layers after the last captured one. The noising stays outside (the schedule's table is a CPU
    tensor, which would keep CUDA graphs off).
    """
    store.reset()
    model.denoise(noisy, t, cond)
    return store.pop_mean()


def compiled_rows_maps(mode: str | None = None, backend: str = "inductor") -> Callable:
    """`rows_maps` under torch.compile: one graph (fullgraph: a graph break is an error, not a silent
    slow path), static shapes (callers pad batches: `attention_maps(..., pad_to=)`)."""
    options = {"mode": mode} if mode is not None else {}
    return torch.compile(rows_maps, fullgraph=True, dynamic=False, backend=backend, **options)


def attention_maps_by_level(model: DiffusionModel, latents: torch.Tensor, cond: torch.Tensor,
                            token_groups: Sequence[Sequence[int]], timesteps: Sequence[int], noise: torch.Tensor,
                            batch_size: int) -> dict[str, torch.Tensor]:
    """As `attention_maps`, but averaged over each UNet resolution's layers separately, keyed by the
    attention grid ("32x32", "16x16", ...): a diagnostic of which levels localise (stage 1 itself
    averages every layer with equal weight)."""
    return _mean_maps(model, latents, cond, token_groups, timesteps, noise, batch_size, per_level=True)


@torch.no_grad()
def _mean_maps(model: DiffusionModel, latents: torch.Tensor, cond, token_groups: Sequence[Sequence[int]],
               timesteps: Sequence, noise: torch.Tensor, batch_size: int, per_level: bool,
               forward: Callable | None = None, pad_to: int | None = None, channels_last: bool = False,
               **capture_options) -> dict[str, torch.Tensor]:
    # `model`: any family's model (conceptseg.families); `timesteps`: its noise levels (sigmas for flow models)
    if per_level and forward is not None:
        raise ValueError("the per-level diagnostic runs eagerly only")
    forward = forward or rows_maps
    n, t_count = latents.shape[0], len(timesteps)
    t_all = torch.tensor(timesteps, device=latents.device)
    rows = [(i, j) for i in range(n) for j in range(t_count)]
    step_rows = min(batch_size, pad_to) if pad_to else batch_size
    totals: dict[str, torch.Tensor] = {}
    with model.capture_attention(token_groups, per_level=per_level, **capture_options) as store:
        for start in range(0, len(rows), step_rows):
            chunk = rows[start : start + step_rows]
            real = len(chunk)
            if pad_to:
                chunk = chunk + [chunk[-1]] * (pad_to - real)
            img = torch.tensor([i for i, _ in chunk], device=latents.device)
            step = torch.tensor([j for _, j in chunk], device=latents.device)
            t = t_all[step]
            eps = noise[img.cpu(), step.cpu()].to(latents.device, torch.float32)
            if per_level:
                model.denoise(model.add_noise(latents[img], eps, t), t, cond)
                means = store.pop_level_means()
            else:
                if forward is not rows_maps and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                    torch.compiler.cudagraph_mark_step_begin()  # the last pass's outputs were read: CUDA graphs may reuse them
                noisy = model.add_noise(latents[img], eps, t)
                if channels_last:
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                means = {"all": forward(model, store, noisy, t, cond)}
            for key, m in means.items():
                if key not in totals:
                    totals[key] = torch.zeros(n, *m.shape[1:], device=latents.device)
                totals[key].index_add_(0, img[:real], m[:real].float())  # padding rows dropped
    return {key: total / t_count for key, total in totals.items()}


class PrelimRunner:
    """Stage 1 for a model and a config: images in, PrelimResults out."""

    def __init__(self, model: DiffusionModel, config: PrelimConfig):
        self.model, self.config = model, config
        self.capture_options = {"normalisation": config.joint_attention}
        if config.maps == "concept-attention":
            check_supports_concept_attention(model)
            # one concept token per word: the groups index the concept tokens, not the prompt
            self.token_groups = [[i] for i in range(len(config.concept))]
            self.capture_options.update(maps=config.maps, concepts=embed_concepts(model, config.concept),
                                        concept_layers=config.concept_layers)
        else:
            self.token_groups = model.concept_token_positions(config.full_prompt, config.concept)
        self.timesteps = model.noise_levels(config.steps, config.sigma_grid)  # sigmas for flow models
        self.cond = model.text_conditioning(config.full_prompt)
        self.forward, self.pad_to = None, None
        if config.channels_last:
            if not hasattr(model, "unet"):
                raise ValueError(f"channels_last is for UNet denoisers; {model.describe()} has none")
            model.unet.to(memory_format=torch.channels_last)  # the same weights in another layout
        if config.compile:
            self.forward = compiled_rows_maps(config.compile_mode, config.compile_backend)
            # static shapes: every pass has the rows of a full call (`images_per_call` images) or batch_size rows
            self.pad_to = min(config.batch_size, self.images_per_call * len(self.timesteps))

    @property
    def images_per_call(self) -> int:
        """How many images one call takes so that their rows fill (at most) one batch."""
        return max(1, self.config.batch_size // len(self.timesteps))

    def encode(self, images: Sequence[Image.Image], keys: Sequence[str]) -> tuple[list[Canvas], torch.Tensor, torch.Tensor]:
        """Stage 1's inputs: each image's canvas, its latents (N, C, h, w) and its noise (N, T, C, h, w)."""
        canvases = [Canvas(im.width, im.height, self.model.resolution) for im in images]
        latents = self.model.encode_images(np.stack([c.place(to_rgb(im)) for c, im in zip(canvases, images)]))
        noise = torch.stack([image_noise(self.config.seed, k, (len(self.timesteps), *latents.shape[1:])) for k in keys])
        return canvases, latents, noise

    def __call__(self, images: Sequence[Image.Image], keys: Sequence[str]) -> list[PrelimResult]:
        m, cfg = self.model, self.config
        warn_if_not_toy_world(m, [im.size for im in images])
        lat = m.attention_resolution  # the latent grid for SD 1.x/2.x
        canvases, latents, noise = self.encode(images, keys)
        maps = attention_maps(m, latents, self.cond, self.token_groups, self.timesteps, noise, cfg.batch_size,
                              forward=self.forward, pad_to=self.pad_to, channels_last=cfg.channels_last,
                              **self.capture_options)
        valid = [c.valid(lat) for c in canvases]
        if cfg.maps == "concept-attention":  # the words compete (softmax) and the first is the foreground
            maps = foreground_map(maps, 1, len(cfg.concept) > 1, np.stack(valid))
        else:
            maps = maps.sum(1)  # several words: their maps are summed
        options = {"orphan": cfg.orphan_filter, "seed": cfg.seed, "components": cfg.gmm_components}
        if cfg.gmm == "torch":  # every map in one fit, where the maps are
            masks = list(binarize_maps(maps, np.stack(valid), method="torch", **options))
        maps = maps.cpu().numpy().astype(np.float32)
        if cfg.gmm == "sklearn":
            masks = [binarize(amap, v, **options) for amap, v in zip(maps, valid)]
        return [PrelimResult(amap, mask_latent, canvas.restore(mask_latent), canvas)
                for canvas, amap, mask_latent in zip(canvases, maps, masks)]


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
    per_batch = runner.images_per_call
    return [r for s in range(0, len(pil), per_batch) for r in runner(pil[s : s + per_batch], keys[s : s + per_batch])]


def outputs_done(out: Path, key: str) -> bool:
    """Whether stage 1's outputs for `key` are in `out` (its mask and map; the mask is written last)."""
    return (Path(out) / "masks" / f"{key}.png").exists() and (Path(out) / "attention" / f"{key}.npy").exists()


def run_prelim(model: DiffusionModel, images: str | Path | Sequence, out: Path, config: PrelimConfig,
               overwrite: bool = False, progress: bool = True, shard: tuple[int, int] = (0, 1), split: str = "all") -> dict:
    """The `prelim` command: OUT/attention/<key>.npy, OUT/masks/<key>.png, OUT/manifest.json.

    `images`: anything `list_samples` takes; each output is named by the sample's key. Images
    whose outputs exist are skipped (unless `overwrite`); unreadable images are reported by name,
    recorded in the manifest and skipped. `shard=(k, n)` takes every n-th image from k. The
    manifest's "geometry" tells later stages the canvas stage 1 used.
    """
    out = Path(out)
    samples = list_samples(images, split)[shard[0] :: shard[1]]
    settings = stage_settings(config, out, prompt=config.full_prompt, model=model.source, dtype=str(model.dtype).replace("torch.", ""))
    manifest = Manifest.open(out, "prelim", settings, overwrite, shard, outputs=("masks", "attention"))
    manifest.data["geometry"] = {"resolution": model.resolution, "vae_scale_factor": model.vae_scale_factor}
    runner = PrelimRunner(model, config)

    def is_done(s: Sample) -> bool:
        return outputs_done(out, s.key)

    def process(batch: list[Sample], images: list[Image.Image]) -> None:
        for s, res in zip(batch, runner(images, [s.key for s in batch])):
            save_npy(out / "attention" / f"{s.key}.npy", res.attention)
            save_mask_png(out / "masks" / f"{s.key}.png", res.mask)
            manifest.record(s.key, "done", foreground=round(float(res.mask.mean()), 4))

    return process_images(samples, manifest, runner.images_per_call, is_done, lambda s: load_rgb(s.image), process, overwrite, progress)
