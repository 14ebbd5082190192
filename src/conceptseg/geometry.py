"""Image geometry. The diffusion stages resize the long edge to the model's resolution, pad to a
square canvas, and map every mask back to the ORIGINAL image size (METHOD.md §8). The segmenter
(stage 5) resizes the SHORT side to its input size, as it was trained, and runs on the whole image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Padding is mid-grey: 0 in the model's [-1, 1] pixel range, the least informative value.
PAD_VALUE = 127


class SampleError(ValueError):
    """One sample cannot be processed: per-image stages name it, record it as failed and go on."""


class ImageReadError(SampleError):
    """An input image that cannot be read; the message names the file and the problem."""


class NonFiniteError(SampleError):
    """A map, latent or decoded image holds NaN or infinite values."""


def _open_upright(path: Path, what: str) -> Image.Image:
    """The decoded file with its EXIF orientation applied; any failure as one ImageReadError naming it."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return im
    except FileNotFoundError:
        raise ImageReadError(f"{path}: {what} file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file Pillow can read (as {what})") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: unreadable or truncated {what} ({e})") from None


def load_image_and_mask(image_path: Path, mask_path: Path, what: str = "mask") -> tuple[Image.Image, np.ndarray]:
    """An image and its mask (e.g. M_pre), the mask required to exist and to match the image's size."""
    image = load_rgb(image_path)
    if not Path(mask_path).exists():
        raise ImageReadError(f"{image_path}: no {what} {mask_path}")
    mask = load_mask_file(mask_path)
    if mask.shape != (image.height, image.width):
        raise ImageReadError(f"{image_path}: {what} is {mask.shape[1]}x{mask.shape[0]}, image is {image.width}x{image.height}")
    return image, mask


def load_rgb(path: str | Path) -> Image.Image:
    """Any Pillow-readable file as 8-bit RGB: EXIF orientation applied, alpha composited on white,
    16-bit and float images rescaled from their own range."""
    path = Path(path)
    im = _open_upright(path, "image")
    if im.width < 1 or im.height < 1:
        raise ImageReadError(f"{path}: empty image ({im.width}x{im.height})")
    try:
        return to_rgb(im)
    except (OSError, ValueError) as e:
        raise ImageReadError(f"{path}: {im.mode} image that cannot be converted to RGB ({e})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as `load_rgb` returns it (EXIF rotation applied), from its header."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: not an image Pillow can read ({e})") from None
    return (h, w) if rotated else (w, h)


def load_mask_file(path: str | Path) -> np.ndarray:
    """A mask image as bool HxW, however it is stored: 0/255 grey (what `io.save_mask_png` writes;
    soft masks such as CUB's are cut at half range), 0/1 values, a 1-bit image, 16-bit or float
    grey, or the alpha channel of a cut-out (RGBA / LA / palette transparency, when the alpha varies)."""
    im = _open_upright(Path(path), "mask")
    if im.mode == "1":
        return np.asarray(im, dtype=bool)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "L")
    if im.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() != alpha.max():  # a cut-out: its alpha is the mask
            return alpha >= 128
        im = im.convert("L")
    values = np.asarray(im if im.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F") else im.convert("L"))
    if values.dtype.kind == "f":
        return values >= 0.5
    top = int(values.max()) if values.size else 0
    if top <= 1:  # stored as 0/1
        return values > 0
    return values >= (128 if top <= 255 else 32768)  # 8-bit, or 16-bit stored in a wider mode


def to_model_input(images, device=None, dtype=None):
    """uint8 images (N, H, W, 3), numpy or torch -> (N, 3, H, W) tensor in the models' [-1, 1] range."""
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, dtype=np.uint8))
    return x.to(device).permute(0, 3, 1, 2).to(dtype or torch.float32) / 127.5 - 1


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode == "LAB":  # Pillow has no direct LAB -> RGB conversion; littleCMS does it
        from PIL import ImageCms

        im = ImageCms.applyTransform(im, ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                                                  "LAB", "RGB"))
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(canvas, im)
    return im.convert("RGB")


def short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side at `size` and the aspect ratio kept (the segmenter's geometry)."""
    s = size / min(width, height)
    return max(size, round(width * s)), max(size, round(height * s))


def resize_short_side(image: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """The image with its short side at `size`: what the segmenter trains and predicts on."""
    return image.resize(short_side_size(image.width, image.height, size), resample)


@dataclass(frozen=True)
class Canvas:
    """Where an image of size (width, height) sits on a square canvas of side `size`."""

    width: int
    height: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.width, self.height)

    @property
    def inner(self) -> tuple[int, int, int, int]:
        """(left, top, inner_width, inner_height) of the resized image on the canvas."""
        w = max(1, round(self.width * self.scale))
        h = max(1, round(self.height * self.scale))
        return (self.size - w) // 2, (self.size - h) // 2, w, h

    def place(self, image: Image.Image, resample=Image.Resampling.BICUBIC, fill=PAD_VALUE) -> np.ndarray:
        """The image resized and padded onto the canvas (HxWxC uint8, or HxW for mode L)."""
        left, top, w, h = self.inner
        bands = len(image.getbands())
        canvas = Image.new(image.mode, (self.size, self.size), (fill,) * bands if bands > 1 else fill)
        canvas.paste(image.resize((w, h), resample), (left, top))
        return np.asarray(canvas)

    def place_mask(self, mask: np.ndarray) -> np.ndarray:
        """A boolean mask of the original image on the canvas (nearest), False in the padding."""
        im = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L")
        return self.place(im, resample=Image.Resampling.NEAREST, fill=0) > 127

    def valid(self, resolution: int) -> np.ndarray:
        """Which cells of a `resolution`-square grid over the canvas hold image, not padding."""
        left, top, w, h = self.inner
        centres = (np.arange(resolution) + 0.5) * self.size / resolution
        rows = (centres >= top) & (centres < top + h)
        cols = (centres >= left) & (centres < left + w)
        return rows[:, None] & cols[None, :]

    def restore_image(self, canvas_image: np.ndarray, resample=Image.Resampling.BICUBIC) -> np.ndarray:
        """An RGB uint8 image over the whole canvas (e.g. a decoded inpainting), cropped to the
        image's place and resized to the ORIGINAL size."""
        left, top, w, h = self.inner
        im = Image.fromarray(np.asarray(canvas_image)).resize((self.size, self.size), resample)
        return np.asarray(im.crop((left, top, left + w, top + h)).resize((self.width, self.height), resample))

    def restore(self, grid: np.ndarray, resample=Image.Resampling.NEAREST) -> np.ndarray:
        """A map over the canvas at any square resolution, cropped and resized to the ORIGINAL size."""
        grid = np.asarray(grid)
        is_bool = grid.dtype == bool
        im = Image.fromarray(grid.astype(np.uint8) * 255 if is_bool else grid.astype(np.float32))
        full = im.resize((self.size, self.size), Image.Resampling.NEAREST)
        left, top, w, h = self.inner
        out = np.asarray(full.crop((left, top, left + w, top + h)).resize((self.width, self.height), resample))
        return out > 127 if is_bool else out
