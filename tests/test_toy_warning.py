"""The embedded toy-world model warns when it is applied to images that are not toy-world images."""

import warnings

import pytest

from conceptseg.models import load_model, warn_if_not_toy_world


@pytest.fixture(scope="module")
def embedded():
    return load_model(None, device="cpu", dtype="fp32")


def test_warning_names_the_model_and_how_to_pass_a_real_one(embedded, tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # toy-world sizes: silent
        assert not warn_if_not_toy_world(embedded, [(64, 64), (128, 128)])
        assert not warn_if_not_toy_world(tiny_model, [(640, 480)])  # another model: never
    for size in [(640, 480), (300, 300), (64, 48)]:
        with pytest.warns(UserWarning, match=r"embedded toy-world model \(embedded:toy\).*--model PATH_OR_HUB_ID"):
            assert warn_if_not_toy_world(embedded, [(64, 64), size])


def test_stage1_on_a_photo_sized_image_warns(embedded, textured):
    from conceptseg.prelim import preliminary_masks

    with pytest.warns(UserWarning, match="not toy-world images"):
        preliminary_masks(embedded, [textured(160, 120)], "fish", steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preliminary_masks(embedded, [textured(64, 64)], "fish", steps=2)
