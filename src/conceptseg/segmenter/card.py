"""A model card (the Hub's README.md) for a segmenter trained by `conceptseg run` or `demo`, written
from the run folder: the concept, the base model, the data, the metrics table and the config."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from conceptseg.models import EMBEDDED_MODEL
from conceptseg.runs import best_row
from conceptseg.tables import ROW_NAMES, format_table


def model_card(run: str | Path, row: str | None = None) -> str:
    run = Path(run)
    manifest_path = run / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found: {run} is not a run folder (made by `conceptseg run` or `demo`)")
    manifest = json.loads(manifest_path.read_text())
    cfg = manifest["config"]
    row = row or best_row(run)[0]
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    train_cfg_path = run / "segmenter" / row / "train_config.json"
    train_cfg = json.loads(train_cfg_path.read_text()) if train_cfg_path.exists() else {}
    concept = " ".join(cfg["concept"])
    base = cfg.get("model") or EMBEDDED_MODEL
    on_hub = "/" in str(base) and not Path(str(base)).exists()
    test_name = cfg.get("test_images") or "none"
    results = [EvalResult(task_type="image-segmentation", dataset_type=test_name.split(":")[0], dataset_name=f"{test_name} ({cfg.get('test_split')})",
                          metric_type=m, metric_name=f"{m} (pooled over pixels)", metric_value=round(100 * v, 2))
               for m, v in metrics.get(row, {}).items() if m in ("acc", "iou", "miou")]
    data = ModelCardData(library_name="conceptseg", pipeline_tag="image-segmentation", base_model=base if on_hub else None,
                         tags=["image-segmentation", "background-removal", "concept-distillation", *cfg["concept"]],
                         model_name=f"conceptseg-{'-'.join(cfg['concept'])}" if results else None, eval_results=results or None)
    counts = manifest.get("counts", {}).get("images", {})
    table = format_table({k: v for k, v in metrics.items()}) if metrics else "(the run was not scored: no test images)"
    seg_config = {k: v for k, v in train_cfg.items() if k not in ("data", "out", "progress")}
    synth = f"; {cfg['synth']['num']} synthetic images D' from the fine-tuned model" if cfg.get("synth", {}).get("num") else ""
    toy = " (the toy-world model that ships with conceptseg: it only knows its procedural toy world)" if base == EMBEDDED_MODEL else ""
    body = f"""
# conceptseg segmenter: "{concept}"

A U-Net (milesial layout, width {train_cfg.get("width", "?")}, input size {train_cfg.get("input_size", "?")}) that separates
**{concept}** from the background. It was trained without segmentation labels, on masks distilled
from a text-to-image latent diffusion model by concept distillation (Dombrowski et al., ICCV 2023,
*Foreground-Background Separation through Concept Distillation from Generative Image Foundation
Models*), with conceptseg's stage 5. This card's model is the row
"{ROW_NAMES.get(row, row)}" of the table below.

- **Concept**: {concept} (prompt: {cfg.get("prompt") or f"a photo of a {cfg['concept'][0]}"})
- **Base model**: `{base}`{toy}
- **Training images D**: `{cfg["images"]}` (split {cfg["split"]}), {counts.get("train", "?")} images, no labels used{synth}
- **Test images**: `{test_name}` (split {cfg.get("test_split")}), {counts.get("test", 0)} images
- **Made with**: conceptseg {manifest.get("versions", {}).get("conceptseg", "?")}, commit `{manifest.get("git_commit")}`,
  torch {manifest.get("versions", {}).get("torch", "?")}

## Scores

On the test images, pooled over all pixels (%):

{table}

## Use

```bash
pip install -e .   # in a checkout of conceptseg
conceptseg segment --segmenter THIS_FOLDER_OR_HUB_ID --images photos/ --out out/ --output mask rgba
```

```python
from PIL import Image
from conceptseg.segmenter import Segmenter

seg = Segmenter.from_pretrained("THIS_FOLDER_OR_HUB_ID")
mask = seg.masks([Image.open("photo.jpg")])[0]  # bool, the photo's size
```

Images are resized so their short side is {train_cfg.get("input_size", "?")} px, as in training; masks come back at the
original size. The model knows one concept and the image domain it was distilled on.

## Training configuration

The run (`conceptseg run` config):

```yaml
{yaml.safe_dump(cfg, sort_keys=False).strip()}
```

The segmenter (`train-seg`):

```yaml
{yaml.safe_dump(seg_config, sort_keys=False).strip()}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
