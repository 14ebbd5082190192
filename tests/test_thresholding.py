"""GMM threshold, binarisation and the 3x3 orphan filter."""

from __future__ import annotations

import numpy as np
import pytest

from conceptseg.thresholding import binarize, gmm_threshold, orphan_filter


@pytest.fixture(scope="module")
def bimodal() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(0, 1, 2000), rng.normal(10, 1, 500)])


def test_gmm_threshold_between_the_modes(bimodal) -> None:
    assert gmm_threshold(bimodal) == pytest.approx(5.0, abs=0.5)
    # shifted and scaled data: the threshold follows
    assert gmm_threshold(3 * bimodal + 100) == pytest.approx(115.0, abs=1.5)


def test_gmm_threshold_is_repeatable_and_shape_agnostic(bimodal) -> None:
    assert gmm_threshold(bimodal, seed=0) == gmm_threshold(bimodal.reshape(50, 50), seed=0)


def test_gmm_threshold_flat_and_tiny_inputs() -> None:
    assert gmm_threshold(np.full((8, 8), 3.0)) == float("inf")
    assert gmm_threshold(np.array([1.0])) == float("inf")
    assert gmm_threshold(np.array([])) == float("inf")


def test_binarize_picks_the_high_mode() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 0.1, (32, 32))
    values[8:20, 10:26] += 1.0  # the foreground: the high mode
    mask = binarize(values, orphan=False)
    expected = np.zeros((32, 32), bool)
    expected[8:20, 10:26] = True
    assert mask.dtype == bool and mask.shape == (32, 32)
    assert np.array_equal(mask, expected)
    # a solid block survives the orphan filter, all but its 4 corners (4 of 9 neighbours each)
    for y, x in [(8, 10), (8, 25), (19, 10), (19, 25)]:
        expected[y, x] = False
    assert np.array_equal(binarize(values), expected)


def test_binarize_flat_map_is_all_background() -> None:
    assert not binarize(np.zeros((16, 16))).any()
    assert not binarize(np.full((16, 16), 7.5), orphan=False).any()


def test_binarize_fits_only_valid_cells_and_keeps_padding_background() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(0, 0.1, (16, 16))
    values[4:10, 4:10] += 1.0
    valid = np.zeros((16, 16), bool)
    valid[:, :12] = True
    values[:, 12:] = 1000.0  # the padding: huge values that must neither be foreground nor move the threshold
    mask = binarize(values, valid, orphan=False)
    expected = np.zeros((16, 16), bool)
    expected[4:10, 4:10] = True
    assert np.array_equal(mask, expected)
    for y, x in [(4, 4), (4, 9), (9, 4), (9, 9)]:
        expected[y, x] = False
    assert np.array_equal(binarize(values, valid), expected)


def test_binarize_invalid_cell_inside_the_foreground_stays_background() -> None:
    values = np.zeros((12, 12))
    values[2:10, 2:10] = 1.0
    valid = np.ones((12, 12), bool)
    valid[5, 5] = False  # the orphan filter would fill this hole; it is not image, so it stays False
    mask = binarize(values, valid)
    assert not mask[5, 5]
    assert mask[4, 4] and mask[6, 6] and mask[5, 4]


def test_binarize_all_invalid_is_all_background() -> None:
    values = np.random.default_rng(3).normal(size=(8, 8))
    assert not binarize(values, np.zeros((8, 8), bool)).any()


def test_binarize_orphan_switch() -> None:
    rng = np.random.default_rng(4)
    values = rng.normal(0, 0.05, (24, 24))
    values[4:14, 4:14] += 1.0
    values[20, 20] += 1.0  # a lone bright cell
    assert binarize(values, orphan=False)[20, 20]
    assert not binarize(values, orphan=True)[20, 20]


def test_orphan_filter_removes_an_isolated_pixel() -> None:
    mask = np.zeros((9, 9), bool)
    mask[4, 4] = True
    out = orphan_filter(mask)
    assert out.dtype == bool and out.shape == (9, 9)
    assert not out.any()


def test_orphan_filter_fills_a_hole() -> None:
    mask = np.zeros((11, 11), bool)
    mask[3:8, 3:8] = True
    mask[5, 5] = False  # a one-pixel hole in the middle of a 5x5 block
    out = orphan_filter(mask)
    assert out[5, 5]
    assert out[4:7, 4:7].all()  # the block's interior is solid
    assert not out[0, :].any() and not out[:, 0].any()  # nothing appears far from the block


