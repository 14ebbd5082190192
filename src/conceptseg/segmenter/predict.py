"""Applying a trained segmenter: masks at each image's original size, cut-outs and new backgrounds,
COCO RLE, ONNX export and onnxruntime inference."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from conceptseg import coco_rle
from conceptseg.cutout import OUTPUT_FOLDERS, cutout, load_background, over, parse_color
from conceptseg.data.readers import Sample, list_samples
from conceptseg.geometry import load_rgb, resize_short_side, to_model_input
from conceptseg.io import Manifest, process_images, save_mask_png, save_png, write_bytes, write_json
from conceptseg.modeling.segmenter import SegmenterNet, UNet
from conceptseg.settings import stage_settings

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_segmenter(net: UNet, folder: Path, input_size: int) -> None:
    """config.json + model.safetensors (+ a README.md model card stub): `SegmenterNet.save_pretrained`."""
    _hub_net(net, input_size).save_pretrained(Path(folder))


def _hub_net(net: UNet, input_size: int) -> SegmenterNet:
    if isinstance(net, SegmenterNet) and net.input_size == input_size:
        return net
    hub = SegmenterNet(**net.config, input_size=input_size)
    hub.load_state_dict(net.state_dict())
    return hub


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

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device = "cpu", threshold: float = 0.5,
                        **hub_kwargs) -> "Segmenter":
        """A segmenter folder or a Hugging Face Hub id (`hub_kwargs`: revision, token, ...)."""
        net = SegmenterNet.from_pretrained(str(source), **hub_kwargs)
        return cls(net, net.input_size, device, threshold)

    def save_pretrained(self, folder: str | Path, model_card: str | None = None) -> Path:
        """config.json + model.safetensors, and README.md: `model_card` (e.g. `card.model_card(run)`)
        if given, else the mixin's stub (an existing README.md is kept)."""
        folder = Path(folder)
        if model_card is not None:
            write_bytes(folder / "README.md", model_card.encode())
        _hub_net(self.net, self.input_size).save_pretrained(folder)
        return folder

    def push_to_hub(self, repo_id: str, model_card: str | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str = "conceptseg segmenter") -> str:
        """Create the repo if needed and upload the saved folder; returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_card)
            return api.upload_folder(repo_id=repo.repo_id, folder_path=tmp, commit_message=commit_message)


def load_segmenter(folder: str | Path, device: str | torch.device = "cpu", threshold: float = 0.5,
                   provider: str = "auto") -> Segmenter:
    """A segmenter folder (train-seg's OUT/model or `save_pretrained`'s), a Hugging Face Hub id
    ("user/name"), or an exported .onnx file run by onnxruntime on `provider` ("auto": the best available)."""
    path = Path(folder)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return OnnxSegmenter(path, provider=provider, threshold=threshold)
    if not path.exists() and _looks_like_hub_id(str(folder)):
        try:
            return Segmenter.from_pretrained(str(folder), device, threshold)
        except Exception as e:  # offline, unknown repo, missing file: one line naming the id
            raise FileNotFoundError(f"{folder} is not a local folder and could not be loaded from the Hugging Face Hub "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name} not found: {path} is not a segmenter folder (made by `conceptseg train-seg`)")
    return Segmenter.from_pretrained(path, device, threshold)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def run_segment(segmenter: Segmenter, images, out: Path, outputs: Sequence[str] = ("mask",), cutouts: bool = False,
                color: str = "white", background: str | Path | None = None, rle: bool = False, batch_size: int = 16,
                overwrite: bool = False, progress: bool = True, split: str = "all", shard: tuple[int, int] = (0, 1),
                num_workers: int = 0) -> dict:
    """OUT/<folder>/<stem>.png for each kind in `outputs`: masks/ (0/255, original size), cutouts/
    (RGBA, `cutouts=True` adds it), on_color/ (the object over `color`), on_background/ (over the
    picture `background`, fitted to each image); with `rle`, rle/<stem>.json (COCO RLE, joined by
    `collect_rle`). `images`: a file, a folder, a glob or a dataset spec. `num_workers` DataLoader
    processes read the images ahead of the network (0: the main process reads them)."""
    out = Path(out)
    kinds = list(dict.fromkeys([*outputs, *(["rgba"] if cutouts else [])]))
    unknown = [k for k in kinds if k not in OUTPUT_FOLDERS]
    if unknown:
        raise ValueError(f"unknown output {', '.join(unknown)}; choose from {', '.join(OUTPUT_FOLDERS)}")
    parse_color(color)
    back = None
    if "background" in kinds:
        if background is None:
            raise ValueError("output 'background' needs a background image (--background FILE)")
        back = load_background(background)
    if rle:
        coco_rle.encode(np.zeros((1, 1), bool))  # fails now, not after the first batch, without pycocotools
    samples = list_samples(images, split)[shard[0] :: shard[1]]
    settings = stage_settings(None, out, input_size=segmenter.input_size, threshold=segmenter.threshold, geometry="short-side",
                              color=color, background=Path(background).resolve() if background is not None else None)
    manifest = Manifest.open(out, "segment", settings, overwrite, shard, outputs=(*OUTPUT_FOLDERS.values(), "rle"))
    targets = [out / OUTPUT_FOLDERS[k] for k in kinds]

    def is_done(s: Sample) -> bool:
        return all((d / f"{s.key}.png").exists() for d in targets) and (not rle or (out / "rle" / f"{s.key}.json").exists())

    def process(batch: list[Sample], images: list[Image.Image]) -> None:
        for s, image, mask in zip(batch, images, segmenter.masks(images)):
            if "rgba" in kinds:
                save_png(out / "cutouts" / f"{s.key}.png", cutout(image, mask))
            if "color" in kinds:
                save_png(out / "on_color" / f"{s.key}.png", over(image, mask, color))
            if "background" in kinds:
                save_png(out / "on_background" / f"{s.key}.png", over(image, mask, back))
            if rle:
                write_json(out / "rle" / f"{s.key}.json", {"file_name": s.image.name, "segmentation": coco_rle.encode(mask)})
            if "mask" in kinds:  # written last: with it, the sample is done
                save_mask_png(out / "masks" / f"{s.key}.png", mask)
            manifest.record(s.key, "done", foreground=round(float(mask.mean()), 4))

    if num_workers == 0:
        return process_images(samples, manifest, batch_size, is_done, _load_rgb, process, overwrite, progress)
    load = PrefetchedLoads([s for s in samples if overwrite or not is_done(s)], _load_rgb, num_workers)
    try:
        return process_images(samples, manifest, batch_size, is_done, load, process, overwrite, progress)
    finally:
        load.close()


def _load_rgb(s: Sample) -> Image.Image:
    return load_rgb(s.image)


class PrefetchedLoads:
    """`load(sample)` answered from DataLoader workers that read `samples` ahead, in that order.

    A stage asks for the samples in that order; a sample asked for again (a batch redone after
    running out of memory, or one sample at a time after a failure) or out of order is loaded in the
    calling process. A load's exception (an unreadable image) is raised at the call for its sample."""

    def __init__(self, samples: list, load, num_workers: int):
        self.position = {s.key: i for i, s in enumerate(samples)}
        self.fetched = 0  # how many the workers have handed over
        self.ahead: dict = {}  # key -> (result, exception), handed over but not yet asked for
        self.load = load
        self.results = iter(DataLoader(_Loads(samples, load), batch_size=None, num_workers=num_workers,
                                       collate_fn=_identity))

    def __call__(self, sample):
        if sample.key in self.ahead:
            result, error = self.ahead.pop(sample.key)
        elif self.position.get(sample.key, -1) >= self.fetched:
            while True:
                key, result, error = next(self.results)
                self.fetched += 1
                if key == sample.key:
                    break
                self.ahead[key] = (result, error)
        else:
            return self.load(sample)
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Stop the workers now (dropping the DataLoader's iterator shuts them down), not at garbage collection."""
        self.results, self.ahead = iter(()), {}


def _identity(item):
    return item


class _Loads(Dataset):
    def __init__(self, samples: list, load):
        self.samples, self.load = samples, load

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            return s.key, self.load(s), None
        except Exception as e:  # noqa: BLE001  (any load error is handed to the caller, which raises it for this sample)
            return s.key, None, e


def collect_rle(out: Path, name: str = "masks_coco_rle.json") -> Path:
    """OUT/rle/*.json joined into one COCO results-style list: [{"image_id": <key>, "file_name",
    "category_id": 1, "segmentation": {"size", "counts"}}] (image ids are the samples' keys, not integers)."""
    out = Path(out)
    rows = []
    for path in sorted((out / "rle").glob("*.json")):
        entry = json.loads(path.read_text())
        rows.append({"image_id": path.stem, "file_name": entry["file_name"], "category_id": 1, "segmentation": entry["segmentation"]})
    write_json(out / name, rows)
    return out / name


# The providers `auto` tries, fastest first; onnxruntime falls back along the list.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "CoreMLExecutionProvider",
                       "DmlExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
                    "rocm": "ROCMExecutionProvider", "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider",
                    "openvino": "OpenVINOExecutionProvider"}
