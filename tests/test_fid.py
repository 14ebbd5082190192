"""The Frechet distance against closed-form values; the FID command fails clearly offline."""

import numpy as np
import pytest

from conceptseg.cli import main
from conceptseg.fid import frechet_distance, statistics


def test_same_gaussian_is_zero_and_mean_shift_is_squared_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    mu = rng.normal(size=5)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(mu, sigma, mu + [3, 4, 0, 0, 0], sigma) == pytest.approx(25, abs=1e-8)


def test_diagonal_covariances_closed_form():
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2) + 2.0  # + ||(1,1,0)||^2
    assert frechet_distance(np.zeros(3), np.diag(s1), np.array([1.0, 1.0, 0.0]), np.diag(s2)) == pytest.approx(expected)


def test_statistics_of_samples_approach_the_distribution():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=2.0, scale=3.0, size=(20000, 2))
    mu, sigma = statistics(x)
    np.testing.assert_allclose(mu, [2, 2], atol=0.1)
    np.testing.assert_allclose(sigma, 9 * np.eye(2), atol=0.3)
    with pytest.raises(ValueError):
        statistics(np.zeros((1, 4)))


def test_fid_command_says_what_is_missing(tmp_path, make_image, capsys):
    for d in ("real", "fake"):
        make_image(tmp_path / d / "a.png", 16, 16)
    rc = main(["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake")])
    assert rc == 2
    assert "torch-fidelity" in capsys.readouterr().err
