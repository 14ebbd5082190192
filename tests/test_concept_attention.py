"""`--maps concept-attention` (ConceptAttention) on tiny random-weight SD 3 / 3.5 and FLUX.1 models:
the maps equal a computation written out from the blocks' Linear weights, the denoiser's output is
bit-identical with and without the concept branch, the processors and hooks are restored, several
concepts' maps sum to 1 per pixel, the CLI runs end to end, SD 1.x / SDXL refuse it."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from conceptseg.cli import main
from conceptseg.concept_attention import embed_concepts
from conceptseg.prelim import PrelimConfig, PrelimRunner

PROMPT = "a photo of a bird"
WORDS = ["bird", "sky"]


@dataclass
class Case:
    """A tiny joint-attention model with two noised latents, PROMPT's conditioning and WORDS' concept tokens."""

    model: object
    z: torch.Tensor
    levels: torch.Tensor
    cond: object
    embeds: torch.Tensor


@pytest.fixture
def case(tiny_family_models, family, noised) -> Case:
    """The setup of a test parametrized over `family`."""
    model = tiny_family_models[family]
    z, levels = noised(model)
    return Case(model, z, levels, model.text_conditioning(PROMPT), embed_concepts(model, WORDS))


# ------------------------------------------------------------------ the reference, by hand


def _linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def _rms(x, norm):
    if norm is None:
        return x
    x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)
    return x * norm.weight if norm.weight is not None else x


def _modulate(x, scale, shift):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def _ada_zero(x, norm, temb):
    """AdaLayerNormZero: (normed, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
    chunks = _linear(F.silu(temb), norm.linear).split(x.shape[-1], dim=1)  # 9 in SD 3.5's dual-attention blocks
    shift, scale, gate, shift2, scale2, gate2 = chunks[:6]
    return _modulate(x, scale, shift), gate, shift2, scale2, gate2


def _heads(x, attn):
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, H, S, D)


def _qkv(x, attn, text: bool):
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if text else ("to_q", "to_k", "to_v")
    q, k, v = (_heads(_linear(x, getattr(attn, n)), attn) for n in names)
    q = _rms(q, attn.norm_added_q if text else attn.norm_q)
    k = _rms(k, attn.norm_added_k if text else attn.norm_k)
    return q, k, v


def _attend(q, k, v):
    probs = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)
    return (probs @ v).transpose(1, 2).flatten(2)  # (B, S, H*D)


def _reference_block(block, rec, concepts, rotary):
    """One joint block's concept map (B, N, C) and the concepts' next residual, from its weights."""
    attn, temb = block.attn, rec["temb"]
    img = _ada_zero(rec["hidden_states"], block.norm1, temb)[0]
    if getattr(block, "context_pre_only", False):
        scale, shift = _linear(F.silu(temb), block.norm1_context.linear).chunk(2, dim=1)
        txt, c_in, gates = _modulate(rec["encoder_hidden_states"], scale, shift), _modulate(concepts, scale, shift), None
    else:
        txt = _ada_zero(rec["encoder_hidden_states"], block.norm1_context, temb)[0]
        c_in, *gates = _ada_zero(concepts, block.norm1_context, temb)
    qi, ki, vi = _qkv(img, attn, text=False)
    qt, kt, vt = _qkv(txt, attn, text=True)
    qc, kc, vc = _qkv(c_in, attn, text=True)
    if rotary is not None:  # FLUX: text ids 0 then the image ids; concepts unrotated (id 0)
        t = qt.shape[2]
        q = apply_rotary_emb(torch.cat([qt, qi], 2).transpose(1, 2), rotary, sequence_dim=1).transpose(1, 2)
        k = apply_rotary_emb(torch.cat([kt, ki], 2).transpose(1, 2), rotary, sequence_dim=1).transpose(1, 2)
        qt, qi, kt, ki = q[:, :, :t], q[:, :, t:], k[:, :, :t], k[:, :, t:]
    o_img = _attend(qi, torch.cat([ki, kt], 2), torch.cat([vi, vt], 2))
    o_c = _attend(qc, torch.cat([ki, kc], 2), torch.cat([vi, vc], 2))
    scores = o_img @ o_c.transpose(1, 2)
    if gates is None:
        return scores, None
    gate, shift2, scale2, gate2 = gates
    c = concepts + gate[:, None] * _linear(o_c, attn.to_add_out)
    ff = block.ff_context.net
    h = _linear(F.gelu(_linear(_modulate(c, scale2, shift2), ff[0].proj), approximate="tanh"), ff[2])
    return scores, c + gate2[:, None] * h