def test_orphan_filter_keeps_a_solid_block() -> None:
    mask = np.zeros((10, 10), bool)
    mask[3:7, 3:7] = True  # 4x4
    out = orphan_filter(mask)
    assert out[4:6, 4:6].all()  # the interior survives
    # corner pixels see only 4 of 9 foreground neighbours (a minority): the block's corners go
    assert not out[3, 3] and not out[3, 6] and not out[6, 3] and not out[6, 6]
    # edge pixels see 6 of 9: they stay
    assert out[3, 4] and out[4, 3]
    assert not out[:2].any() and not out[8:].any()


def test_orphan_filter_majority_threshold() -> None:
    # exactly 5 of 9 neighbours (a majority) -> foreground; 4 of 9 -> background
    five = np.zeros((3, 3), bool)
    five.flat[[0, 1, 2, 3, 4]] = True
    four = np.zeros((3, 3), bool)
    four.flat[[0, 2, 6, 8]] = True
    five_p = np.pad(five, 3)
    four_p = np.pad(four, 3)
    assert orphan_filter(five_p)[4, 4]
    assert not orphan_filter(four_p)[4, 4]


def test_orphan_filter_on_full_image_border() -> None:
    mask = np.ones((6, 6), bool)
    assert orphan_filter(mask).all()  # the image border is not treated as background


# ------------------------------------------------------------------ k components


@pytest.fixture(scope="module")
def trimodal() -> np.ndarray:
    """Background, chest and lesion: three modes, the lesion the smallest and highest."""
    rng = np.random.default_rng(5)
    return np.concatenate([rng.normal(0, 0.5, 1500), rng.normal(5, 0.5, 2000), rng.normal(10, 0.5, 300)])


def test_two_components_is_the_papers_formula(bimodal) -> None:
    from sklearn.mixture import GaussianMixture

    means = GaussianMixture(n_components=2, random_state=0).fit(bimodal.reshape(-1, 1)).means_
    assert gmm_threshold(bimodal) == float(means.mean())
    assert gmm_threshold(bimodal, components=2) == gmm_threshold(bimodal)


def test_three_components_separate_the_highest_mode(trimodal) -> None:
    # 2 components put the chest with the lesion or split between them; 3 put the cut between chest and lesion
    assert gmm_threshold(trimodal, components=3) == pytest.approx(7.5, abs=0.3)
    assert gmm_threshold(trimodal, components=2) < 6.0
    values = trimodal.reshape(38, 100)
    lesion = values > 7.5
    mask = binarize(values, orphan=False, components=3)
    assert np.array_equal(mask, lesion)
    assert binarize(values, orphan=False, components=2).sum() > 2 * lesion.sum()


def test_three_components_on_a_map_with_a_lesion_in_a_chest() -> None:
    rng = np.random.default_rng(6)
    values = rng.normal(0, 0.1, (40, 40))  # background
    values[5:35, 5:35] += 1.0  # chest
    values[10:18, 20:30] += 1.0  # lesion, inside the chest
    expected = np.zeros((40, 40), bool)
    expected[10:18, 20:30] = True
    assert np.array_equal(binarize(values, orphan=False, components=3), expected)
    assert binarize(values, orphan=False, components=2)[5:35, 5:35].all()  # 2 components take the whole chest


def test_components_validation_and_small_inputs() -> None:
    with pytest.raises(ValueError, match="at least 2 components"):
        gmm_threshold(np.arange(10.0), components=1)
    assert gmm_threshold(np.array([0.0, 1.0]), components=3) == float("inf")  # fewer values than components


def test_prelim_threads_gmm_components_to_binarize(tiny_model, textured, monkeypatch) -> None:
    import conceptseg.prelim as prelim
    from conceptseg.prelim import PrelimConfig, PrelimRunner

    assert PrelimConfig("bird").gmm_components == 2  # the paper
    with pytest.raises(ValueError, match="gmm_components"):
        PrelimConfig("bird", gmm_components=1)
    seen = []
    monkeypatch.setattr(prelim, "binarize", lambda *a, **k: seen.append(k["components"]) or binarize(*a, **k))
    for k in (2, 3):
        res = PrelimRunner(tiny_model, PrelimConfig("bird", steps=2, gmm_components=k))([textured(40, 32)], ["a"])[0]
        assert res.mask.shape == (32, 40)
    assert seen == [2, 3]
    from conceptseg.cli import build_parser

    args = build_parser().parse_args(["prelim", "--concept", "effusion", "--images", "x", "--out", "y", "--gmm-components", "3"])
    assert args.gmm_components == 3
