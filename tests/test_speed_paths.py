"""The fast paths give the reference outputs: stage 1 compiled / channels_last / padded to static
batches, the torch GMM against scikit-learn's, and data loading in DataLoader workers.

Tolerances: stage-1 maps within 1e-5 absolute (the tiny model's maps peak near 0.05), the bound
tests/test_prelim.py already holds the eager path to across batch sizes, since a padded or compiled
pass runs the same rows in another batch shape; masks exactly equal.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.prelim import (
    PrelimConfig,
    PrelimRunner,
    attention_maps,
    compiled_rows_maps,
    image_noise,
)
from conceptseg.thresholding import (
    binarize,
    binarize_maps,
    gmm_threshold,
    gmm_thresholds_torch,
    orphan_filter,
    orphan_filter_torch,
)

# ------------------------------------------------------------------ stage 1


def _runs(runner, images):
    out = runner(images[:2], ["a", "b"]) + runner(images[2:], ["c"])  # the second call is short: padded
    return np.stack([r.attention for r in out]), np.stack([r.mask_latent for r in out])


def test_padded_static_batches_give_the_same_maps(tiny_model) -> None:
    rng = np.random.default_rng(0)
    latents = tiny_model.encode_images(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    noise = torch.stack([image_noise(0, f"k{i}", (3, *latents.shape[1:])) for i in range(3)])
    cond = tiny_model.encode_prompts(["a photo of a bird"])
    plain = attention_maps(tiny_model, latents, cond, [[5]], [1, 21, 41], noise, batch_size=4)
    padded = attention_maps(tiny_model, latents, cond, [[5]], [1, 21, 41], noise, batch_size=4, pad_to=4)  # 9 rows: 4+4+1(+3)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=0)
    assert (plain[0] - plain[2]).abs().max() > 1e-4  # the maps differ per image: padding rows would show


@pytest.mark.parametrize("backend", ["eager"] + (["inductor"] if os.environ.get("CONCEPTSEG_TEST_INDUCTOR") else []))
def test_compiled_capture_gives_the_eager_maps_and_masks(tiny_model, textured, backend) -> None:
    """torch.compile (fullgraph) of the pass with the capture: the maps come back through its return
    value. aot_eager traces and functionalises exactly as inductor does but skips code generation (15 s
    here; inductor takes minutes on this CPU: CONCEPTSEG_TEST_INDUCTOR=1 adds it)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    images = [textured(40, 24, seed=1), textured(24, 40, seed=2), textured(32, 32, seed=3)]
    eager = _runs(PrelimRunner(tiny_model, PrelimConfig("bird", steps=3, batch_size=6)), images)
    torch._dynamo.reset()
    counters.clear()
    runner = PrelimRunner(tiny_model, PrelimConfig("bird", steps=3, batch_size=6, compile=True, compile_backend=backend))
    assert runner.pad_to == 6
    maps, masks = _runs(runner, images)
    np.testing.assert_allclose(maps, eager[0], atol=1e-5, rtol=0)
    assert np.array_equal(masks, eager[1])
    assert counters["stats"]["unique_graphs"] == 1  # the short last call was padded: no recompile
    # the capture processors are gone again after each call
    assert not any(type(p).__name__ == "CrossAttentionCaptureProcessor" for p in tiny_model.unet.attn_processors.values())


def test_compiled_rows_maps_refuses_graph_breaks(tiny_model) -> None:
    """fullgraph: a capture that cannot be traced is an error, not a silently slower split graph."""
    import torch._dynamo

    torch._dynamo.reset()
    forward = compiled_rows_maps(backend="eager")

    class Store:
        def reset(self):
            pass

        def pop_mean(self):
            print("a side effect dynamo cannot trace")  # a graph break
            return torch.zeros(1)

    class Model:
        def denoise(self, noisy, t, cond):
            return noisy * 2

    with pytest.raises(Exception, match="(?i)graph break|unsupported|print"):
        forward(Model(), Store(), torch.zeros(1, 4, 2, 2), torch.zeros(1), None)


