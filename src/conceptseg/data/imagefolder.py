"""Reader for the Hugging Face "imagefolder" layout this project writes (images/, masks/, metadata.jsonl)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageFolderRow:
    image: Path
    caption: str
    mask: Path | None
    split: str
    classes: tuple[str, ...]
    object_masks: tuple[Path, ...]


def read_imagefolder(root: str | Path, split: str | None = None) -> list[ImageFolderRow]:
    """Rows of `root/metadata.jsonl` (all, or one split), with paths made absolute."""
    root = Path(root)
    meta = root / "metadata.jsonl"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: {root} is not an imagefolder dataset")
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            image = root / r["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}, line {n}: not a metadata row with a file_name ({e})") from None
        if split is not None and r.get("split", "train") != split:
            continue
        mask = r.get("mask_file_name")
        rows.append(ImageFolderRow(
            image=image,
            caption=r.get("caption", ""),
            mask=root / mask if mask else None,
            split=r.get("split", "train"),
            classes=tuple(r.get("classes", [])),
            object_masks=tuple(root / m for m in r.get("object_mask_file_names", [])),
        ))
    return rows
