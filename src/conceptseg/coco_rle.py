"""Masks as COCO run-length encoding (pycocotools' compressed RLE), the format COCO-style datasets
and evaluation tools read: {"size": [height, width], "counts": "<string>"}."""

from __future__ import annotations

import warnings

import numpy as np


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError:
        raise RuntimeError("COCO RLE output needs pycocotools (pip install 'conceptseg[coco]' or pip install pycocotools)") from None
    return mask_api


def encode(mask: np.ndarray) -> dict:
    """A bool HxW mask as a JSON-ready compressed RLE."""
    rle = _mask_api().encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2: a DeprecationWarning about __array__(copy=)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _mask_api().decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
