"""synth.filter=plausible: keep synthetic pairs whose mask is one object of a size the real masks have."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conceptseg.data.readers import Sample
from conceptseg.synth_filter import largest_share, plausible


def _mask(tmp_path, name, boxes):
    m = np.zeros((32, 32), bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    path = tmp_path / f"{name}.png"
    Image.fromarray(m.astype(np.uint8) * 255).save(path)
    return path


def test_largest_share():
    m = np.zeros((10, 10), bool)
    assert largest_share(m) == 0.0
    m[0:3, 0:3] = True  # 9 px
    m[6:9, 6:7] = True  # 3 px
    assert largest_share(m) == 9 / 12


def test_plausible_keeps_one_object_of_a_seen_size(tmp_path):
    # reference masks of D: one square of 6x6 .. 10x10 px
    refs = [_mask(tmp_path, f"ref{k}", [(2, 2 + s, 2, 2 + s)]) for k, s in enumerate(range(6, 11))]

    def sample(name, boxes):
        return Sample(name, tmp_path / "unused.png", _mask(tmp_path, name, boxes), None, None)

    one = sample("one", [(5, 13, 5, 13)])  # 8x8: one object, a size D's masks have
    several = sample("several", [(0, 6, 0, 6), (20, 26, 20, 26)])  # two fish: largest region holds half
    tiny = sample("tiny", [(5, 7, 5, 7)])  # one object, smaller than any real mask
    huge = sample("huge", [(0, 30, 0, 30)])
    assert [s.key for s in plausible([one, several, tiny, huge], refs)] == ["one"]
