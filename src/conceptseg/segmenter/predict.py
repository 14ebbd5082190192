"""Applying a trained segmenter: masks at each image's original size, RGBA cut-outs, ONNX export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conceptseg.geometry import Canvas, load_rgb, to_model_input
from conceptseg.data.readers import Sample, list_samples
from conceptseg.io import Manifest, process_images, save_mask_png, save_png, write_json
from conceptseg.modeling.segmenter import UNet

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_segmenter(net: UNet, folder: Path, input_size: int) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / WEIGHTS_FILE)
    write_json(folder / CONFIG_FILE, {**net.config, "input_size": input_size, "architecture": "milesial-unet"})


class Segmenter:
    """A trained U-Net with its input size; images are resized (long edge) and padded, as everywhere."""

    def __init__(self, net: UNet, input_size: int, device: str | torch.device = "cpu", threshold: float = 0.5):
        self.net = net.to(device).eval()
        self.input_size, self.device, self.threshold = input_size, torch.device(device), threshold

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> list[np.ndarray]:
        """Foreground probability at each image's ORIGINAL size."""
        canvases = [Canvas(im.width, im.height, self.input_size) for im in images]
        x = np.stack([c.place(im.convert("RGB")) for c, im in zip(canvases, images)])
        probs = torch.sigmoid(self.net(to_model_input(x, self.device)))[:, 0].float().cpu().numpy()
        return [c.restore(p, resample=Image.Resampling.BILINEAR) for c, p in zip(canvases, probs)]

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
    """OUT/masks/<key>.png (0/255, original size), optionally OUT/cutouts/<key>.png (RGBA)."""
    out = Path(out)
    samples = list_samples(images, split)[shard[0] :: shard[1]]
    manifest = Manifest.open(out, "segment", {"input_size": segmenter.input_size, "threshold": segmenter.threshold}, overwrite, shard,
                             outputs=("masks", "cutouts"))

    def is_done(s: Sample) -> bool:
        return (out / "masks" / f"{s.key}.png").exists() and (not cutouts or (out / "cutouts" / f"{s.key}.png").exists())

    def process(batch: list[Sample], images: list[Image.Image]) -> None:
        for s, image, mask in zip(batch, images, segmenter.masks(images)):
            if cutouts:
                save_png(out / "cutouts" / f"{s.key}.png", cutout(image, mask))
            save_mask_png(out / "masks" / f"{s.key}.png", mask)
            manifest.record(s.key, "done", foreground=round(float(mask.mean()), 4))

    return process_images(samples, manifest, batch_size, is_done, lambda s: load_rgb(s.image), process, overwrite, progress)


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
