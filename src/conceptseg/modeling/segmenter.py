"""The downstream segmenter: the widely copied "milesial" U-Net (METHOD.md §5), in plain torch.

Four 2x down-steps of (conv3x3-BN-ReLU) x 2, channels width x (1, 2, 4, 8, 16) (64..1024 at the
paper's width 64), transposed-convolution up-sampling with skip concatenation, a 1x1 head to one
logit per pixel. `width` shrinks it for small data and CPUs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(cin, cout))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]  # odd sizes: pad to the skip's size
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 1, width: int = 64):
        super().__init__()
        c = [width * 2**i for i in range(5)]
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "width": width}
        self.inc = DoubleConv(in_channels, c[0])
        self.downs = nn.ModuleList(Down(c[i], c[i + 1]) for i in range(4))
        self.ups = nn.ModuleList(Up(c[i + 1], c[i]) for i in reversed(range(4)))
        self.head = nn.Conv2d(c[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> logits (B, 1, H, W)."""
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


class SegmenterNet(
    UNet,
    PyTorchModelHubMixin,
    library_name="conceptseg",
    tags=["image-segmentation", "background-removal", "concept-distillation"],
    pipeline_tag="image-segmentation",
):
    """The U-Net with its input size, saved and loaded the Hugging Face way: `save_pretrained(dir)`
    writes config.json + model.safetensors (the same files `train-seg` always wrote, so older
    segmenter folders load), `from_pretrained(dir or hub id)`, `push_to_hub(repo_id)`."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, width: int = 64, input_size: int = 128,
                 architecture: str = "milesial-unet"):
        if architecture != "milesial-unet":
            raise ValueError(f"unknown segmenter architecture {architecture!r} (this version knows milesial-unet)")
        super().__init__(in_channels, out_channels, width)
        self.input_size = input_size

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save

        from conceptseg.io import write_bytes, write_json

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_bytes(save_directory / "model.safetensors", save(state))
        write_json(save_directory / "config.json", {**self.config, "input_size": self.input_size, "architecture": "milesial-unet"})

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        # safetensors only (never a pickled .bin) and strict: a missing or extra weight is an error
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file

        model = cls(**model_kwargs)
        if Path(model_id).is_dir():
            weights = Path(model_id) / "model.safetensors"
        else:
            weights = hf_hub_download(model_id, "model.safetensors", revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, local_files_only=local_files_only, token=token)
        model.load_state_dict(load_file(weights, device=str(map_location)), strict=strict)
        return model
