"""The checks every newer family (FLUX.2, Qwen-Image) passes, on its tiny random-weight model:
`test_flux2.py` and `test_qwenimage.py` import them and name the family (their `family` fixture).

The text encoders and tokenizers are tiny ones built in code (`modeling.presets.mistral_tokenizer`,
`qwen_tokenizer`: NOT the real vocabularies). Reference values come from the diffusers pipelines
themselves (`encode_prompt`, `__call__` from the same noise, `_encode_vae_image`) or are written out
from the blocks' weights (the concept-attention maps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptseg.concept_attention import embed_concepts
from conceptseg.families import SUPPORTED
from conceptseg.inpaint import inpaint_background, sample_latents
from conceptseg.models import load_model

PROMPT = "a photo of a bird"
PIPELINES = {"flux2": "Flux2Pipeline", "qwenimage": "QwenImagePipeline"}
CLASSES = {"flux2": "Flux2Model", "qwenimage": "QwenImageModel"}


@pytest.fixture(scope="module")
def folder(tiny_family_dir, family):
    return tiny_family_dir(family)


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder, device="cpu", dtype="fp32")


def _pipeline(model):
    import diffusers

    return getattr(diffusers, PIPELINES[model.family])(**{k: getattr(model, k) for k in model.components})


# ------------------------------------------------------------------ loading, conditioning, latents


def test_load_model_detects_the_family(model, folder, family):
    assert type(model).__name__ == CLASSES[family] and model.family == family
    assert str(folder.resolve()) in model.describe() and PIPELINES[family] in SUPPORTED
    assert not model.transformer.training and all(not p.requires_grad for p in model.transformer.parameters())
    assert (model.resolution, model.attention_resolution) == (64, 16)


def test_conditioning_is_the_pipelines_encode_prompt(model, family):
    pipe = _pipeline(model)
    prompts = [PROMPT, "a photo of a background with a bird"]  # of different lengths
    cond = model.conditioning(prompts)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            embeds = pipe.encode_prompt(p, device="cpu", max_sequence_length=512)[0]
            n = embeds.shape[1]
            torch.testing.assert_close(cond.prompt_embeds[i : i + 1, :n], embeds)
            if family == "qwenimage":  # padded to the longer prompt, the padding masked
                assert cond.mask[i].sum() == n and not cond.prompt_embeds[i, n:].any()
    if family == "flux2":
        assert cond.prompt_embeds.shape == (2, 512, 3 * model.text_encoder.config.text_config.hidden_size)


def test_concept_token_positions_point_at_the_word(model, family):
    pipe = _pipeline(model)
    (bird,) = model.concept_token_positions(PROMPT, ["bird"])
    photo, bird2 = model.concept_token_positions(PROMPT, ["photo", "bird"])
    assert bird2 == bird and photo[0] < bird[0]
    if family == "flux2":
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        ids = model.tokenizer.apply_chat_template(format_input([PROMPT], pipe.system_message), tokenize=True, return_dict=True,
                                                  padding="max_length", truncation=True, max_length=512)["input_ids"][0]
    else:
        ids = model.tokenizer(pipe.prompt_template_encode.format(PROMPT))["input_ids"][pipe.prompt_template_encode_start_idx:]
    assert model.tokenizer.decode([ids[i] for i in bird]).strip() == "bird"
    with pytest.raises(ValueError, match="does not occur"):
        model.concept_token_positions(PROMPT, ["cat"])


def test_latents_are_the_pipelines(model, family):
    from conceptseg.geometry import to_model_input

    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    z = model.encode_images(pixels)
    x = to_model_input(pixels)
    with torch.no_grad():
        if family == "flux2":
            expected = _pipeline(model)._encode_vae_image(x, generator=None)  # patchified, batch-norm normalised
        else:  # one frame; (mode - latents_mean) / latents_std
            c = model.vae.config
            mode = model.vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
            expected = (mode - torch.tensor(c.latents_mean)[:, None, None]) / torch.tensor(c.latents_std)[:, None, None]
    assert z.shape == (2, model.latent_channels, 64 // model.vae_scale_factor, 64 // model.vae_scale_factor)
    torch.testing.assert_close(z, expected)
    assert model.decode_latents(z).shape == (2, 64, 64, 3)


# ------------------------------------------------------------------ sampling: the pipeline's loop


def _pipeline_latents(model, family, steps, init, guidance, output_type="latent"):
    """The pipeline's text-to-image loop from the noise `init` (B, C, h, w): its latents, unpacked
    (or its images for output_type "np")."""
    pipe, r, (b, c, h, w) = _pipeline(model), model.resolution, init.shape
    pipe.set_progress_bar_config(disable=True)
    if family == "flux2":  # unpacked noise in; packed latents out
        out = pipe(prompt=PROMPT, height=r, width=r, num_inference_steps=steps, latents=init, output_type=output_type)
        if output_type != "latent":
            return out.images
        return pipe._unpack_latents_with_ids(out.images, pipe._prepare_latent_ids(init))
    extra = {"negative_prompt": "", "true_cfg_scale": guidance} if guidance != 1 else {}
    out = pipe(prompt=PROMPT, height=r, width=r, num_inference_steps=steps, latents=pipe._pack_latents(init, b, c, h, w),
               output_type=output_type, **extra)
    return out.images if output_type != "latent" else pipe._unpack_latents(out.images, r, r, model.vae_scale_factor)[:, :, 0]


def test_sampling_equals_the_pipeline_from_the_same_noise(model, family):
    """`sample_latents` (the inpainting loop with nothing known) against the pipeline's own loop from
    the same initial noise, latents and decoded images; Qwen-Image also with its true
    classifier-free guidance (the rescaled rule, the negative prompt padded beside the prompt)."""
    shape = (1, model.latent_channels, model.latent_resolution, model.latent_resolution)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    for guidance in (1.0, 3.0) if family == "qwenimage" else (1.0,):
        ours = sample_latents(model, PROMPT, 1, steps=3, guidance=guidance, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            theirs = _pipeline_latents(model, family, 3, init, guidance)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        assert (ours - init).abs().mean() > 0.1  # the loop moved the noise
        if guidance == 1.0:
            with torch.no_grad():
                image = _pipeline_latents(model, family, 3, init, guidance, output_type="np")
            assert np.abs(model.decode_latents(ours).astype(float) / 255 - image).max() < 2 / 255


def assert_known_region_renoised(model, z0: torch.Tensor, steps: int) -> None:
    """`inpaint_background` on two latents: at every step the known region is z0 noised to the step's
    level with the noise replayed from the per-image generators (flow: (1 - sigma) z0 + sigma eps;
    DDPM: sqrt(abar) z0 + sqrt(1 - abar) eps), the background comes back as z0 exactly, the hole not."""
    side = z0.shape[-1]
    region = torch.zeros(2, side, side)
    region[:, side // 4 : side // 2, side // 4 : 3 * side // 4] = 1
    trace = []
    out = inpaint_background(model, z0, region, steps=steps, generator=[torch.Generator().manual_seed(i) for i in (1, 2)],
                             trace=trace)
    replay = [torch.Generator().manual_seed(i) for i in (1, 2)]
    for g in replay:  # the first draws are the initial noise
        torch.randn(z0.shape[1:], generator=g)
    known = (region == 0)[:, None].expand_as(z0)
    for level, z in trace:
        eps = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in replay])
        if model.objective.kind == "flow":
            assert 0 < level <= 1
            expected = (1 - level) * z0 + level * eps
        else:
            abar = model.scheduler.alphas_cumprod[level]
            expected = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        torch.testing.assert_close(z[known], expected[known], atol=1e-5, rtol=1e-5)
    assert len(trace) == steps and torch.equal(out[known], z0[known])
    assert (out[~known] - z0[~known]).abs().mean() > 0.1


def test_inpainting_keeps_the_known_region_renoised_at_every_step(model):
    z0 = torch.randn(2, model.latent_channels, model.latent_resolution, model.latent_resolution,
                     generator=torch.Generator().manual_seed(0))
    assert_known_region_renoised(model, z0, steps=3)


def test_noise_levels_and_training_objective_are_the_pipelines(model, family):
    import copy

    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    seq = model.attention_resolution**2
    c = model.scheduler.config
    mu = (compute_empirical_mu(seq, 50) if family == "flux2" else
          calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    sched = copy.deepcopy(model.scheduler)
    retrieve_timesteps(sched, 50, sigmas=np.linspace(1.0, 1 / 50, 50), mu=mu)
    np.testing.assert_allclose(model.noise_levels(40), np.sort(sched.sigmas[:50].numpy())[:40], rtol=1e-5)
    latents = torch.randn(16, model.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = model.objective.training_batch(latents, torch.Generator().manual_seed(5))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    sigma = batch.levels.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(batch.target, noise - latents)  # the velocity, as the DreamBooth scripts
    assert model.objective.weighting == "none" and batch.weight.eq(1).all()  # uniform timesteps, unweighted


# ------------------------------------------------------------------ stage 1: both map kinds


def _text_len(model):
    return model.text_conditioning(PROMPT).prompt_embeds.shape[1]


def test_cross_attention_maps_sum_to_one_over_the_text_and_leave_the_output(model, family, noised):
    z, levels = noised(model)
    cond = model.text_conditioning(PROMPT)
    before = dict(model.transformer.attn_processors)
    every_token = [[i] for i in range(_text_len(model))]
    with torch.no_grad():
        plain = model.denoise(z, levels, cond)
        with model.capture_attention(every_token) as store:
            captured = model.denoise(z, levels, cond)
            layers, maps = store.num_layers, store.pop_mean()
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    assert layers == {"flux2": 3, "qwenimage": 2}[family]  # FLUX.2 tiny: 2 double + 1 single-stream blocks
    assert maps.shape == (2, len(every_token), 16, 16)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 16, 16), atol=1e-5, rtol=0)
    assert maps.std(dim=(2, 3)).max() > 1e-5
    after = dict(model.transformer.attn_processors)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(x, norm):
    x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)
    return x * norm.weight if norm.weight is not None else x


def _qkv(x, attn, text: bool):
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if text else ("to_q", "to_k", "to_v")
    heads = attn.heads
    q, k, v = (F.linear(x, getattr(attn, n).weight, getattr(attn, n).bias).unflatten(-1, (heads, -1)) for n in names)
    return _rms(q, attn.norm_added_q if text else attn.norm_q), _rms(k, attn.norm_added_k if text else attn.norm_k), v


def _attend(q, k, v):  # (B, S, H, D) each
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return (((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1) @ v).transpose(1, 2).flatten(2)


def _reference_block(family, block, rec, concepts):
    """One joint block's concept scores (B, N, C) and the concepts' next residual, written out:
    the family's text-branch modulation, the projections, the image's (and text's) rotation."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    attn, h, e = block.attn, rec["hidden_states"], rec["encoder_hidden_states"]
    if family == "flux2":
        chunks = rec["temb_mod_img"].unsqueeze(1).chunk(6, dim=-1)
        tchunks = rec["temb_mod_txt"].unsqueeze(1).chunk(6, dim=-1)
        mod = lambda x, c: (1 + c[1]) * _ln(x) + c[0]  # noqa: E731  (shift, scale, gate, ...)
        img, txt, c_in = mod(h, chunks), mod(e, tchunks), mod(concepts, tchunks)
    else:
        im, tm = block.img_mod(rec["temb"]).chunk(2, -1), block.txt_mod(rec["temb"]).chunk(2, -1)
        mod = lambda x, p: _ln(x) * (1 + p.chunk(3, -1)[1][:, None]) + p.chunk(3, -1)[0][:, None]  # noqa: E731
        img, txt, c_in = mod(h, im[0]), mod(e, tm[0]), mod(concepts, tm[0])
    (qi, ki, vi), (qt, kt, vt), (qc, kc, vc) = _qkv(img, attn, False), _qkv(txt, attn, True), _qkv(c_in, attn, True)
    if family == "flux2":  # text first in the rotary table; concepts not rotated
        t = qt.shape[1]
        q = apply_rotary_emb(torch.cat([qt, qi], 1), rec["image_rotary_emb"], sequence_dim=1)
        k = apply_rotary_emb(torch.cat([kt, ki], 1), rec["image_rotary_emb"], sequence_dim=1)
        qt, qi, kt, ki = q[:, :t], q[:, t:], k[:, :t], k[:, t:]
    else:
        img_f, txt_f = rec["image_rotary_emb"]
        qi, ki = apply_rotary_emb_qwen(qi, img_f, use_real=False), apply_rotary_emb_qwen(ki, img_f, use_real=False)
        qt, kt = apply_rotary_emb_qwen(qt, txt_f, use_real=False), apply_rotary_emb_qwen(kt, txt_f, use_real=False)
    o_img = _attend(qi, torch.cat([kt, ki], 1), torch.cat([vt, vi], 1))
    o_c = _attend(qc, torch.cat([ki, kc], 1), torch.cat([vi, vc], 1))
    c = concepts
    if family == "flux2":
        c = c + tchunks[2] * attn.to_add_out(o_c)
        c = c + tchunks[5] * block.ff_context(_ln(c) * (1 + tchunks[4]) + tchunks[3])
    else:
        shift1, scale1, gate1 = tm[0].chunk(3, -1)
        shift2, scale2, gate2 = tm[1].chunk(3, -1)
        c = c + gate1[:, None] * attn.to_add_out(o_c)
        c = c + gate2[:, None] * block.txt_mlp(_ln(c) * (1 + scale2[:, None]) + shift2[:, None])
    return o_img @ o_c.transpose(1, 2), c


def _strong_text_modulation(model, family):
    """The model with its text-branch modulation 20x larger: random init leaves the gates near 0.04,
    so that a wrong shift or gate in the concepts' path would change the maps below the tolerance."""
    import copy
    import dataclasses

    t = copy.deepcopy(model.transformer)
    for linear in [t.double_stream_modulation_txt.linear] if family == "flux2" else [b.txt_mod[1] for b in t.transformer_blocks]:
        linear.weight.data *= 20
        if linear.bias is not None:
            linear.bias.data *= 20
    return dataclasses.replace(model, transformer=t)


def test_concept_attention_maps_from_the_weights_and_the_image_stream_untouched(model, family, noised):
    model = _strong_text_modulation(model, family)
    z, levels = noised(model)
    cond = model.text_conditioning(PROMPT)
    embeds = embed_concepts(model, ["bird", "sky"])
    blocks = model.transformer.transformer_blocks
    records = []
    handles = [b.register_forward_pre_hook(lambda m, a, kw: records.append(dict(kw)), with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            plain = model.denoise(z, levels, cond)
            records.clear()
            with model.capture_attention([[0], [1]], maps="concept-attention", concepts=embeds) as store:
                with_concepts = model.denoise(z, levels, cond)
                maps = store.pop_mean()
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(with_concepts, plain)  # nothing reads the concept tokens: the image stream is bit-identical
    t = model.transformer
    with torch.no_grad():
        c = (t.context_embedder(embeds) if family == "flux2" else t.txt_in(t.txt_norm(embeds))).expand(2, -1, -1)
        expected = 0
        for block, rec in zip(blocks, records):
            scores, c = _reference_block(family, block, rec, c)
            expected = expected + scores.softmax(-1)
    expected = (expected / len(blocks)).transpose(1, 2).reshape(2, 2, 16, 16)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 16, 16), atol=1e-5, rtol=0)


def test_prelim_cli_with_both_map_kinds(folder, make_image, tmp_path, capsys):
    from conceptseg.cli import main

    make_image(tmp_path / "images" / "wide.png", 48, 30, seed=1)
    for maps in ("cross-attention", "concept-attention"):
        out = tmp_path / maps
        main(["prelim", "--model", str(folder), "--concept", "bird", "--images", str(tmp_path / "images"), "--out", str(out),
              "--device", "cpu", "--steps", "2", "--maps", maps])
        attention = np.load(out / "attention" / "wide.npy")
        assert attention.shape == (16, 16) and np.isfinite(attention).all()
        assert json.loads((out / "manifest.json").read_text())["counts"]["done"] == 1


# ------------------------------------------------------------------ stages 2-4


def test_lora_finetune_step_saves_adapters_that_load(folder, model, family, tmp_path, finetune_pairs):
    from conceptseg.finetune import FinetuneConfig, finetune
    from conceptseg.plan import lora_parameters

    images, prelim = finetune_pairs(tmp_path, n=2)
    cfg = FinetuneConfig("bird", images, prelim, tmp_path / "ft", model=str(folder), steps=1,
                         batch_size=2, lr=1e-2, ema_decay=0.0, method="lora", lora_rank=2, progress=False)
    tuned = load_model(finetune(cfg), device="cpu", dtype="fp32")
    before, after = model.transformer.state_dict(), tuned.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn." in k for k in changed)
    if family == "flux2":  # the single-stream blocks' fused projections are adapted too
        assert any("to_qkv_mlp_proj" in k for k in changed)
        assert any(k.startswith("single_transformer_blocks.0.attn.to_out") for k in changed)
    trained = json.loads((tmp_path / "ft" / "model" / "conceptseg_lora.json").read_text())
    assert trained["base_model"] == model.source and lora_parameters(model.transformer, 2) > 0


def test_tiny_run_end_to_end(folder, tmp_path, family, tiny_run):
    tiny_run(folder, tmp_path / "run")
    index = tmp_path / "run" / "finetune" / "model" / "model_index.json"
    assert json.loads(index.read_text())["_class_name"] == PIPELINES[family]


# ------------------------------------------------------------------ plan at the published size

PUBLISHED = {  # parameters in billions, the model cards' rounded figures
    "flux2": {"transformer": 32.2, "text_encoder": 24.0},  # FLUX.2-dev; Mistral Small 3.1/3.2 24B
    "qwenimage": {"transformer": 20.4, "text_encoder": 8.29},  # Qwen-Image; Qwen2.5-VL-7B-Instruct
}


def test_plan_reads_the_published_sizes_from_a_config_only_folder(family, tmp_path):
    from conceptseg.modeling.presets import build_family_components
    from conceptseg.pipeline import load_config
    from conceptseg.plan import GiB, plan_run, read_model, write_config_folder

    folder = write_config_folder(build_family_components(family, "full", device="meta"), PIPELINES[family], tmp_path / "cfg")
    assert not [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json"], "weights in a config-only folder"
    sizes = read_model(folder)
    for component, billions in PUBLISHED[family].items():
        assert sizes.parameters[component] / 1e9 == pytest.approx(billions, rel=0.01), component
    assert (sizes.family, sizes.resolution) == (family, 1024)
    cfg = load_config(None, ["concept=bird", f"images={folder}/no-images", f"model={folder}", "finetune.method=lora",
                             "finetune.mixed_precision=bf16", "finetune.batch_size=1", "finetune.gradient_checkpointing=true"])
    plan = plan_run(cfg, 80.0)
    weights_gb = sum(sizes.parameters.values()) * 2 / GiB  # bf16
    assert all(plan.stages[s].memory > weights_gb for s in ("prelim", "refine"))
    assert plan.stages["finetune"].disk_total < 0.05 * sizes.denoiser_parameters * 4  # adapters-only checkpoints
    assert not plan.fits("prelim") if family == "flux2" else plan.fits("prelim")  # FLUX.2-dev's bf16 weights: 105 GB