INPUT_SIZE_KEY = "conceptseg.input_size"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError("running an ONNX segmenter needs onnxruntime (pip install 'conceptseg[onnx]')") from None
    return onnxruntime


def onnx_providers(choice: str = "auto") -> list[str]:
    """onnxruntime execution providers for `choice`: "auto" (the best available: CUDA, ROCm, CoreML,
    DirectML, OpenVINO, then CPU), or one provider by name or alias (cpu, cuda, tensorrt, ...)."""
    available = _onnxruntime().get_available_providers()
    if choice == "auto":
        return [p for p in PREFERRED_PROVIDERS if p in available] or available
    name = PROVIDER_ALIASES.get(choice.lower(), choice)
    if name not in available:
        raise ValueError(f"onnxruntime provider {choice!r} is not available here; available: {', '.join(available)}")
    return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])


class OnnxSegmenter(Segmenter):
    """The exported segmenter run by onnxruntime, with the same geometry as the torch one."""

    def __init__(self, path: str | Path, input_size: int | None = None, provider: str = "auto", threshold: float = 0.5):
        ort = _onnxruntime()
        try:
            self.session = ort.InferenceSession(str(path), providers=onnx_providers(provider))
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        stored = self.session.get_modelmeta().custom_metadata_map.get(INPUT_SIZE_KEY)
        if input_size is None and stored is None:
            raise ValueError(f"{path} does not record its input size (not made by `conceptseg export-onnx`); pass --input-size")
        self.net, self.device = None, torch.device("cpu")
        self.input_size, self.threshold = int(input_size or stored), threshold
        self.provider = self.session.get_providers()[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"image": x.astype(np.float32)})[0]


def export_onnx(segmenter: Segmenter, path: Path, check: bool = True) -> float | None:
    """ONNX with dynamic batch and size (input "image" in [-1, 1], output "logits"), its input size
    kept in the model's metadata; with `check`, the max abs difference to torch on a random batch
    (needs onnxruntime)."""
    import io

    import onnx

    net = segmenter.net.cpu().eval()
    x = torch.rand(2, 3, segmenter.input_size, segmenter.input_size) * 2 - 1
    path = Path(path)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, x, buffer, input_names=["image"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
                          dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, {INPUT_SIZE_KEY: str(segmenter.input_size)})
    write_bytes(path, model.SerializeToString())
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
