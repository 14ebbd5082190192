"""Toy world v2 (`toyscenes`): deterministic rows, exact masks, web-like captions without the
method's background prompt, context that co-occurs with the class, and the fine-tune that makes its
embedded model (`train-t2i --forget-word`)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.data import drawing, toyscenes, toyworld
from conceptseg.data.toyworld import CLASSES, ToyWorldConfig, generate, load_rows, render_scene
from conceptseg.inpaint import BACKGROUND_PROMPT

BACKGROUND_NOUN = BACKGROUND_PROMPT.split()[-1]  # "background"


def _scene(seed: int, classes, size: int = 64):
    rng = np.random.default_rng([seed, 5])
    return toyworld._render_v2(rng, classes, toyscenes.scene_spec(rng, classes), size)


def test_rows_are_deterministic(tmp_path) -> None:
    a = render_scene(np.random.default_rng([3, 1]), ["fish", "car"], world="v2")
    b = render_scene(np.random.default_rng([3, 1]), ["fish", "car"], world="v2")
    c = render_scene(np.random.default_rng([4, 1]), ["fish", "car"], world="v2")
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert all(np.array_equal(x, y) for x, y in zip(a.object_masks, b.object_masks))
    assert not np.array_equal(a.image, c.image)
    cfg = ToyWorldConfig(world="v2", size=32)
    one, two = generate(tmp_path / "a", 12, seed=7, config=cfg, progress=False), generate(tmp_path / "b", 12, seed=7, config=cfg, progress=False, workers=2)
    assert load_rows(one) == load_rows(two)
    for row in load_rows(one):
        assert (one / row["file_name"]).read_bytes() == (two / row["file_name"]).read_bytes()
        assert (one / row["mask_file_name"]).read_bytes() == (two / row["mask_file_name"]).read_bytes()


@pytest.mark.parametrize("cls", CLASSES)
def test_masks_are_exactly_the_pixels_that_show_the_object(cls: str) -> None:
    occluded = 0
    for seed in range(12):
        scene, background = _scene(seed, [cls])
        assert scene.image.shape == (64, 64, 3) and scene.mask.any()
        # outside the mask the image is the scene (occluders included) to the last bit
        assert np.array_equal(scene.image[~scene.mask], background[~scene.mask])
        changed = np.any(scene.image != background, axis=-1)
        assert changed[scene.mask].mean() > 0.9
        occluded += int(np.any(background != _scene_without_occluder(seed, cls)))
    assert occluded >= 1  # some rows hide part of the object behind a scene element


def _scene_without_occluder(seed: int, cls: str) -> np.ndarray:
    """The same row's scene before any occluder: drawn by the scene function from the same rng state."""
    rng = np.random.default_rng([seed, 5])
    kind, photo, _ = toyscenes.scene_spec(rng, [cls])
    if kind == "photo":
        return drawing.to_u8(toyscenes._photo_background(rng, 64, photo))
    return drawing.to_u8(toyscenes._SCENES[kind](rng, 64))


def test_no_caption_names_the_background_prompt_noun(tmp_path) -> None:
    """v1 taught its model the method's background prompt as a caption; v2 never says "background"."""
    v2 = load_rows(generate(tmp_path / "v2", 300, seed=0, config=ToyWorldConfig(world="v2", size=32), progress=False))
    assert not [r["caption"] for r in v2 if BACKGROUND_NOUN in r["caption"].lower()]
    empty = [r["caption"] for r in v2 if not r["classes"]]
    assert len(empty) >= 10 and len(set(empty)) >= 5  # empty scenes say what they show
    v1 = load_rows(generate(tmp_path / "v1", 60, seed=0, config=ToyWorldConfig(size=32), progress=False))
    assert any(BACKGROUND_NOUN in r["caption"] for r in v1)  # the check would have caught v1


