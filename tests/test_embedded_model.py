"""The model the package ships: found without a flag, a standard diffusers folder, and it localises
the class words it was trained on (a few fresh toy scenes; the full yardstick is `eval-toy-model`)."""

import numpy as np
import pytest

from conceptseg.data.toyworld import CLASSES, render_scene
from conceptseg.metrics import auc_roc
from conceptseg.models import EMBEDDED_MODEL, embedded_model_path, load_model
from conceptseg.prelim import preliminary_masks


@pytest.fixture(scope="module")
def embedded():
    return load_model(None, device="cpu", dtype="fp32")


def test_found_without_a_flag_and_loads_as_a_pipeline(embedded) -> None:
    from diffusers import StableDiffusionPipeline

    assert embedded.source == EMBEDDED_MODEL and embedded.resolution == 64
    assert embedded.text_encoder.config.num_hidden_layers == 0  # each word keeps its own token
    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path(), local_files_only=True, safety_checker=None)
    assert pipe.unet.config.sample_size == 32 and sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000


def test_class_word_maps_localise_on_fresh_scenes(embedded) -> None:
    scenes = [(c, render_scene(np.random.default_rng([99, k]), [c], size=64)) for k, c in enumerate(CLASSES)]
    aucs, wrong = [], []
    for k, (cls, scene) in enumerate(scenes):
        right = preliminary_masks(embedded, [scene.image], cls)[0]
        other = preliminary_masks(embedded, [scene.image], CLASSES[(k + 1) % len(CLASSES)])[0]
        aucs.append(auc_roc(right.canvas.restore(right.attention), scene.mask))
        wrong.append(auc_roc(other.canvas.restore(other.attention), scene.mask))
    assert np.mean(aucs) > 0.9, aucs
    assert np.mean(aucs) > np.mean(wrong), (aucs, wrong)
