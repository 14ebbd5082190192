"""FLUX.2 (`Flux2Pipeline`) on a tiny random-weight model: every check of `family_checks`."""

import pytest

from family_checks import *  # noqa: F401,F403  (the shared checks, collected here for this family)


@pytest.fixture(scope="module")
def family():
    return "flux2"
