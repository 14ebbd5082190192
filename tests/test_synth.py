"""Stage 4: a synthetic dataset that loads, resumes by index and grows."""

import json

import numpy as np
from PIL import Image
from scipy import ndimage

from conceptseg.data.imagefolder import read_imagefolder
from conceptseg.refine import RefineConfig
from conceptseg.synth import SynthConfig, run_synth


def test_synth_writes_a_loadable_dataset_and_resumes(tiny_model, tmp_path):
    cfg = SynthConfig("bird", num=3, steps=3, prelim_steps=2, refine=RefineConfig(steps=3), batch_size=2)
    out = run_synth(tiny_model, tmp_path / "synth", cfg, progress=False)
    rows = read_imagefolder(out)
    assert len(rows) == 3 and all(r.caption == "a photo of a bird" for r in rows)
    for r in rows:
        assert Image.open(r.image).size == (32, 32)
        assert set(np.unique(np.asarray(Image.open(r.mask)))) <= {0, 255}
    first = (out / "images" / "000000.png").read_bytes()
    stamp = (out / "masks" / "000001.png").stat().st_mtime_ns
    cfg.num = 4
    run_synth(tiny_model, out, cfg, progress=False)
    assert len(read_imagefolder(out)) == 4
    assert (out / "masks" / "000001.png").stat().st_mtime_ns == stamp  # done rows are not redone
    # image i depends only on (seed, i): a fresh run of 1 reproduces image 0
    again = run_synth(tiny_model, tmp_path / "again", SynthConfig("bird", num=1, steps=3, prelim_steps=2, refine=RefineConfig(steps=3)), progress=False)
    assert (again / "images" / "000000.png").read_bytes() == first
    assert json.loads((out / "manifest.json").read_text())["counts"]["done"] == 4


def test_synth_masks_follow_the_stage3_settings(tiny_model, tmp_path):
    # the same synthetic images; with post-processing on, every mask is the closed, hole-filled plain mask
    plain = run_synth(tiny_model, tmp_path / "plain", SynthConfig("bird", num=2, steps=3, prelim_steps=2, refine=RefineConfig(steps=3)),
                      progress=False)
    post = run_synth(tiny_model, tmp_path / "post", SynthConfig("bird", num=2, steps=3, prelim_steps=2,
                                                                 refine=RefineConfig(steps=3, postprocess=True)), progress=False)
    changed = 0
    for i in range(2):
        assert (plain / "images" / f"{i:06d}.png").read_bytes() == (post / "images" / f"{i:06d}.png").read_bytes()
        m = np.asarray(Image.open(plain / "masks" / f"{i:06d}.png")) > 0
        expected = ndimage.binary_fill_holes(ndimage.binary_closing(m))
        got = np.asarray(Image.open(post / "masks" / f"{i:06d}.png")) > 0
        np.testing.assert_array_equal(got, expected)
        changed += int((got != m).sum())
    assert changed > 0  # the masks were ragged enough for post-processing to matter
