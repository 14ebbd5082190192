"""Where a loaded model's networks live: one policy for every family, the practice of diffusers'
training scripts.

  load once          a stage that needs a model it already has uses that one (`conceptseg run`
                     holds one at a time and hands it to fine-tuning when the dtypes agree)
  frozen parts       VAE and text encoders in the weight dtype (the mixed-precision dtype; fp32
                     without), also when the denoiser trains in fp32 (`cast_frozen`; a model
                     loaded for training is cast on the CPU, then moved, `to`)
  text encoders      off the device once the conditioning a stage needs is computed
                     (`offload_text_encoders`): moved to the CPU when the stage needs them again
                     (a full fine-tune exports them), dropped otherwise
  freed              a model no later stage needs releases its networks (`release`), and the
                     device's cache is emptied (`free_device_memory`)
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import sys

import torch


def free_device_memory(device: torch.device | str | None = None) -> None:
    """Collect what was released and hand the allocator's free memory back: the CUDA cache on a CUDA
    device, and the C heap's free pages on the host (glibc keeps freed tensor memory in its arenas;
    untrimmed, a CPU run's resident memory stays near fine-tuning's peak for every later stage)."""
    gc.collect()
    if torch.device(device or "cpu").type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim_host_heap()


def _trim_host_heap() -> bool:
    """glibc's malloc_trim(0); False where the C library has none (macOS, Windows, musl)."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False


def reset_peak_rss() -> bool:
    """Start a new high-water mark of this process's resident memory (Linux: /proc/self/clear_refs),
    so that `peak_rss_mb` measures from here; False where that is not allowed (the peak then counts
    from the process's start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB since `reset_peak_rss` (or its start); child
    processes not included. None where the platform reports none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


class Residency:
    """The residency policy of a model dataclass with `vae`, `text_encoder*` fields and `device`
    (mixed into `families.base.FamilyModel`, which every family's model class subclasses)."""

    text_encoders_dropped = False  # set by offload_text_encoders(keep=False)

    def networks(self) -> dict[str, torch.nn.Module]:
        """Every network the model holds, by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.nn.Module)}

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {k: m for k, m in self.networks().items() if k.startswith("text_encoder")}

    def to(self, device: torch.device | str):
        """Every network to `device`, which becomes the model's device; returns the model."""
        for module in self.networks().values():
            module.to(device)
        self.device = torch.device(device)
        return self

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """VAE and text encoders in `dtype`, as diffusers' training scripts hold frozen modules in the
        weight dtype. A VAE whose config asks for fp32 under fp16 (`force_upcast`: SDXL's, which
        overflows) stays fp32, as its pipelines keep it."""
        for name, module in self.networks().items():
            if name == "vae" and dtype == torch.float16 and module.config.get("force_upcast", False):
                continue
            if (name == "vae" or name.startswith("text_encoder")) and module.dtype != dtype:  # (diffusers warns on any cast)
                module.to(dtype)

    def offload_text_encoders(self, keep: bool = True) -> None:
        """The text encoders leave the device: to the CPU (`keep`; `conditioning` still works, on the
        CPU) or dropped (conditioning then refuses, naming why)."""
        for name, module in self.text_encoders().items():
            if keep:
                module.to("cpu")
            else:
                setattr(self, name, None)
        if not keep:
            self.text_encoders_dropped = True
        free_device_memory(self.device)

    def check_text_encoders(self) -> None:
        """Refuse to encode prompts once the text encoders were dropped."""
        if self.text_encoders_dropped:
            raise RuntimeError(f"the text encoders of {self.source} were dropped once the conditioning was computed "
                               "(offload_text_encoders(keep=False)); load the model again to encode other prompts")

    def release(self) -> None:
        """Drop every network (the model is not usable afterwards) and return their memory."""
        for name in self.networks():
            setattr(self, name, None)
        free_device_memory(self.device)
