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

import functools  # noqa: E402
import json  # noqa: E402
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
def tiny_family_dir(tmp_path_factory):
    """tiny_family_dir(family) -> the family's `tiny` preset (seed 0) saved as a diffusers folder,
    built once per session. Shared: do not modify it."""
    from conceptseg.modeling.presets import build_family_components, save_family_model

    root = tmp_path_factory.mktemp("tiny_families")

    @functools.cache
    def build(family: str) -> Path:
        save_family_model(family, build_family_components(family, "tiny", seed=0), root / family)
        return root / family

    return build


@pytest.fixture(scope="session")
def tiny_family_dirs(tiny_family_dir) -> dict:
    """The tiny SDXL, SD 3, SD 3.5 and FLUX.1 folders (`tiny_family_dir`), by family name."""
    return {family: tiny_family_dir(family) for family in ("sdxl", "sd3", "sd3.5", "flux")}


@pytest.fixture(scope="session")
def tiny_family_models(tiny_family_dirs) -> dict:
    """The tiny family folders loaded with `load_model`, fp32 on the CPU. Shared: do not modify them."""
    from conceptseg.models import load_model

    return {family: load_model(path, device="cpu", dtype="fp32") for family, path in tiny_family_dirs.items()}


@pytest.fixture
def noised():
    """noised(model, rows=2, seed=0) -> (noisy latents, levels): `rows` random images encoded by
    `model`, noised one per level (the second and third of 3 levels; of `rows` levels for more
    rows), the input of one `denoise` call."""

    def make(model, rows: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (rows, model.resolution, model.resolution, 3), generator=g, dtype=torch.uint8)
        latents = model.encode_images(pixels.numpy())
        levels = torch.tensor(model.noise_levels(3)[1 : 1 + rows] if rows <= 2 else model.noise_levels(rows))
        return model.add_noise(latents, torch.randn(latents.shape, generator=g), levels), levels

    return make


@pytest.fixture
def finetune_pairs():
    """finetune_pairs(root, n=3, size=64) -> (images, prelim): n random images with a central square
    as M_pre, in the layout `finetune` reads."""

    def make(root: Path, n: int = 3, size: int = 64) -> tuple[Path, Path]:
        rng = np.random.default_rng(0)
        (root / "images").mkdir(parents=True)
        (root / "prelim" / "masks").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
            mask = np.zeros((size, size), np.uint8)
            mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
            Image.fromarray(mask).save(root / "prelim" / "masks" / f"im{i}.png")
        return root / "images", root / "prelim"

    return make


@pytest.fixture
def tiny_run():
    """tiny_run(model_dir, out) -> metrics: `conceptseg run` of the demo's config on a tiny family
    model, cut to seconds and to the family's part (stages 1-4 and the U-Nets that read D_s, D'_s),
    its rows and mask counts checked."""
    from conceptseg.config import override_config
    from conceptseg.demo import demo_config
    from conceptseg.pipeline import ROW_NAMES, Run

    def run(model_dir: Path, out: Path) -> dict:
        cfg = demo_config(out, model=str(model_dir), device="cpu", num_images=6)
        cfg.prelim.steps = 2
        cfg.finetune.steps = 1
        cfg.refine.steps = 2
        cfg.synth.num, cfg.synth.steps = 2, 2
        cfg.segmenter.steps, cfg.segmenter.width, cfg.segmenter.input_size = 1, 4, 32
        cfg = override_config(cfg, ["segmenter.supervised=false", "segmenter.train_on_prelim=false", "baselines=false"])
        metrics = Run(cfg, progress=False).execute()
        assert {"refined", "unet_real", "unet_real_synth"} <= set(metrics) <= set(ROW_NAMES)
        counts = json.loads((out / "manifest.json").read_text())["counts"]["images"]
        assert len(list((out / "refine" / "masks").glob("*.png"))) == counts["train"] + counts["test"]
        assert len(list((out / "synth" / "masks").glob("*.png"))) == 2
        return metrics

    return run