def test_scenes_follow_their_class_and_objects_are_large() -> None:
    kinds, areas, cut = Counter(), [], 0
    for i in range(200):
        cls = CLASSES[i % len(CLASSES)]
        rng = np.random.default_rng([11, i])
        kind, _, caption = toyscenes.scene_spec(rng, [cls])
        kinds[kind == toyscenes.HABITATS[cls]] += 1
        assert cls in caption
        if i < 60:
            scene = toyworld._render_v2(rng, [cls], (kind, _, caption), 64)[0]
            areas.append(scene.mask.mean())
            cut += bool(scene.mask[0].any() or scene.mask[-1].any() or scene.mask[:, 0].any() or scene.mask[:, -1].any())
    assert 0.65 < kinds[True] / 200 < 0.85  # HABITAT_PROBABILITY = 0.75
    # v1's single objects cover about 6% of the image; v2's, CUB-like, several times that
    assert np.mean(areas) > 0.15 and cut >= 10


def test_an_unknown_world_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown toy world 'v3'"):
        generate(tmp_path, 2, config=ToyWorldConfig(world="v3"), progress=False)


# --------------------------------------------------------------- the embedded model's fine-tune


def _run_quiet(cfg):
    from conceptseg.train_t2i import train_t2i

    with contextlib.redirect_stdout(io.StringIO()):
        return train_t2i(cfg)


def test_forget_word_redraws_only_its_embedding_and_the_fine_tune_resumes(tiny_model_dir, tmp_path) -> None:
    """`train-t2i --base-model M --forget-word background` starts that word's embedding from random
    (the base model's meaning dropped), everything else from M; stopped and resumed equals straight."""
    from conceptseg.models import load_model
    from conceptseg.train_t2i import TrainT2IConfig, forget_word_embeddings

    base = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    before = base.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = forget_word_embeddings(base.text_encoder, base.tokenizer, [BACKGROUND_NOUN], seed=0)
    after = base.text_encoder.get_input_embeddings().weight.detach()
    assert ids == base.tokenizer(BACKGROUND_NOUN, add_special_tokens=False).input_ids
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == ids

    data = generate(tmp_path / "data", 12, seed=0, config=ToyWorldConfig(world="v2", size=32), progress=False)
    kw = dict(data=data, preset=None, base_model=str(tiny_model_dir), lr=1e-3, batch_size=4, checkpoint_every=2,
              train_text_encoder=True, forget_words=[BACKGROUND_NOUN], samples_per_prompt=1,
              sample_prompts=["a photo of a fish"], progress=False)
    _run_quiet(TrainT2IConfig(out=tmp_path / "stopped", steps=2, **kw))
    shutil.copytree(tmp_path / "stopped", tmp_path / "resumed")
    _run_quiet(TrainT2IConfig(out=tmp_path / "resumed", steps=4, **kw))
    _run_quiet(TrainT2IConfig(out=tmp_path / "straight", steps=4, **kw))
    straight = load_model(tmp_path / "straight" / "model", device="cpu", dtype="fp32")
    resumed = load_model(tmp_path / "resumed" / "model", device="cpu", dtype="fp32")
    for a, b in zip(straight.text_encoder.parameters(), resumed.text_encoder.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    for a, b in zip(straight.unet.parameters(), resumed.unet.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    row = straight.text_encoder.get_input_embeddings().weight[ids[0]]
    assert not torch.allclose(row, before[ids[0]])  # the base model's "background" is gone
    with pytest.raises(ValueError, match="forget_words applies to fine-tuning"):
        _run_quiet(TrainT2IConfig(out=tmp_path / "scratch", steps=1, data=data, preset="tiny", forget_words=["x"], progress=False))


def test_the_embedded_v2_model_forgot_background_and_draws_its_world() -> None:
    """`embedded:toy-v2` loads by name, shares v1's VAE, holds a re-drawn "background" embedding,
    and the demo draws world v2 for it (v1 for the default model)."""
    from conceptseg.demo import demo_world
    from conceptseg.models import load_model

    v1, v2 = (load_model(name, device="cpu", dtype="fp32") for name in ("embedded:toy-v1", "embedded:toy-v2"))
    assert all(torch.equal(a, b) for a, b in zip(v1.vae.parameters(), v2.vae.parameters()))
    (token,) = v2.tokenizer(BACKGROUND_NOUN, add_special_tokens=False).input_ids
    e1, e2 = (m.text_encoder.get_input_embeddings().weight[token] for m in (v1, v2))
    assert not torch.allclose(e1, e2, atol=1e-3)
    assert (demo_world("embedded:toy-v2"), demo_world(None), demo_world("embedded:toy")) == ("v2", "v1", "v1")
