"""Applying a trained segmenter: masks at each image's original size, RGBA cut-outs, ONNX export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conceptseg.geometry import load_rgb, resize_short_side, to_model_input
from conceptseg.io import Manifest, list_images, process_images, save_mask_png, save_png, write_json
from conceptseg.modeling.segmenter import UNet

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_segmenter(net: UNet, folder: Path, input_size: int) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / WEIGHTS_FILE)
    write_json(folder / CONFIG_FILE, {**net.config, "input_size": input_size, "architecture": "milesial-unet"})


# The U-Net halves the resolution four times: inputs are padded to a multiple of 2**4.
UNET_MULTIPLE = 16


class Segmenter:
    """A trained U-Net applied in its training geometry: the short side resized to `input_size` (as
    in train-seg), the whole image run at once (the network is fully convolutional), padded to a
    multiple of 16 by repeating edge pixels (no grey bars the network never saw), cropped back, and
    the probabilities resized to the image's ORIGINAL size."""

    def __init__(self, net: UNet, input_size: int, device: str | torch.device = "cpu", threshold: float = 0.5):
        self.net = net.to(device).eval()
        self.input_size, self.device, self.threshold = input_size, torch.device(device), threshold

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 in [-1, 1] -> (N, 1, H, W) logits."""
        return self.net(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def probabilities(self, images: list[Image.Image]) -> list[np.ndarray]:
        """Foreground probability (float32) at each image's ORIGINAL size."""
        resized = [np.asarray(resize_short_side(im.convert("RGB"), self.input_size)) for im in images]
        by_shape: dict[tuple[int, int], list[int]] = {}  # images of one resized size share a batch
        for i, a in enumerate(resized):
            by_shape.setdefault(a.shape[:2], []).append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for (h, w), idx in by_shape.items():
            ph, pw = -h % UNET_MULTIPLE, -w % UNET_MULTIPLE
            batch = np.stack([np.pad(resized[i], ((0, ph), (0, pw), (0, 0)), mode="edge") for i in idx])
            x = to_model_input(batch).numpy()
            probs = 1 / (1 + np.exp(-self.logits(x)[:, 0, :h, :w].astype(np.float64)))
            for i, p in zip(idx, probs):
                size = (images[i].width, images[i].height)
                out[i] = np.asarray(Image.fromarray(p.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
        return out

    def masks(self, images: list[Image.Image]) -> list[np.ndarray]:
        return [p > self.threshold for p in self.probabilities(images)]


def load_segmenter(folder: str | Path, device: str | torch.device = "cpu") -> Segmenter:
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} not found: {folder} is not a segmenter folder (made by `conceptseg train-seg`)")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    net = UNet(cfg["in_channels"], cfg["out_channels"], cfg["width"])
    net.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return Segmenter(net, cfg["input_size"], device)


def cutout(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """RGBA with the background transparent."""
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)))
    return rgba


def run_segment(segmenter: Segmenter, images, out: Path, cutouts: bool = False, batch_size: int = 16,
                overwrite: bool = False, progress: bool = True, split: str = "all", shard: tuple[int, int] = (0, 1)) -> dict:
    """OUT/masks/<stem>.png (0/255, original size), optionally OUT/cutouts/<stem>.png (RGBA)."""
    out = Path(out)
    files = list_images(images, split)[shard[0] :: shard[1]]
    manifest = Manifest.open(out, "segment", {"input_size": segmenter.input_size, "threshold": segmenter.threshold}, overwrite, shard)

    def is_done(p: Path) -> bool:
        return (out / "masks" / f"{p.stem}.png").exists() and (not cutouts or (out / "cutouts" / f"{p.stem}.png").exists())

    def process(names: list[Path], images: list[Image.Image]) -> None:
        for p, image, mask in zip(names, images, segmenter.masks(images)):
            if cutouts:
                save_png(out / "cutouts" / f"{p.stem}.png", cutout(image, mask))
            save_mask_png(out / "masks" / f"{p.stem}.png", mask)
            manifest.record(p.name, "done", foreground=round(float(mask.mean()), 4))

    return process_images(files, manifest, batch_size, is_done, load_rgb, process, overwrite, progress)


def export_onnx(segmenter: Segmenter, path: Path, check: bool = True) -> float | None:
    """ONNX with dynamic batch and size (input "image" in [-1, 1], output "logits"); with `check`,
    the max abs difference to torch on a random batch (needs onnxruntime)."""
    net = segmenter.net.cpu().eval()
    x = torch.rand(2, 3, segmenter.input_size, segmenter.input_size) * 2 - 1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, x, str(path), input_names=["image"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
                          dynamo=False)
    if not check:
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("checking the ONNX export needs onnxruntime (pip install onnxruntime), or pass --no-check") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = net(x).numpy()
    return float(np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max())
