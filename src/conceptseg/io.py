"""Atomic output files, image listing and the run manifest shared by every per-image stage."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Sequence
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFullError(OSError):
    """A write found the disk full (ENOSPC); the message names the file."""


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def _atomic(path: Path, write) -> None:
    """Write to a temporary file beside `path`, flush it to the disk, then rename it into place: after
    a crash or power loss `path` holds the old contents or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {path}; nothing partial was "
                                "left: free some space and rerun, the run resumes where it stopped") from None
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_jsonable)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, _json_text(obj))


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def _aside(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def restore_folder(dest: Path) -> None:
    """Undo a folder swap that was killed between its two renames: the old folder goes back into place."""
    dest, old = Path(dest), _aside(Path(dest))
    if old.is_dir() and not dest.exists():
        old.rename(dest)


def write_folder(dest: Path, write) -> Path:
    """`write(tmp)` fills a fresh temporary folder beside `dest`, which then takes `dest`'s place: its
    files are flushed to the disk, the old folder is renamed aside, the new one renamed into place,
    and only then is the old one deleted. At every moment `dest` (or, after a kill between the two
    renames, its aside copy, which the next call restores) is a complete folder, the old or the new."""
    dest = Path(dest)
    tmp, old = dest.with_name(f".{dest.name}.tmp"), _aside(dest)
    restore_folder(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    write(tmp)
    _fsync_tree(tmp)
    if dest.exists():
        dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        restore_folder(dest)
        raise
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def publish(src: Path, dest: Path) -> Path:
    """Copy a finished folder into place atomically."""
    return write_folder(dest, lambda tmp: shutil.copytree(src, tmp))


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
    rewrite it 10,000 times, and only when its contents changed: a rerun with nothing to do leaves it
    untouched. Whether an image is done is decided by its output files, not by this.
    A shard k of n processes writes `manifest.shard-k-of-n.json`; `merge_shards` joins them.
    """

    def __init__(self, out: Path, stage: str, settings: dict, shard: tuple[int, int] = (0, 1), flush_seconds: float = 10.0):
        self.out = Path(out)
        self.path = self.out / ("manifest.json" if shard[1] == 1 else f"manifest.shard-{shard[0]}-of-{shard[1]}.json")
        self.flush_seconds = flush_seconds
        self._written = self.path.read_text() if self.path.exists() else None  # the file's contents
        old = json.loads(self._written) if self._written else {}
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
    def open(cls, out: Path, stage: str, settings: dict, overwrite: bool = False, shard: tuple[int, int] = (0, 1),
             outputs: Sequence[str] = ()) -> "Manifest":
        """The stage's manifest; refuses a folder holding outputs made with other settings, unless
        `overwrite`: then those outputs (the `outputs` subfolders) are removed first, so a redo that
        is interrupted never leaves old files to be taken as done."""
        previous = cls.previous_settings(out)
        if previous is not None and previous != settings:
            if not overwrite:
                changed = sorted(k for k in set(settings) | set(previous) if previous.get(k) != settings.get(k))
                raise SettingsChanged(f"{out} holds {stage} outputs made with other settings ({', '.join(changed)}); "
                                      "pass --overwrite to redo them or choose another --out")
            if shard[0] == 0:
                for name in outputs:
                    shutil.rmtree(Path(out) / name, ignore_errors=True)
                for path in [Path(out) / "manifest.json", *Path(out).glob("manifest.shard-*.json")]:
                    path.unlink(missing_ok=True)
        manifest = cls(out, stage, settings, shard)
        if previous is not None and previous != settings:
            manifest.data["images"] = {}
        manifest.flush()  # the new settings are on disk before the first output is
        return manifest

    def record(self, name: str, status: str, **info) -> None:
        self.data["images"][name] = {"status": status, **info}
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.data["counts"] = _count(self.data["images"])
        text = _json_text(self.data)
        if text != self._written:
            write_text(self.path, text)
            self._written = text
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


def process_images(samples: Sequence, manifest: Manifest, batch_size: int, is_done: Callable[[Any], bool],
                   load: Callable[[Any], Any], process: Callable[[list, list[Any]], None],
                   overwrite: bool = False, progress: bool = True) -> dict:
    """The loop of every per-image stage over `Sample`s (their `key` names every output): skip
    samples whose outputs exist, load the rest in batches and hand each batch to `process` (which
    writes the outputs and records them), with a progress bar.

    A sample that cannot be read, or whose map or decoded image is not finite (`SampleError`), is
    named, recorded as failed and skipped; its batch is redone one sample at a time so the others
    are kept. Out of memory, the batch size is halved and the stage goes on, saying so."""
    import torch
    from tqdm.auto import tqdm

    from conceptseg.geometry import SampleError

    todo = [s for s in samples if overwrite or not is_done(s)]
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=manifest.data["stage"], unit="img", disable=not progress)
    failed = 0

    def fail(s, e: Exception) -> None:
        nonlocal failed
        failed += 1
        message = str(e) if str(s.image) in str(e) else f"{s.image}: {e}"
        tqdm.write(f"skipped {message}")
        manifest.record(s.key, "failed", error=message)
        bar.update(1)

    def run(batch: list, loaded: list) -> None:
        try:
            process(batch, loaded)
        except SampleError as e:
            if len(batch) == 1:
                return fail(batch[0], e)
            for one, item in zip(batch, loaded):  # find the sample at fault, keep the rest
                run([one], [item])
            return
        bar.update(len(batch))

    start = 0
    while start < len(todo):
        chunk = todo[start : start + batch_size]
        batch, loaded = [], []
        for s in chunk:
            try:
                loaded.append(load(s))
                batch.append(s)
            except SampleError as e:
                fail(s, e)
        try:
            if batch:
                run(batch, loaded)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise RuntimeError(f"{manifest.data['stage']}: out of memory with one image per batch ({batch[0].image}); "
                                   "use a smaller model resolution, bf16 (--dtype bf16), or a device with more memory") from None
            batch_size = max(1, batch_size // 2)
            tqdm.write(f"{manifest.data['stage']}: out of memory; batch size halved to {batch_size}, going on")
            _empty_cache()
            bar.update(-(len(chunk) - len(batch)))  # those read failures are recounted on the retry
            failed -= len(chunk) - len(batch)
            continue
        start += len(chunk)
    bar.close()
    manifest.flush()
    return {"images": len(samples), "processed": len(todo) - failed, "skipped_done": len(samples) - len(todo), "failed": failed}


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
