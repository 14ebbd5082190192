"""`conceptseg train-seg`: the U-Net of METHOD.md §5 trained on one or more mask datasets.

Published recipe: image and mask resized jointly (short side to 128), random 128 crop, random
flip; BCE on one logit per pixel; Adam lr 2e-3; batch 32; about 12k steps. The paper gives no
learning-rate schedule: `lr_schedule="constant"` reads it literally; "cosine" decays the rate to 0
over the run, so the weights it ends on are not one noisy step of a large constant rate (in short
runs a constant rate sometimes ends on a collapsed model: docs/demo.md). A small share of the
rows is held out for validation (pooled IoU at each checkpoint). accelerate for several
processes/GPUs and mixed precision; checkpoints resume with the same data order. Gradients are not
clipped (the paper's recipe) unless `max_grad_norm` is set. A run whose `steps` grows continues
from its last checkpoint under the constant rate; the cosine rate depends on `steps`, so there a
checkpoint made for another number of steps is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from conceptseg.data.readers import list_samples, load_mask
from conceptseg.geometry import ImageReadError, load_rgb, resize_short_side, to_model_input
from conceptseg.io import write_folder, write_json
from conceptseg.metrics import PooledCounts
from conceptseg.modeling.segmenter import UNet
from conceptseg.segmenter.predict import save_segmenter
from conceptseg.settings import added_setting, execution_setting
from conceptseg.training import (NONFINITE_LOSS, Checkpoints, OptimiserSteps, Precision, check_finite, checkpoint_settings,
                                 step_rng, trainer_accelerator)


@dataclass
class TrainSegConfig:
    data: list  # dataset specs ("imagefolder:DIR", "folder:IMAGES,masks=MASKS", "cub:ROOT", ...) or lists of Samples
    out: Path
    steps: int = 12000
    batch_size: int = 32
    lr: float = 2e-3
    lr_schedule: str = "constant"  # or "cosine" (see the module docstring)
    width: int = 64  # 64 = the paper's 64..1024 channels
    input_size: int = 128
    val_fraction: float = 0.05
    mixed_precision: str = "no"
    max_grad_norm: float | None = added_setting(None)  # clip gradients to this norm; None: no clipping (the paper)
    checkpoint_every: int = execution_setting(1000)
    checkpoints_total_limit: int | None = execution_setting(2)  # keep the newest N checkpoints (None: all)
    nonfinite_loss: str = "stop"  # or "skip" the batch (training.check_finite)
    seed: int = 0
    progress: bool = execution_setting(True)
    split: str = "train"
    # DataLoader worker processes that read the images and cut each step's batch (0: the main process);
    # every batch is a function of (seed, step) alone, so the count does not change the result
    num_workers: int = execution_setting(0)

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {sorted(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if self.steps < 1:
            raise ValueError(f"training needs at least 1 step, got steps={self.steps}")
        if self.nonfinite_loss not in NONFINITE_LOSS:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_LOSS}, not {self.nonfinite_loss!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None (no clipping), not {self.max_grad_norm}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {self.num_workers}")


# the learning rate at `step` of `steps`, as a fraction of the base rate: a function of the step
# alone, so resuming needs no scheduler state
LR_SCHEDULES = {
    "constant": lambda step, steps: 1.0,
    "cosine": lambda step, steps: 0.5 * (1 + math.cos(math.pi * step / steps)),
}
SCHEDULES_OF_THE_TOTAL = {"cosine"}  # schedules whose rate at a step depends on `steps`


def load_pairs(sources: list, size: int, split: str = "train", progress: bool = True,
               num_workers: int = 0) -> tuple[list, list[str]]:
    """(image uint8 HxWx3, mask bool HxW) with the short side at `size`; problems named per file.
    `num_workers` processes read and resize (the order of the pairs is the samples' either way).

    A source is a dataset spec, or a list of `Sample`s (what the pipeline passes)."""
    pairs, problems = [], []
    samples = [s for src in sources for s in (src if isinstance(src, list) else list_samples(src, split))]
    loader = DataLoader(_PairReader(samples, size), batch_size=None, num_workers=num_workers, collate_fn=_identity)
    for pair, problem in tqdm(loader, total=len(samples), desc="loading masks", disable=not progress, leave=False):
        if problem is not None:
            problems.append(problem)
        else:
            pairs.append(pair)
    return pairs, problems


def _identity(item):
    return item  # module level: worker processes may need to pickle it


class _PairReader(Dataset):
    """One sample's resized (image, mask), or its problem in words: (pair, None) or (None, problem)."""

    def __init__(self, samples: list, size: int):
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s, size = self.samples[i], self.size
        if s.mask is None:
            return None, f"{s.image}: no mask"
        try:
            image = load_rgb(s.image)
            mask = load_mask(s)
        except (ImageReadError, OSError, ValueError) as e:
            return None, str(e)
        if mask.shape != (image.height, image.width):
            return None, f"{s.image}: mask is {mask.shape[1]}x{mask.shape[0]}, image {image.width}x{image.height}"
        im = np.asarray(resize_short_side(image, size, Image.Resampling.BICUBIC))
        m = np.asarray(resize_short_side(Image.fromarray(mask.astype(np.uint8) * 255), size, Image.Resampling.NEAREST)) > 127
        return (im, m), None


class StepBatches(Dataset):
    """Step `step`'s training batch (random crops and flips drawn from the step's own generator), so
    batches can be cut ahead of time in worker processes and come out the same."""

    def __init__(self, pairs: list, batch_size: int, size: int, seed: int, process_index: int):
        self.pairs, self.batch_size, self.size, self.seed, self.process_index = pairs, batch_size, size, seed, process_index

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = step_rng(self.seed, 6, step, self.process_index)
        return random_crop_batch(self.pairs, rng.integers(0, len(self.pairs), self.batch_size), self.size, rng)


def random_crop_batch(pairs: list, idx, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for i in idx:
        im, m = pairs[i]
        top, left = rng.integers(0, im.shape[0] - size + 1), rng.integers(0, im.shape[1] - size + 1)
        im, m = im[top : top + size, left : left + size], m[top : top + size, left : left + size]
        if rng.random() < 0.5:
            im, m = im[:, ::-1], m[:, ::-1]
        images.append(np.ascontiguousarray(im))
        masks.append(np.ascontiguousarray(m))
    return to_model_input(np.stack(images)), torch.from_numpy(np.stack(masks))[:, None].float()


def centre_crop(im: np.ndarray, size: int) -> np.ndarray:
    top, left = (im.shape[0] - size) // 2, (im.shape[1] - size) // 2
    return im[top : top + size, left : left + size]


@torch.no_grad()
def validate(net: UNet, pairs: list, size: int, device) -> dict:
    """Pooled scores on centre crops (the paper's test protocol: resize 128, centre crop 128, threshold 0.5)."""
    was = net.training
    net.eval()
    counts = PooledCounts()
    for s in range(0, len(pairs), 32):
        chunk = pairs[s : s + 32]
        x = to_model_input(np.stack([centre_crop(im, size) for im, _ in chunk]), device)
        pred = torch.sigmoid(net(x))[:, 0].cpu().numpy() > 0.5
        for p, (_, m) in zip(pred, chunk):
            counts.add(p, centre_crop(m, size))
    net.train(was)
    return counts.as_dict()


def train_segmenter(cfg: TrainSegConfig) -> Path:
    with trainer_accelerator() as accelerator:
        return _train_segmenter(cfg, accelerator)


def _train_segmenter(cfg: TrainSegConfig, accelerator) -> Path:
    out = Path(cfg.out)
    pairs, problems = load_pairs(cfg.data, cfg.input_size, cfg.split, cfg.progress and accelerator.is_main_process,
                                 cfg.num_workers)
    for p in problems:
        accelerator.print(f"skipped {p}")
    if len(pairs) < 2:
        raise ValueError(f"fewer than 2 usable image/mask pairs in {cfg.data}")
    order = np.random.default_rng([cfg.seed, 5]).permutation(len(pairs))
    n_val = max(1, int(round(cfg.val_fraction * len(pairs)))) if cfg.val_fraction > 0 else 0
    val = [pairs[i] for i in order[:n_val]]
    train = [pairs[i] for i in order[n_val:]]

    torch.manual_seed(cfg.seed)
    net = UNet(width=cfg.width)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    precision = Precision(cfg.mixed_precision, accelerator.device)
    net_p, optimizer = accelerator.prepare(net, optimizer)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", {**asdict(cfg), "train_pairs": len(train), "val_pairs": len(val), "skipped": problems})
    updates = OptimiserSteps(accelerator, precision, optimizer, list(net.parameters()), max_grad_norm=cfg.max_grad_norm)
    # the cosine rate at a step depends on the total: a checkpoint then holds only for the same total
    total = {"schedule_steps": cfg.steps} if cfg.lr_schedule in SCHEDULES_OF_THE_TOTAL else {}
    checkpoints = Checkpoints(accelerator, out, checkpoint_settings(cfg, out, **total), total_limit=cfg.checkpoints_total_limit)
    start, state = checkpoints.resume(cfg.steps)
    precision.load_state(state)
    history = state.get("validation", [])

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train-seg",
               disable=not (cfg.progress and accelerator.is_main_process))
    batches = DataLoader(StepBatches(train, cfg.batch_size, cfg.input_size, cfg.seed, accelerator.process_index),
                         sampler=range(start, cfg.steps), batch_size=None, num_workers=cfg.num_workers,
                         pin_memory=cfg.num_workers > 0 and accelerator.device.type == "cuda")
    for step, (x, y) in zip(bar, batches):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * LR_SCHEDULES[cfg.lr_schedule](step, cfg.steps)
        with updates.micro_batch(0, net_p):
            with precision.autocast():
                logits = net_p(x.to(accelerator.device, non_blocking=True))
            loss = F.binary_cross_entropy_with_logits(logits.float(), y.to(accelerator.device, non_blocking=True))
            if check_finite(loss, step + 1, out, cfg.nonfinite_loss, accelerator):
                updates.backward(loss)
        if updates.update():
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            if val and accelerator.is_main_process:
                history.append({"step": step + 1, **validate(accelerator.unwrap_model(net_p), val, cfg.input_size, accelerator.device)})
            checkpoints.save(step + 1, {"validation": history, **precision.state()})
    if accelerator.is_main_process:
        write_folder(out / "model", lambda tmp: save_segmenter(accelerator.unwrap_model(net_p), tmp, cfg.input_size))
    accelerator.wait_for_everyone()
    return out / "model"
