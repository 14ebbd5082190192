"""Does a text-to-image model localise and use its words? The embedded model's quality bar.

On held-out single-object toy images, stage 1's raw map is scored against the true mask (AUC-ROC,
mean over images) and M_pre by pooled IoU, beside three references: the map of a WRONG class word,
the same architecture at random initialisation, and a fixed centre prior. The model's use of its
words is scored by classification through the lowest denoising error over the class prompts, and
by binding on fresh two-object scenes ("a photo of a c1 and a c2": is c1's map higher on c1's
object than on c2's?).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from conceptseg.data.imagefolder import read_imagefolder
from conceptseg.data.toyworld import CLASSES, caption_for, load_rows, render_scene
from conceptseg.families.sd import SDModel
from conceptseg.geometry import Canvas, load_mask_file, load_rgb
from conceptseg.metrics import PooledCounts, auc_roc
from conceptseg.prelim import (PrelimConfig, PrelimRunner, attention_maps, attention_maps_by_level, image_noise,
                               timestep_grid)
from conceptseg.tokenizer import concept_token_positions


PARTS = ("localisation", "classify", "binding", "wrong_word", "random_init", "centre_prior", "per_level")


@dataclass
class ToyEvalConfig:
    per_class: int = 200
    steps: int = 40  # T0 of stage 1
    batch_size: int = 40
    classify_timesteps: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800)
    binding_scenes: int = 100
    parts: tuple[str, ...] = PARTS  # which measurements to make (several processes can split them)
    seed: int = 0
    world: str | None = None  # toy world of the binding scenes; None: the dataset's (v2 rows record their scene)


def _random_init(model: SDModel, seed: int) -> SDModel:
    """The same architecture with fresh random UNet and text-encoder weights (the VAE is kept)."""
    torch.manual_seed(seed)
    unet = type(model.unet).from_config(model.unet.config).to(model.device, model.dtype).eval()
    text_encoder = type(model.text_encoder)(copy.deepcopy(model.text_encoder.config)).to(model.device, model.dtype).eval()
    return SDModel(vae=model.vae, unet=unet, text_encoder=text_encoder, tokenizer=model.tokenizer, scheduler=model.scheduler,
                   source="random-init", device=model.device, dtype=model.dtype)


def _centre_prior(size: tuple[int, int]) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    return -np.hypot((yy + 0.5) / h - 0.5, (xx + 0.5) / w - 0.5)


def _prelim_runners(model: SDModel, words, cfg: ToyEvalConfig) -> dict[str, PrelimRunner]:
    """Stage 1 as `conceptseg prelim` runs it, one runner per word."""
    return {w: PrelimRunner(model, PrelimConfig(w, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed)) for w in set(words)}


def _localisation(model: SDModel, images, keys, truths, words, cfg: ToyEvalConfig, progress: bool) -> dict:
    """Mean per-image AUC of the raw map and pooled scores of M_pre, for each image's given word."""
    aucs, counts, per_class = [], PooledCounts(), defaultdict(list)
    runners = _prelim_runners(model, words, cfg)
    for im, key, truth, word in tqdm(list(zip(images, keys, truths, words)), desc=f"stage 1 ({model.source[-30:]})", disable=not progress, leave=False):
        res = runners[word]([im], [key])[0]
        auc = auc_roc(res.canvas.restore(res.attention), truth)
        aucs.append(auc)
        per_class[word].append(auc)
        counts.add(res.mask, truth)
    return {"auc": float(np.nanmean(aucs)), **{f"prelim_{k}": v for k, v in counts.as_dict().items()},
            "auc_per_word": {w: float(np.nanmean(v)) for w, v in sorted(per_class.items())}}


@torch.no_grad()
def _per_level(model: SDModel, images, keys, truths, words, cfg: ToyEvalConfig, progress: bool) -> dict:
    """Mean per-image AUC of each UNet resolution's own map (same noise and prompt as stage 1):
    which levels localise, which only add noise to the equal-weight average."""
    aucs = defaultdict(list)
    runners = _prelim_runners(model, words, cfg)
    for im, key, truth, word in tqdm(list(zip(images, keys, truths, words)), desc="per level", disable=not progress, leave=False):
        r = runners[word]
        (canvas,), z0, noise = r.encode([im], [key])
        levels = attention_maps_by_level(model, z0, r.cond, r.token_groups, r.timesteps, noise, cfg.batch_size)
        for level, maps in levels.items():
            aucs[level].append(auc_roc(canvas.restore(maps[0].sum(0).cpu().numpy()), truth))
    return {level: float(np.nanmean(v)) for level, v in sorted(aucs.items(), key=lambda kv: -int(kv[0].split("x")[0]))}


