"""Qwen-Image (`QwenImagePipeline`) on a tiny random-weight model: every check of `family_checks`."""

import pytest

from family_checks import *  # noqa: F401,F403  (the shared checks, collected here for this family)
from family_checks import PROMPT


@pytest.fixture(scope="module")
def family():
    return "qwenimage"


def test_padded_text_is_masked_in_the_maps(model, noised):
    """A prompt padded beside a longer one (its padding masked, `encoder_hidden_states_mask`) gives
    the denoiser output and the text-normalised maps of the prompt alone."""
    import torch

    from conceptseg.families.base import select_rows

    z, levels = noised(model)
    alone = model.text_conditioning(PROMPT)
    padded = select_rows(model.conditioning([PROMPT, "a photo of a background with a bird on a branch"]), torch.tensor([0]))
    n = alone.prompt_embeds.shape[1]
    assert padded.prompt_embeds.shape[1] > n and not padded.mask[0, n:].any()
    groups = [[i] for i in range(n)]
    outputs, maps = [], []
    for cond in (alone, padded):
        with torch.no_grad(), model.capture_attention(groups) as store:
            outputs.append(model.denoise(z, levels, cond))
            maps.append(store.pop_mean())
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps[1], maps[0], atol=1e-5, rtol=1e-4)  # the padding takes no share of the text's
