"""Reading what a run wrote: the commands that use a run's result (`segment`, `serve`, `share`,
`remove`, `composite`, `export-onnx`) take a run folder or any folder of one of its stages, and this
module says which segmenter and which diffusion model that means.

A run folder (made by `conceptseg run` or `demo`) holds `stages.json` and a `manifest.json` with the
run's config; its segmenters are `segmenter/<row>/model` and its fine-tuned model `finetune/model`
(layout: `conceptseg.pipeline`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from conceptseg.tables import ROW_NAMES

# The method's segmenters, in the order the run's report prefers them when there are no scores (or a tie).
METHOD_ROWS = ("unet_real_synth", "unet_real", "unet_prelim")
# Trained on true masks: the table's upper bound, taken only when named (`--row supervised`, or its folder).
REFERENCE_ROWS = ("supervised",)
SEGMENTER_FILES = ("config.json", "model.safetensors")
# a diffusers folder (model_index.json, or SD 1.x/2.x parts alone), or LoRA weights + base reference
DIFFUSION_FILES = ("model_index.json", "conceptseg_lora.json", "unet/config.json", "transformer/config.json")


@dataclass(frozen=True)
class Picked:
    """What a command loads, and a line saying why (None: taken as the user gave it)."""

    source: str | None
    note: str | None = None
    row: str | None = None


def is_run_folder(path: Path) -> bool:
    path = Path(path)
    if (path / "stages.json").is_file():
        return True
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return "config" in json.loads(manifest.read_text())  # a stage's own manifest has "settings" instead
    except (OSError, ValueError):
        return False


def find_run(path: str | Path) -> Path | None:
    """The run folder `path` is, or is inside of; None if it is in none."""
    path = Path(path)
    for folder in (path, *path.parents):
        if is_run_folder(folder):
            return folder
    return None


def require_run(path: str | Path) -> Path:
    run = find_run(path)
    if run is None:
        raise FileNotFoundError(f"{path} is not a run folder nor inside one (no stages.json or manifest.json with the run's "
                                "config): --run takes the folder `conceptseg run` or `demo` wrote, e.g. runs/demo")
    return run


def trained_rows(run: Path) -> list[str]:
    """The rows whose segmenter finished training (segmenter/<row>/model holds its weights)."""
    root = Path(run) / "segmenter"
    return sorted(p.parent.name for p in root.glob("*/model") if _is_segmenter(p)) if root.is_dir() else []


def best_row(run: str | Path) -> tuple[str, str]:
    """The method's segmenter that scored the highest IoU in the run's metrics.json (box IoU where
    the test set has boxes only), and why; without scores, the one the run's report shows."""
    run = Path(run)
    trained = trained_rows(run)
    candidates = [r for r in METHOD_ROWS if r in trained]
    if not candidates:
        raise FileNotFoundError(f"{run / 'segmenter'} holds no trained segmenter of the method ({', '.join(METHOD_ROWS)}): "
                                "the run has not reached stage 5; rerun it to finish")
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    scored = [(metrics[r].get("iou", metrics[r].get("box_iou")), r) for r in candidates if isinstance(metrics.get(r), dict)]
    scored = [(score, r) for score, r in scored if score is not None]
    if not scored:
        return candidates[0], f"{ROW_NAMES[candidates[0]]}; the run has no scores, so the segmenter its report shows"
    best = max(scored, key=lambda item: (item[0], -candidates.index(item[1])))  # ties: the report's order
    return best[1], f"{ROW_NAMES[best[1]]}, the run's best: IoU {100 * best[0]:.1f} on its test images ({metrics_path})"


def resolve_segmenter(source: str | Path) -> Picked:
    """A segmenter folder, .onnx file or hub id as given; a run's stage folder `segmenter/<row>` its
    model; a run folder (or its `segmenter/`) the run's best segmenter."""
    path = Path(source)
    if path.suffix == ".onnx" or not path.exists() or _is_segmenter(path):
        return Picked(str(source))
    if _is_segmenter(path / "model"):
        return Picked(str(path / "model"), f"segmenter {path / 'model'} (the model of stage folder {path})", path.name)
    run = find_run(path)
    if run is None:
        return Picked(str(source))  # the loader names the missing files
    if path.resolve() in (run.resolve(), (run / "segmenter").resolve()):
        return pick_segmenter(run)
    raise FileNotFoundError(f"{path} is a folder of run {run} but holds no segmenter: pass the run ({run}) or one of its "
                            f"segmenters ({', '.join(str(run / 'segmenter' / r) for r in trained_rows(run)) or 'none trained yet'})")


def pick_segmenter(run: str | Path, row: str | None = None) -> Picked:
    """The run's segmenter of `row`, or its best (`best_row`)."""
    run = require_run(run)
    if row is None:
        row, why = best_row(run)
    else:
        why = "the row asked for"
        if row not in trained_rows(run):
            raise FileNotFoundError(f"{run / 'segmenter' / row / 'model'} not found: run {run} has these segmenters: "
                                    f"{', '.join(trained_rows(run)) or 'none'}")
    folder = run / "segmenter" / row / "model"
    return Picked(str(folder), f"segmenter {folder} ({why})", row)


def resolve_model(source: str | Path | None) -> Picked:
    """A diffusers folder, LoRA folder, hub id or None (the embedded model) as given; a stage folder
    holding `model/` (a run's `finetune/`) its model; a run folder its fine-tuned model."""
    if source is None:
        return Picked(None)
    path = Path(source)
    if not path.is_dir() or _is_diffusion_model(path):
        return Picked(str(source))
    if _is_diffusion_model(path / "model"):
        return Picked(str(path / "model"), f"model {path / 'model'} (the model of stage folder {path})")
    run = find_run(path)
    if run is not None and path.resolve() == run.resolve():
        return pick_model(run)
    return Picked(str(source))  # the loader names what is missing


def pick_model(run: str | Path) -> Picked:
    """The run's fine-tuned model (stage 2: concept distillation)."""
    run = require_run(run)
    folder = run / "finetune" / "model"
    if not _is_diffusion_model(folder):
        raise FileNotFoundError(f"{folder} not found: run {run} has no fine-tuned model yet (stage 2 has not finished); "
                                "rerun it, or pass --model")
    return Picked(str(folder), f"model {folder} (the run's fine-tuned model)")


def _is_segmenter(path: Path) -> bool:
    return all((path / name).is_file() for name in SEGMENTER_FILES)


def _is_diffusion_model(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in DIFFUSION_FILES)


def segmenter_of_run(path: str | Path) -> Picked:
    """`--run PATH`: the segmenter of the `segmenter/<row>` folder PATH is in, else the run's best."""
    run = require_run(path)
    inside = Path(path).resolve().relative_to(run.resolve()).parts
    if len(inside) >= 2 and inside[0] == "segmenter":
        return pick_segmenter(run, inside[1])
    return pick_segmenter(run)
