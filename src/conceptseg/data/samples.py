"""What every dataset reader returns (`Sample`, `Box`) and the checks the readers share; below
both `readers.py` (the evaluation datasets, the dispatch by spec) and `medical.py` (chest data)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test", "all")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Sample:
    key: str  # unique, filesystem-safe stem used to name outputs
    image: Path
    mask: Path | None  # ground-truth mask (grey >= 128 is foreground), if the dataset has masks
    box: Box | None  # ground-truth box (x0, y0, x1, y1), inclusive, original image pixels
    label: str | None  # class name, where the dataset has one


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def need_path(path: Path, layout: str) -> Path:
    """`path`, or an error naming it and the layout the reader expects."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found. Expected layout: {layout} (see docs/datasets.md)")
    return path


def safe_key(text: str) -> str:
    """Filesystem-safe text: letters of any script, digits, '.', '_' and '-' are kept (so 'café' and
    'cafè' stay distinct), in Unicode NFC (macOS stores names decomposed); the rest becomes '_'."""
    return re.sub(r"[^\w.-]+", "_", unicodedata.normalize("NFC", text)).strip(".") or "_"
