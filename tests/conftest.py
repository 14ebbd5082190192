"""Shared fixtures: tiny random-weight models built from the `tiny` preset (diffusers-style tests).

Everything runs offline and on the CPU. The hub is switched off BEFORE diffusers / transformers /
huggingface_hub are imported (they read HF_HUB_OFFLINE at import time), so a hub look-up fails at
once instead of timing out.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# The tiny models are far too small to gain from several threads, and the machine these tests run
# on may be busy: oversubscribed threads make a 3 s test take a minute. CONCEPTSEG_TEST_THREADS
# overrides.
torch.set_num_threads(int(os.environ.get("CONCEPTSEG_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """Tests marked `long` (whole runs in several processes, a benchmark's CPU form) keep the suite
    over its 10-minute budget: they run only with CONCEPTSEG_LONG_TESTS=1."""
    if os.environ.get("CONCEPTSEG_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="a long check: run with CONCEPTSEG_LONG_TESTS=1")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)

@pytest.fixture(scope="session")
def tokenizer():
    from conceptseg.tokenizer import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    """The `tiny` preset (seed 0), fp32 on the CPU, wrapped in memory. Shared: do not modify it."""
    from conceptseg.modeling import build_components
    from conceptseg.models import from_components

    return from_components(build_components("tiny", seed=0), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The `tiny` preset (seed 0) saved as a standard diffusers folder. Shared: do not modify it."""
    from conceptseg.modeling import build_components
    from conceptseg.models import save_model

    out = tmp_path_factory.mktemp("tiny_model")
    save_model(build_components("tiny", seed=0), out)
    return out


def textured_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Noise with a bright rectangle in it: something for attention maps to differ over."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
    a[height // 4 : max(height // 4 + 1, 3 * height // 4), width // 4 : max(width // 4 + 1, 3 * width // 4)] = (230, 200, 40)
    im = Image.fromarray(a)
    return im if mode == "RGB" else im.convert(mode)


@pytest.fixture
def make_image():
    """make_image(path, width, height, seed=0, mode="RGB"): write a textured test image, return its path."""

    def make(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        textured_image(width, height, seed, mode).save(path)
        return path

    return make


@pytest.fixture
def textured():
    """textured(width, height, seed=0, mode="RGB") -> a textured in-memory PIL image."""
    return textured_image


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory) -> dict:
    """The tiny SDXL, SD 3, SD 3.5 and FLUX.1 presets (seed 0) saved as diffusers folders, by family name."""
    from conceptseg.modeling.presets import build_family_components, save_family_model

    root = tmp_path_factory.mktemp("tiny_families")
    dirs = {}
    for family in ("sdxl", "sd3", "sd3.5", "flux"):
        save_family_model(family, build_family_components(family, "tiny", seed=0), root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(scope="session")
def tiny_family_models(tiny_family_dirs) -> dict:
    """The tiny family folders loaded with `load_model`, fp32 on the CPU. Shared: do not modify them."""
    from conceptseg.models import load_model

    return {family: load_model(path, device="cpu", dtype="fp32") for family, path in tiny_family_dirs.items()}
