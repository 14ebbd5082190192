"""Cross-attention capture: the processors it swaps in and out, and what it records."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from conceptseg.attention import (
    CrossAttentionCaptureProcessor,
    CrossAttentionStore,
    capture_cross_attention,
    is_cross_attention,
)

LAT = 16  # latent side of the tiny preset


@pytest.fixture(scope="module")
def mixed_unet():
    """A fresh tiny UNet whose layers carry a mix of processor classes, one object per layer."""
    from conceptseg.modeling import build_components

    unet = build_components("tiny", seed=1)["unet"].eval().requires_grad_(False)
    names = list(unet.attn_processors)
    unet.set_attn_processor({n: (AttnProcessor() if i % 3 == 0 else AttnProcessor2_0()) for i, n in enumerate(names)})
    return unet


@pytest.fixture(scope="module")
def unet_inputs(tiny_model):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, LAT, LAT, generator=g)
    t = torch.tensor([1, 500])
    cond = tiny_model.encode_prompts(["a photo of a bird", "a photo of a cat"])
    return z, t, cond


def _snapshot(unet) -> dict:
    return dict(unet.attn_processors)


def _assert_same_processors(now: dict, before: dict) -> None:
    assert list(now) == list(before)
    for name, proc in before.items():
        assert now[name] is proc, name
        assert type(now[name]) is type(proc), name


def test_is_cross_attention() -> None:
    assert is_cross_attention("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor")
    assert not is_cross_attention("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor")


def test_only_cross_attention_is_swapped_and_all_is_restored(mixed_unet, unet_inputs) -> None:
    before = _snapshot(mixed_unet)
    cross = [n for n in before if n.endswith("attn2.processor")]
    self_ = [n for n in before if n.endswith("attn1.processor")]
    assert len(cross) == len(self_) == 7 and len(before) == 14
    assert len({id(p) for p in before.values()}) == 14  # one object per layer: identity is meaningful
    assert {type(p) for p in before.values()} == {AttnProcessor, AttnProcessor2_0}
    with capture_cross_attention(mixed_unet, [[5]], (LAT, LAT)) as store:
        during = _snapshot(mixed_unet)
        for name in cross:
            assert isinstance(during[name], CrossAttentionCaptureProcessor), name
            assert during[name].store is store
        for name in self_:
            assert during[name] is before[name], name  # self-attention untouched
        z, t, cond = unet_inputs
        mixed_unet(z, t, cond)
    _assert_same_processors(_snapshot(mixed_unet), before)


def test_processors_restored_after_exception_in_block(mixed_unet) -> None:
    before = _snapshot(mixed_unet)
    with pytest.raises(KeyError, match="boom"):
        with capture_cross_attention(mixed_unet, [[5]], (LAT, LAT)):
            assert isinstance(mixed_unet.attn_processors[next(n for n in before if n.endswith("attn2.processor"))],
                              CrossAttentionCaptureProcessor)
            raise KeyError("boom")
    _assert_same_processors(_snapshot(mixed_unet), before)


def test_processors_restored_after_exception_inside_forward(mixed_unet, unet_inputs) -> None:
    before = _snapshot(mixed_unet)
    z, t, cond = unet_inputs
    with pytest.raises(RuntimeError):
        with capture_cross_attention(mixed_unet, [[5]], (LAT, LAT)):
            mixed_unet(z, t, cond[..., :7])  # wrong text width: fails inside the first attn2
    _assert_same_processors(_snapshot(mixed_unet), before)


def test_capture_does_not_change_the_unet_output(tiny_model, unet_inputs) -> None:
    unet = tiny_model.unet
    z, t, cond = unet_inputs
    with torch.no_grad():
        plain = unet(z, t, cond).sample
        with capture_cross_attention(unet, [[5]], (LAT, LAT)) as store:
            captured = unet(z, t, cond).sample
        swapped = unet(z, t, cond.flip(0)).sample
    assert store.num_layers == 7
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=0)
    # ...and the comparison can fail: the text conditioning does change the output
    assert (swapped - plain).abs().max() > 1e-3


def test_capture_with_encoder_attention_mask(tiny_model, unet_inputs) -> None:
    unet = tiny_model.unet
    z, t, cond = unet_inputs
    mask = torch.ones(2, 77)
    mask[:, 10:] = 0  # keys 10..76 masked out
    groups = [[i] for i in range(77)]
    with torch.no_grad():
        plain = unet(z, t, cond, encoder_attention_mask=mask).sample
        with capture_cross_attention(unet, groups, (LAT, LAT)) as store:
            captured = unet(z, t, cond, encoder_attention_mask=mask).sample
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=0)
    maps = store.pop_mean()
    assert maps[:, 10:].abs().max() == 0  # no probability on masked keys
    torch.testing.assert_close(maps.sum(1), torch.ones(2, LAT, LAT), atol=1e-5, rtol=0)


def test_probabilities_sum_to_one_over_all_tokens(tiny_model, unet_inputs) -> None:
    unet = tiny_model.unet
    z, t, cond = unet_inputs
    n_cross = sum(is_cross_attention(n) for n in unet.attn_processors)
    with torch.no_grad(), capture_cross_attention(unet, [[i] for i in range(77)], (LAT, LAT)) as store:
        unet(z, t, cond)
        assert store.num_layers == n_cross == 7
        maps = store.pop_mean()
    assert maps.shape == (2, 77, LAT, LAT) and maps.dtype == torch.float32
    assert maps.min() >= 0
    torch.testing.assert_close(maps.sum(1), torch.ones(2, LAT, LAT), atol=1e-5, rtol=0)
    # the maps are not uniform: they depend on the image position and on the token
    assert maps.std(dim=(2, 3)).max() > 1e-4
    assert store.num_layers == 0 and store.total is None  # pop_mean resets


def test_layers_counted_per_forward_pass(tiny_model, unet_inputs) -> None:
    unet = tiny_model.unet
    z, t, cond = unet_inputs
    with torch.no_grad(), capture_cross_attention(unet, [[5]], (LAT, LAT)) as store:
        unet(z, t, cond)
        unet(z, t, cond)
        assert store.num_layers == 14
        two = store.pop_mean()
        unet(z, t, cond)
        one = store.pop_mean()
    torch.testing.assert_close(two, one, atol=1e-6, rtol=0)  # a mean, not a sum, over layers


# ------------------------------------------------------------------ the store on its own


def test_store_averages_heads_and_group_tokens_and_upsamples() -> None:
    store = CrossAttentionStore([[0, 1], [2]], latent_hw=(4, 4))
    torch.manual_seed(0)
    fine = torch.rand(1, 2, 16, 3).softmax(-1)  # 4x4 queries
    coarse = torch.rand(1, 2, 4, 3).softmax(-1)  # 2x2 queries
    store.add(fine)
    store.add(coarse)
    got = store.pop_mean()
    assert got.shape == (1, 2, 4, 4)

    def maps(p, side):
        g0 = p[..., [0, 1]].mean(-1).mean(1).reshape(side, side)
        g1 = p[..., 2].mean(1).reshape(side, side)
        return torch.stack([g0, g1])

    up = maps(coarse, 2).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # nearest x2
    torch.testing.assert_close(got[0], (maps(fine, 4) + up) / 2)


def test_store_per_level_means_weight_back_to_the_overall_mean() -> None:
    torch.manual_seed(0)
    probs = [torch.rand(2, 2, 16, 3).softmax(-1), torch.rand(2, 2, 16, 3).softmax(-1), torch.rand(2, 2, 4, 3).softmax(-1)]
    overall, levels = CrossAttentionStore([[1]], (4, 4)), CrossAttentionStore([[1]], (4, 4), per_level=True)
    for p in probs:
        overall.add(p)
        levels.add(p)
    by_level = levels.pop_level_means()
    assert sorted(by_level) == ["2x2", "4x4"]
    fine_only = CrossAttentionStore([[1]], (4, 4))
    fine_only.add(probs[0])
    fine_only.add(probs[1])
    torch.testing.assert_close(by_level["4x4"], fine_only.pop_mean())
    torch.testing.assert_close((2 * by_level["4x4"] + by_level["2x2"]) / 3, overall.pop_mean())
    assert levels.level_totals == {} and levels.total is None  # popped means reset
    with pytest.raises(RuntimeError, match="per_level"):
        overall.pop_level_means()


def test_store_non_square_latent_grid() -> None:
    store = CrossAttentionStore([[0]], latent_hw=(4, 6))
    probs = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1)  # a 2x3 grid
    store.add(probs)
    got = store.pop_mean()[0, 0]
    expected = torch.arange(6, dtype=torch.float32).view(2, 3).repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(got, expected)


def test_store_errors() -> None:
    with pytest.raises(ValueError):
        CrossAttentionStore([], (4, 4))
    with pytest.raises(ValueError):
        CrossAttentionStore([[1], []], (4, 4))
    store = CrossAttentionStore([[0]], (4, 4))
    with pytest.raises(RuntimeError, match="attn2"):
        store.pop_mean()
    with pytest.raises(ValueError, match="cannot place 5"):
        store.add(torch.ones(1, 1, 5, 1))