def test_channels_last_gives_the_same_maps(textured) -> None:
    from conceptseg.modeling import build_components
    from conceptseg.models import from_components

    model = from_components(build_components("tiny", seed=0), device="cpu", dtype="fp32")  # own copy: it is changed
    images = [textured(40, 24, seed=1), textured(24, 40, seed=2), textured(32, 32, seed=3)]
    eager = _runs(PrelimRunner(model, PrelimConfig("bird", steps=3, batch_size=6)), images)
    runner = PrelimRunner(model, PrelimConfig("bird", steps=3, batch_size=6, channels_last=True))
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    maps, masks = _runs(runner, images)
    np.testing.assert_allclose(maps, eager[0], atol=1e-5, rtol=0)
    assert np.array_equal(masks, eager[1])


def test_speed_options_are_execution_settings_and_cli_flags() -> None:
    from conceptseg.cli import build_parser
    from conceptseg.refine import RefineConfig
    from conceptseg.settings import output_settings

    fast = output_settings(PrelimConfig("bird", compile=True, channels_last=True, compile_mode="max-autotune", gmm="torch"))
    assert fast == output_settings(PrelimConfig("bird"))  # a finished run's folder is not refused or redone
    assert output_settings(RefineConfig(gmm="torch")) == output_settings(RefineConfig())
    args = build_parser().parse_args(["prelim", "--concept", "bird", "--images", "x", "--out", "y", "--compile",
                                      "--compile-mode", "reduce-overhead", "--channels-last", "--gmm", "torch"])
    assert (args.compile, args.compile_mode, args.channels_last, args.gmm) == (True, "reduce-overhead", True, "torch")
    args = build_parser().parse_args(["refine", "--images", "x", "--prelim", "p", "--out", "y", "--gmm", "torch"])
    assert args.gmm == "torch"
    with pytest.raises(ValueError, match="GMM method"):
        PrelimConfig("bird", gmm="em")
    with pytest.raises(ValueError, match="gmm must be"):
        RefineConfig(gmm="em")


# ------------------------------------------------------------------ GMM


