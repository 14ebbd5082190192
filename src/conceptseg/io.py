"""Atomic output files, image listing and the run manifest shared by every per-image stage."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
import platform
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=_jsonable).encode()))


def save_npy(path: Path, array: np.ndarray) -> None:
    _atomic(path, lambda f: np.save(f, array))


def save_png(path: Path, image: Image.Image | np.ndarray) -> None:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    _atomic(path, lambda f: image.save(f, format="PNG"))


def save_mask_png(path: Path, mask: np.ndarray) -> None:
    """A binary mask as an 8-bit PNG with values 0/255 (what every image tool reads)."""
    save_png(path, Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L"))


def _jsonable(obj):
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def list_images(source: str | Path | Sequence[Path], split: str = "all") -> list[Path]:
    """The images a stage works on: the image files directly in a folder (by extension, sorted), a
    dataset spec's images ("cub:/data/CUB_200_2011" with `split`), or a list of paths. Stems must be
    unique: they name the outputs."""
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
    elif Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    elif ":" in str(source) and not Path(source).exists():
        from conceptseg.data.readers import read_dataset

        files = [s.image for s in read_dataset(str(source), split)]
    else:
        raise FileNotFoundError(f"image folder {source} does not exist or is not a folder (nor a dataset spec like cub:/path)")
    by_stem: dict[str, Path] = {}
    for p in files:
        if p.stem in by_stem:
            raise ValueError(f"two images share the name {p.stem!r} ({by_stem[p.stem].name}, {p.name}); outputs are named by stem")
        by_stem[p.stem] = p
    return files


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("conceptseg", "torch", "diffusers", "transformers", "accelerate", "scikit-learn", "numpy", "pillow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


class SettingsChanged(ValueError):
    """An output folder holds results made with other settings."""


class Manifest:
    """`manifest.json` of a per-image stage: its settings, the model, versions and each image's status.

    Written atomically, at most every `flush_seconds` and at the end, so a 10,000-image run does not
    rewrite it 10,000 times. Whether an image is done is decided by its output files, not by this.
    A shard k of n processes writes `manifest.shard-k-of-n.json`; `merge_shards` joins them.
    """

    def __init__(self, out: Path, stage: str, settings: dict, shard: tuple[int, int] = (0, 1), flush_seconds: float = 10.0):
        self.out = Path(out)
        self.path = self.out / ("manifest.json" if shard[1] == 1 else f"manifest.shard-{shard[0]}-of-{shard[1]}.json")
        self.flush_seconds = flush_seconds
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data = {
            "stage": stage,
            "settings": settings,
            "versions": library_versions(),
            "images": old.get("images", {}),
        }
        self._last_flush = 0.0

    @staticmethod
    def previous_settings(out: Path) -> dict | None:
        for path in [Path(out) / "manifest.json", *sorted(Path(out).glob("manifest.shard-*.json"))]:
            if path.exists():
                return json.loads(path.read_text()).get("settings")
        return None

    @classmethod
    def open(cls, out: Path, stage: str, settings: dict, overwrite: bool = False, shard: tuple[int, int] = (0, 1)) -> "Manifest":
        """The stage's manifest; refuses a folder holding outputs made with other settings."""
        previous = cls.previous_settings(out)
        if previous is not None and previous != settings and not overwrite:
            changed = sorted(k for k in set(settings) | set(previous) if previous.get(k) != settings.get(k))
            raise SettingsChanged(f"{out} holds {stage} outputs made with other settings ({', '.join(changed)}); "
                                  "pass --overwrite to redo them or choose another --out")
        return cls(out, stage, settings, shard)

    def record(self, name: str, status: str, **info) -> None:
        self.data["images"][name] = {"status": status, **info}
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.data["counts"] = _count(self.data["images"])
        write_json(self.path, self.data)
        self._last_flush = time.monotonic()

    @staticmethod
    def merge_shards(out: Path) -> None:
        """Join the shard manifests of a multi-process run into manifest.json (run by one process)."""
        shards = sorted(Path(out).glob("manifest.shard-*.json"))
        if not shards:
            return
        main = Path(out) / "manifest.json"
        merged = json.loads(main.read_text()) if main.exists() else json.loads(shards[0].read_text())
        for path in shards:
            merged["images"].update(json.loads(path.read_text())["images"])
        merged["counts"] = _count(merged["images"])
        write_json(main, merged)
        for path in shards:
            path.unlink()


def _count(images: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in images.values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return counts


def process_images(files: Sequence[Path], manifest: Manifest, batch_size: int, is_done: Callable[[Path], bool],
                   load: Callable[[Path], Any], process: Callable[[list[Path], list[Any]], None],
                   overwrite: bool = False, progress: bool = True) -> dict:
    """The loop of every per-image stage: skip images whose outputs exist, load the rest in batches,
    report and record an unreadable one (`load` raises ImageReadError) and go on, hand each batch
    to `process` (which writes the outputs and records them), and keep a progress bar."""
    from tqdm.auto import tqdm

    from conceptseg.geometry import ImageReadError

    todo = [p for p in files if overwrite or not is_done(p)]
    bar = tqdm(total=len(files), initial=len(files) - len(todo), desc=manifest.data["stage"], unit="img", disable=not progress)
    failed = 0
    for start in range(0, len(todo), batch_size):
        names, loaded = [], []
        for p in todo[start : start + batch_size]:
            try:
                loaded.append(load(p))
                names.append(p)
            except ImageReadError as e:
                failed += 1
                tqdm.write(f"skipped {e}")
                manifest.record(p.name, "failed", error=str(e))
                bar.update(1)
        if names:
            process(names, loaded)
            bar.update(len(names))
    bar.close()
    manifest.flush()
    return {"images": len(files), "processed": len(todo) - failed, "skipped_done": len(files) - len(todo), "failed": failed}


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def image_arguments(source: str | Path | Sequence[Path]) -> str | Path | list[Path]:
    """A command's image argument with single files and globs expanded: "photo.jpg" -> [photo.jpg],
    "shots/*.png" -> the matching files (sorted); a folder, a dataset spec or a list pass through
    unchanged to `list_images`."""
    import glob

    if isinstance(source, (list, tuple)):
        return list(source)
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.exists() and glob.has_magic(str(source)):
        matches = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"no files match {source}")
        return matches
    if not path.exists() and path.suffix.lower() in IMAGE_EXTENSIONS:
        raise FileNotFoundError(f"{path}: file not found")
    return source