@contextmanager
def _recorded_blocks(transformer):
    """Within the block, the keyword arguments of every joint block's calls, in order."""
    records = []
    handles = [block.register_forward_pre_hook(lambda m, a, kw: records.append(dict(kw)), with_kwargs=True)
               for block in transformer.transformer_blocks]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ("sd3", "sd3.5", "flux"))
def test_maps_equal_the_computation_from_the_weights(case) -> None:
    model, embeds = case.model, case.embeds
    blocks = model.transformer.transformer_blocks
    with _recorded_blocks(model.transformer) as records, torch.no_grad(), \
            model.capture_attention([[0], [1]], maps="concept-attention", concepts=embeds) as store:
        model.denoise(case.z, case.levels, case.cond)
        maps = store.pop_mean()  # (B, C, h, w)
    assert len(records) == len(blocks) >= 1
    with torch.no_grad():
        concepts = _linear(embeds, model.transformer.context_embedder).expand(len(case.z), -1, -1)
        total = 0
        for block, rec in zip(blocks, records):
            scores, concepts = _reference_block(block, rec, concepts, rec.get("image_rotary_emb"))
            total = total + scores.softmax(-1)
    expected = (total / len(blocks)).transpose(1, 2).reshape(maps.shape)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    assert (maps[0] - maps[1]).abs().max() > 1e-4  # the images differ, so the comparison can fail


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_single_concept_is_the_raw_dot_product_of_the_chosen_layer(case) -> None:
    model = case.model
    embeds = case.embeds[:, :1]  # "bird" alone
    with _recorded_blocks(model.transformer) as records, torch.no_grad(), \
            model.capture_attention([[0]], maps="concept-attention", concepts=embeds, concept_layers=(0,)) as store:
        model.denoise(case.z, case.levels, case.cond)
        maps = store.pop_mean()
    with torch.no_grad():
        concepts = _linear(embeds, model.transformer.context_embedder).expand(len(case.z), -1, -1)
        scores, _ = _reference_block(model.transformer.transformer_blocks[0], records[0], concepts,
                                     records[0].get("image_rotary_emb"))
    torch.testing.assert_close(maps, scores.transpose(1, 2).reshape(maps.shape), atol=1e-4, rtol=1e-4)
    assert maps.min() < 0 or maps.max() > 1  # raw dot products: not a probability


# ------------------------------------------------------------------ the image stream and the processors


@pytest.mark.parametrize("family", ("sd3", "sd3.5", "flux"))
def test_denoiser_output_is_bit_identical(case) -> None:
    model, z, levels, cond = case.model, case.z, case.levels, case.cond
    with torch.no_grad():
        plain = model.denoise(z, levels, cond)
        with model.capture_attention([[0], [1]], maps="concept-attention", concepts=case.embeds) as store:
            with_concepts = model.denoise(z, levels, cond)
            assert store.num_layers == len(model.transformer.transformer_blocks)
    assert torch.equal(with_concepts, plain)


def _state(transformer) -> tuple:
    hooks = [len(transformer._forward_pre_hooks)] + [len(b._forward_pre_hooks) for b in transformer.transformer_blocks]
    return dict(transformer.attn_processors), hooks


