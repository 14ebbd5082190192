"""What a mask does to its image: the RGBA cut-out, and the object placed over a colour or over
another picture. Used by `segment`, `serve` and `composite`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps

# `segment --output` kinds and the sub-folder each writes
OUTPUT_FOLDERS = {"mask": "masks", "rgba": "cutouts", "color": "on_color", "background": "on_background"}


def alpha_of(mask: np.ndarray) -> np.ndarray:
    """A bool mask, or a soft one in [0, 1], as 8-bit alpha."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return np.where(mask, 255, 0).astype(np.uint8)
    return np.clip(np.round(mask.astype(np.float64) * 255), 0, 255).astype(np.uint8)


def cutout(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """RGBA with the background transparent."""
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha_of(mask), mode="L"))
    return rgba


def parse_color(color: str) -> tuple[int, int, int]:
    """A Pillow colour: a name ("white"), "#00ff00", "rgb(0, 255, 0)"."""
    try:
        return ImageColor.getrgb(color)[:3]
    except ValueError:
        raise ValueError(f"{color!r} is not a colour (use a name like white, #00ff00, or rgb(0,255,0))") from None


def fit(background: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The background scaled to cover `size` (width, height) and centre-cropped: no bars, no distortion."""
    return ImageOps.fit(background.convert("RGB"), size, Image.Resampling.BICUBIC)


def over(image: Image.Image, mask: np.ndarray, background: Image.Image | str | tuple) -> Image.Image:
    """The image's foreground over a background picture (fitted to the image's size) or a colour."""
    if isinstance(background, Image.Image):
        back = fit(background, image.size)
    else:
        back = Image.new("RGB", image.size, parse_color(background) if isinstance(background, str) else tuple(background))
    a = alpha_of(mask).astype(np.float32)[..., None] / 255
    fg = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.round(a * fg + (1 - a) * np.asarray(back, dtype=np.float32)).astype(np.uint8))


def load_background(path: str | Path) -> Image.Image:
    from conceptseg.geometry import load_rgb

    return load_rgb(path)


def overlay(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 255), opacity: float = 0.5) -> Image.Image:
    """The image with the foreground tinted: how a mask is shown over its image."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    a = opacity * (alpha_of(mask).astype(np.float32)[..., None] / 255)
    return Image.fromarray(np.round((1 - a) * rgb + a * np.asarray(color, np.float32)).astype(np.uint8))