@torch.no_grad()
def _classify(model: SDModel, images, keys, labels, classes, cfg: ToyEvalConfig, progress: bool) -> float:
    """Accuracy of argmin over class prompts of the denoising error (same noise for every prompt)."""
    conds = model.encode_prompts([f"a photo of a {c}" for c in classes])
    t = torch.tensor(cfg.classify_timesteps, device=model.device)
    abar = model.alphas_cumprod.to(model.device)[t].view(-1, 1, 1, 1).float()
    right = 0
    for im, key, label in tqdm(list(zip(images, keys, labels)), desc="classify", disable=not progress, leave=False):
        z0 = model.encode_images(Canvas(im.width, im.height, model.resolution).place(im)[None]).float()
        eps = image_noise(cfg.seed + 1, key, (len(t), *z0.shape[1:])).to(model.device)
        zt = (abar.sqrt() * z0 + (1 - abar).sqrt() * eps).to(model.dtype)
        errors = []
        for c in range(len(classes)):
            pred = model.unet(zt, t, conds[c : c + 1].expand(len(t), -1, -1)).sample.float()
            errors.append(((pred - eps) ** 2).mean().item())
        right += classes[int(np.argmin(errors))] == label
    return right / len(labels)


@torch.no_grad()
def _binding(model: SDModel, cfg: ToyEvalConfig, classes, world: str, progress: bool) -> float:
    """Mean AUC, over both words of fresh two-object scenes, of a word's map separating its object from the other."""
    timesteps = timestep_grid(cfg.steps)
    aucs = []
    for k in tqdm(range(cfg.binding_scenes), desc="binding", disable=not progress, leave=False):
        rng = np.random.default_rng([cfg.seed, 7, k])
        pair = list(rng.choice(classes, size=2, replace=False))
        scene = render_scene(rng, pair, size=model.resolution, world=world)
        if min(m.sum() for m in scene.object_masks) == 0:
            continue
        prompt = caption_for(pair)
        groups = concept_token_positions(model.tokenizer, prompt, pair)
        z0 = model.encode_images(scene.image[None])
        noise = image_noise(cfg.seed, f"binding-{k}", (len(timesteps), *z0.shape[1:]))[None]
        maps = attention_maps(model, z0, model.encode_prompts([prompt]), groups, timesteps, noise, cfg.batch_size)[0]
        canvas = Canvas(scene.image.shape[1], scene.image.shape[0], model.resolution)
        either = scene.object_masks[0] | scene.object_masks[1]
        for g in range(2):
            full = canvas.restore(maps[g].cpu().numpy())
            aucs.append(auc_roc(full[either], scene.object_masks[g][either]))
    return float(np.nanmean(aucs))


def evaluate_toy_model(model: SDModel, data_root, cfg: ToyEvalConfig | None = None, progress: bool = True) -> dict:
    cfg = cfg or ToyEvalConfig()
    rows = [r for r in read_imagefolder(data_root, split="test") if len(r.classes) == 1]
    by_class = defaultdict(list)
    for r in rows:
        by_class[r.classes[0]].append(r)
    classes = [c for c in CLASSES if c in by_class]
    chosen = [r for c in classes for r in by_class[c][: cfg.per_class]]
    images = [load_rgb(r.image) for r in chosen]
    truths = [load_mask_file(r.mask) for r in chosen]
    keys = [r.image.stem for r in chosen]
    labels = [r.classes[0] for r in chosen]

    unknown = set(cfg.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown evaluation part(s) {sorted(unknown)}; choose from {PARTS}")
    report = {"images": len(chosen), "per_class": {c: min(len(by_class[c]), cfg.per_class) for c in classes},
              "config": {**cfg.__dict__, "classify_timesteps": list(cfg.classify_timesteps), "parts": list(cfg.parts)}}
    if "localisation" in cfg.parts:
        report["correct_word"] = _localisation(model, images, keys, truths, labels, cfg, progress)
    if "classify" in cfg.parts:
        report["class_by_denoising_accuracy"] = _classify(model, images, keys, labels, classes, cfg, progress)
    if "binding" in cfg.parts:
        world = cfg.world or ("v2" if "scene" in load_rows(data_root)[0] else "v1")
        report["binding_auc"] = _binding(model, cfg, classes, world, progress)
        report["binding_world"] = world
    if "wrong_word" in cfg.parts:
        wrong = [classes[(classes.index(c) + 1) % len(classes)] for c in labels]
        report["wrong_word"] = _localisation(model, images, keys, truths, wrong, cfg, progress)
    if "random_init" in cfg.parts:
        report["random_init"] = _localisation(_random_init(model, cfg.seed), images, keys, truths, labels, cfg, progress)
    if "centre_prior" in cfg.parts:
        report["centre_prior_auc"] = float(np.nanmean([auc_roc(_centre_prior(t.shape), t) for t in truths]))
    if "per_level" in cfg.parts:
        report["auc_per_level"] = _per_level(model, images, keys, truths, labels, cfg, progress)
    return report