def _assert_restored(transformer, before) -> None:
    procs, hooks = _state(transformer)
    assert list(procs) == list(before[0]) and all(procs[k] is before[0][k] for k in procs)
    assert hooks == before[1]


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_processors_and_hooks_restored_after_success_and_error(case) -> None:
    model, z, levels, cond, embeds = case.model, case.z, case.levels, case.cond, case.embeds
    before = _state(model.transformer)
    with torch.no_grad(), model.capture_attention([[0], [1]], maps="concept-attention", concepts=embeds):
        during = _state(model.transformer)
        model.denoise(z, levels, cond)
    assert during[1] != before[1] and any(during[0][k] is not before[0][k] for k in before[0])
    _assert_restored(model.transformer, before)
    bad = embeds[..., :7]  # wrong text width: fails inside the forward pass
    with pytest.raises(RuntimeError), torch.no_grad(), model.capture_attention([[0], [1]], maps="concept-attention", concepts=bad):
        model.denoise(z, levels, cond)
    _assert_restored(model.transformer, before)


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_multi_concept_maps_sum_to_one_per_pixel(tiny_family_models, family) -> None:
    model = tiny_family_models[family]
    runner = PrelimRunner(model, PrelimConfig(["bird", "branch", "sky"], steps=2, maps="concept-attention"))
    from conceptseg.prelim import attention_maps, image_noise

    latents = model.encode_images(np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
    noise = image_noise(0, "k", (2, *latents.shape[1:]))[None]
    maps = attention_maps(model, latents, runner.cond, runner.token_groups, runner.timesteps, noise, 2,
                          **runner.capture_options)
    assert maps.shape == (1, 3, 16, 16)
    torch.testing.assert_close(maps.sum(1), torch.ones(1, 16, 16))
    assert maps.min() >= 0 and (maps[:, 0] - maps[:, 1]).abs().max() > 1e-4


# ------------------------------------------------------------------ stage 1 and the CLI


def test_cli_prelim_concept_attention_end_to_end(tiny_family_dirs, make_image, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    make_image(images / "wide.png", 48, 30, seed=1)
    make_image(images / "square.jpg", 40, 40, seed=2)
    out = tmp_path / "out"
    main(["prelim", "--model", str(tiny_family_dirs["flux"]), "--concept", "bird", "--images", str(images),
          "--out", str(out), "--device", "cpu", "--steps", "2", "--maps", "concept-attention"])
    assert "FLUX.1" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["done"] == 2 and manifest["settings"]["maps"] == "concept-attention"
    for stem in ("wide", "square"):
        attention = np.load(out / "attention" / f"{stem}.npy")
        assert attention.shape == (16, 16) and np.isfinite(attention).all()
        assert attention.min() >= 0 and attention.max() == pytest.approx(1.0)  # one concept: min-max scaled
    cross = tmp_path / "cross"
    main(["prelim", "--model", str(tiny_family_dirs["flux"]), "--concept", "bird", "--images", str(images),
          "--out", str(cross), "--device", "cpu", "--steps", "2"])
    assert "maps" not in json.loads((cross / "manifest.json").read_text())["settings"]  # the default, as before
    assert not np.allclose(np.load(cross / "attention" / "wide.npy"), np.load(out / "attention" / "wide.npy"))


@pytest.mark.parametrize("family", ("sd", "sdxl"))
def test_cross_attention_families_refuse_it(tiny_model, tiny_family_models, family) -> None:
    model = tiny_model if family == "sd" else tiny_family_models[family]
    with pytest.raises(ValueError, match="needs a joint-attention model.*use --maps cross-attention"):
        PrelimRunner(model, PrelimConfig("bird", steps=2, maps="concept-attention"))


def test_options_checked() -> None:
    with pytest.raises(ValueError, match="unknown map kind"):
        PrelimConfig("bird", maps="concept")
    with pytest.raises(ValueError, match="compile"):
        PrelimConfig("bird", maps="concept-attention", compile=True)


@pytest.mark.parametrize("family", ("sd3",))
def test_concept_layers_name_existing_blocks(case) -> None:
    model, z, levels = case.model, case.z, case.levels
    embeds = case.embeds[:, :1]
    with pytest.raises(ValueError, match="has 2 joint-attention blocks"):
        with model.capture_attention([[0]], maps="concept-attention", concepts=embeds, concept_layers=(5,)):
            pass
    with torch.no_grad(), model.capture_attention([[0]], maps="concept-attention", concepts=embeds,
                                                  concept_layers=(-1,)) as store:
        model.denoise(z, levels, case.cond)
        assert store.num_layers == 1