def _representative_maps() -> list[np.ndarray]:
    """Maps shaped like the method's: attention maps (a smooth blob over a skewed background, foreground
    5-40% of the map) and stage-3 difference maps (means of 3 uint8 differences: multiples of 1/3)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 32
    maps = []
    for i in range(12):
        cy, cx, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.12, 0.35)]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        maps.append(0.02 + 0.05 * blob + rng.gamma(2.0, 0.004, (32, 32)))
    for i in range(12):
        fg = np.zeros((64, 64), bool)
        y, x, h, w = rng.integers(8, 24, 4)
        fg[y : y + h, x : x + w] = True
        diff = np.where(fg[..., None], rng.normal(60, 20, (64, 64, 3)), np.abs(rng.normal(0, 6, (64, 64, 3))))
        maps.append(np.clip(np.round(diff), 0, 255).mean(-1))
    return maps


def test_torch_gmm_matches_sklearn_on_representative_maps() -> None:
    """The same k-means start, then EM in torch: sklearn's threshold to rounding (1e-9 relative; float64
    sums in another order), for each seed, batched or not."""
    maps = _representative_maps()
    for seed in (0, 1):
        torch_t = gmm_thresholds_torch(torch.from_numpy(np.stack([m.ravel() for m in maps[:12]])), seed=seed).tolist()
        torch_t += gmm_thresholds_torch(torch.from_numpy(np.stack([m.ravel() for m in maps[12:]])), seed=seed).tolist()
        for m, t in zip(maps, torch_t):
            assert t == pytest.approx(gmm_threshold(m, seed=seed), rel=1e-9)
    assert len(set(np.round(torch_t, 6))) == len(maps)  # the thresholds differ per map
    one = gmm_thresholds_torch(torch.from_numpy(maps[3].ravel())[None]).item()
    assert one == pytest.approx(gmm_threshold(maps[3]), rel=1e-9)


def test_torch_binarize_equals_sklearn_binarize_with_padding_and_orphans() -> None:
    maps = _representative_maps()[:12]
    valid = np.ones((12, 32, 32), bool)
    valid[::2, :, 26:] = False  # padding on half the maps
    stacked = np.stack(maps)
    stacked[~valid] = 1000.0  # must neither be foreground nor move the threshold
    reference = np.stack([binarize(m, v) for m, v in zip(stacked, valid)])
    assert np.array_equal(binarize_maps(torch.from_numpy(stacked), valid, method="torch"), reference)
    assert np.array_equal(binarize_maps(torch.from_numpy(stacked), valid, method="sklearn"), reference)
    assert np.array_equal(binarize(stacked[0], valid[0], method="torch"), reference[0])
    assert 0.03 < reference.mean() < 0.5


def test_torch_gmm_edge_cases() -> None:
    flat = np.full((8, 8), 3.0)
    assert not binarize(flat, method="torch").any()
    assert gmm_thresholds_torch(torch.tensor([[1.0]])).item() == float("inf")
    some = np.random.default_rng(0).normal(size=(8, 8))
    assert not binarize(some, np.zeros((8, 8), bool), method="torch").any()  # nothing valid
    three = np.concatenate([np.full(50, 0.0), np.full(30, 5.0), np.full(20, 9.0)]) + np.random.default_rng(1).normal(0, 0.1, 100)
    assert gmm_thresholds_torch(torch.from_numpy(three)[None], components=3).item() == pytest.approx(
        gmm_threshold(three, components=3), rel=1e-9)
    from conceptseg.geometry import NonFiniteError

    bad = some.copy()
    bad[2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="1 NaN"):
        binarize(bad, method="torch")
    valid = np.ones((8, 8), bool)
    valid[2, 3] = False  # a NaN outside the valid cells is not looked at
    assert binarize(bad, valid, method="torch").shape == (8, 8)


def test_orphan_filter_torch_equals_scipy() -> None:
    masks = np.random.default_rng(0).random((6, 17, 23)) < np.linspace(0.2, 0.8, 6)[:, None, None]
    assert np.array_equal(orphan_filter_torch(torch.from_numpy(masks)).numpy(), np.stack([orphan_filter(m) for m in masks]))


# ------------------------------------------------------------------ segmenter data loading in workers


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from conceptseg.data.toyworld import ToyWorldConfig, generate

    return generate(tmp_path_factory.mktemp("toy") / "toy", 12, seed=0, config=ToyWorldConfig(size=32), progress=False)


def test_train_seg_weights_equal_with_0_and_2_workers(toy_data, tmp_path) -> None:
    from safetensors.torch import load_file

    from conceptseg.segmenter.train import TrainSegConfig, train_segmenter

    weights = []
    for workers in (0, 2):
        cfg = TrainSegConfig(data=[str(toy_data)], out=tmp_path / f"w{workers}", steps=3, batch_size=4, width=4,
                             input_size=32, checkpoint_every=3, progress=False, num_workers=workers)
        weights.append(load_file(train_segmenter(cfg) / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    init = __import__("conceptseg.modeling.segmenter", fromlist=["UNet"]).UNet(width=4)
    assert any(not torch.equal(weights[0][k], v) for k, v in init.state_dict().items() if k in weights[0])  # it trained


def test_segment_outputs_equal_with_0_and_2_workers(toy_data, tmp_path, make_image) -> None:
    from conceptseg.modeling.segmenter import UNet
    from conceptseg.segmenter.predict import Segmenter, run_segment

    torch.manual_seed(0)
    seg = Segmenter(UNet(width=4), 32, threshold=0.5)
    images = tmp_path / "images"
    for i in range(5):
        make_image(images / f"im{i}.png", 30 + 7 * i, 40, seed=i)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    outs = []
    for workers in (0, 2):
        dest = tmp_path / f"out{workers}"
        summary = run_segment(seg, images, dest, batch_size=2, progress=False, num_workers=workers)
        assert (summary["processed"], summary["failed"]) == (5, 1)
        outs.append({p.name: np.asarray(Image.open(p)) for p in sorted((dest / "masks").glob("*.png"))})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) == 5
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert len({int(m.sum()) for m in outs[0].values()}) > 1  # masks differ per image


def test_prefetched_loads_answer_repeats_and_errors() -> None:
    from types import SimpleNamespace

    from conceptseg.segmenter.predict import PrefetchedLoads

    samples = [SimpleNamespace(key=str(i), image=i) for i in range(6)]
    calls = []

    def load(s):
        calls.append(s.key)
        if s.key == "3":
            raise ValueError("3 is unreadable")
        return int(s.key) * 10

    loads = PrefetchedLoads(samples, load, num_workers=2)
    assert [loads(s) for s in samples[:3]] == [0, 10, 20]
    assert loads(samples[1]) == 10  # asked again (an out-of-memory retry): loaded here
    assert calls == ["1"]  # the others came from the workers
    with pytest.raises(ValueError, match="3 is unreadable"):
        loads(samples[3])
    assert loads(samples[5]) == 50 and loads(samples[4]) == 40  # out of order: kept aside, then handed over
    loads.close()
