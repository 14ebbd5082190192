"""Stage 4: the synthetic dataset D', D'_m (METHOD.md §4).

N images sampled from the fine-tuned model with the concept prompt (DDIM 50, guidance 1), then
stage 1 and stage 3 on them (stage 3 with the run's own settings, post-processing included),
written in the imagefolder layout (images/, masks/, metadata.jsonl) that `train-seg` reads. Image i depends only on (seed, i): a run resumes, or grows, by index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from conceptseg.inpaint import sample_latents
from conceptseg.io import Manifest, save_mask_png, save_png, write_text
from conceptseg.families.base import DiffusionModel
from conceptseg.settings import execution_setting, stage_settings
from conceptseg.prelim import PrelimConfig, PrelimRunner
from conceptseg.refine import RefineConfig, Refiner


@dataclass
class SynthConfig:
    concept: Sequence[str] | str
    num: int = execution_setting()  # growing N keeps the images made so far: image i depends only on (seed, i)
    prompt: str | None = None  # y_f; default "a photo of a {concept}"
    steps: int = 50
    guidance: float = 1.0  # the paper: 1 (no classifier-free guidance)
    sampler: str = "ddim"
    prelim_steps: int = 40  # T0 of stage 1 on the synthetic images
    refine: RefineConfig = field(default_factory=RefineConfig)  # stage 3 on the synthetic images
    batch_size: int = execution_setting(4)
    seed: int = 0

    def __post_init__(self):
        self.concept = [self.concept] if isinstance(self.concept, str) else list(self.concept)

    @property
    def concept_prompt(self) -> str:
        return self.prompt or f"a photo of a {self.concept[0]}"


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, 4, index]).integers(2**62)))


def outputs_done(out: Path, index: int) -> bool:
    """Whether synthetic pair `index` is in `out` (its mask is written last)."""
    return (Path(out) / "masks" / f"{index:06d}.png").exists()


def run_synth(model: DiffusionModel, out: Path, config: SynthConfig, progress: bool = True, shard: tuple[int, int] = (0, 1),
              overwrite: bool = False) -> Path:
    """Images 0..num-1 of D' (this process's share of them) into `out`; rows already there are kept
    unless `overwrite`."""
    out = Path(out)
    manifest = Manifest.open(out, "synth", stage_settings(config, out, model=model.source), overwrite=overwrite, shard=shard,
                             outputs=("images", "masks"))
    prelim = PrelimRunner(model, PrelimConfig(config.concept, prompt=config.prompt, steps=config.prelim_steps,
                                              batch_size=max(config.prelim_steps, 8), seed=config.seed))
    refiner = Refiner(model, config.refine)

    indices = list(range(config.num))[shard[0] :: shard[1]]
    todo = [i for i in indices if overwrite or not outputs_done(out, i)]
    bar = tqdm(total=len(indices), initial=len(indices) - len(todo), desc="synth", unit="img", disable=not progress)
    for start in range(0, len(todo), config.batch_size):
        chunk = todo[start : start + config.batch_size]
        latents = sample_latents(model, config.concept_prompt, len(chunk), steps=config.steps, guidance=config.guidance,
                                 sampler=config.sampler, generator=[_generator(config.seed, i) for i in chunk])
        images = [Image.fromarray(x) for x in model.decode_latents(latents)]
        keys = [f"synth-{i:06d}" for i in chunk]
        pre = prelim(images, keys)
        refined = refiner(images, [r.mask for r in pre], keys)
        for i, image, r in zip(chunk, images, refined):
            save_png(out / "images" / f"{i:06d}.png", image)
            save_mask_png(out / "masks" / f"{i:06d}.png", r.mask)  # written last: marks the row complete
            manifest.record(f"{i:06d}", "done", foreground=round(float(r.mask.mean()), 4))
        bar.update(len(chunk))
    bar.close()
    manifest.flush()
    if shard[1] == 1:  # several shards: the caller writes it once all are done
        write_metadata(out, config)
    return out


def write_metadata(out: Path, config: SynthConfig) -> None:
    """metadata.jsonl for every complete row, in index order (the imagefolder layout)."""
    rows = []
    for i in range(config.num):
        if outputs_done(out, i):
            rows.append({"file_name": f"images/{i:06d}.png", "mask_file_name": f"masks/{i:06d}.png",
                         "caption": config.concept_prompt, "class": config.concept[0], "classes": config.concept[:1],
                         "split": "train", "synthetic": True})
    text, path = "".join(json.dumps(r) + "\n" for r in rows), out / "metadata.jsonl"
    if not path.exists() or path.read_text() != text:  # unchanged: left alone, so a complete run rewrites nothing
        write_text(path, text)
