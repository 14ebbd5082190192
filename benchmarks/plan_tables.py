#!/usr/bin/env python
"""The tables of docs/plan.md: `conceptseg plan` for the run configs that name real models and for
each family's documented example (`configs/cub.yaml` with the family's model) at its published
resolution, against one 80 GB GPU (79 GiB, what torch reports for an 80 GB A100 or H100).

No weights are needed or downloaded: each family's published architecture is built on the meta
device by the benchmarks' builders (`modeling.sd`, `modeling.presets`) and written as a
config-only folder, which is what `plan` reads.

    python benchmarks/plan_tables.py            # prints the markdown tables
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from conceptseg.modeling.sd import build_components
from conceptseg.modeling.presets import build_family_components
from conceptseg.pipeline import load_config
from conceptseg.plan import GiB, plan_run, write_config_folder

ROOT = Path(__file__).resolve().parent.parent
GPU_GIB = 79.0
IMAGES = 10_000  # train and test images each, where a dataset's files are absent


def _sd(preset: str) -> dict:
    with torch.device("meta"):
        return build_components(preset)


FAMILIES = {  # label: (builder on the meta device, pipeline)
    "SD 1.5 (v1.4 architecture)": (lambda: _sd("sd15"), "StableDiffusionPipeline"),
    "SD 2.1-768": (lambda: _sd("sd21-768"), "StableDiffusionPipeline"),
    "SDXL base 1.0": (lambda: build_family_components("sdxl", "full", device="meta"), "StableDiffusionXLPipeline"),
    "SD 3.5 medium": (lambda: build_family_components("sd3.5", "full", device="meta"), "StableDiffusion3Pipeline"),
    "FLUX.1-dev": (lambda: build_family_components("flux", "full", device="meta"), "FluxPipeline"),
    "FLUX.2-dev": (lambda: build_family_components("flux2", "full", device="meta"), "Flux2Pipeline"),
    "Qwen-Image": (lambda: build_family_components("qwenimage", "full", device="meta"), "QwenImagePipeline"),
}
STAGES = ("prelim", "finetune", "refine", "synth", "segmenter", "evaluation")


def config_folders(root: Path) -> dict[str, Path]:
    folders = {}
    for label, (build, pipeline) in FAMILIES.items():
        folders[label] = write_config_folder(build(), pipeline, root / label.split(" (")[0].replace(" ", "_"))
    return folders


def row(name: str, config: Path, sets: list[str]) -> str:
    plan = plan_run(load_config(config, sets), GPU_GIB, images=IMAGES)
    cells = [f"{plan.stages[s].memory / GiB:.1f}" + ("" if plan.fits(s) else " **!**") if s in plan.stages else "-" for s in STAGES]
    fits = all(plan.fits(s) for s in plan.stages)
    knob = next((f"{s}: {plan.stages[s].knobs[0]}" for s in plan.stages if plan.stages[s].knobs), "")
    disk = sum(s.disk_total for s in plan.stages.values()) / GiB
    return f"| {name} | {' | '.join(cells)} | {disk:,.0f} | {'yes' if fits else 'no'} | {knob} |"


def main() -> None:
    head = ("| config | " + " | ".join(STAGES) + " | disk (GB) | fits 79 GiB | what makes it fit |\n"
            + "|---|" + "---:|" * (len(STAGES) + 1) + "---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folders = config_folders(Path(tmp))
        sd = folders["SD 1.5 (v1.4 architecture)"]
        print("## The run configs (SD v1.4 architecture)\n\n" + head)
        for name in ("cub", "cars", "dogs", "h36m"):
            print(row(f"configs/{name}.yaml", ROOT / "configs" / f"{name}.yaml", [f"model={sd}"]))
        print("\n## configs/cub.yaml on each family, at its published resolution\n\n" + head)
        for label, folder in folders.items():
            for method in ("full", "lora"):
                sets = [f"model={folder}", f"finetune.method={method}"]
                print(row(f"{label}, {method}", ROOT / "configs" / "cub.yaml", sets))
                if method == "lora":  # gradient checkpointing is on by default
                    print(row(f"{label}, lora, batch 1", ROOT / "configs" / "cub.yaml",
                              sets + ["finetune.batch_size=1", "finetune.gradient_accumulation=4", "prelim.batch_size=10"]))


if __name__ == "__main__":
    sys.exit(main())
