"""Faults and bad input (issue 13): every problem named, nothing lost, good files processed."""

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.cli import main
from conceptseg.geometry import ImageReadError, NonFiniteError, load_mask_file, load_rgb
from conceptseg.io import DiskFullError, Manifest, process_images, save_png
from conceptseg.data.readers import Sample, list_samples


# ---------------------------------------------------------------- reading what users have

def test_masks_are_read_however_they_are_stored(tmp_path):
    square = np.zeros((6, 6), bool)
    square[1:4, 2:5] = True
    stored = {
        "grey.png": Image.fromarray(square.astype(np.uint8) * 255),
        "zero_one.png": Image.fromarray(square.astype(np.uint8)),  # 0/1 values: read as empty before
        "bits.png": Image.fromarray(square).convert("1"),
        "sixteen.png": Image.fromarray(square.astype(np.uint16) * 65535),
    }
    rgba = np.full((6, 6, 4), 200, np.uint8)
    rgba[..., 3] = square * 255  # a cut-out: was read as all foreground (alpha composited on white)
    stored["cutout.png"] = Image.fromarray(rgba)
    for name, image in stored.items():
        image.save(tmp_path / name)
        np.testing.assert_array_equal(load_mask_file(tmp_path / name), square, err_msg=name)
    with pytest.raises(ImageReadError, match="nothing.png"):
        load_mask_file(tmp_path / "nothing.png")


def test_lab_and_cmyk_images_are_converted(tmp_path):
    Image.new("LAB", (8, 6), (50, 128, 128)).save(tmp_path / "lab.tif")  # mid grey in LAB
    Image.new("CMYK", (8, 6), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")  # white
    lab = np.asarray(load_rgb(tmp_path / "lab.tif"))
    assert lab.shape == (6, 8, 3) and np.ptp(lab[0, 0]) <= 3  # grey stays grey
    assert np.asarray(load_rgb(tmp_path / "cmyk.jpg")).min() > 240


def test_a_prompt_longer_than_the_text_encoder_reads_is_refused(tiny_model):
    long = "a photo of a bird " + "with many feathers " * 30
    with pytest.raises(ValueError, match=r"is \d+ tokens long.*reads 77"):
        tiny_model.encode_prompts([long])


def test_an_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files.*empty"):
        list_samples(tmp_path / "empty")


# ---------------------------------------------------------------- per-image faults

def _samples(tmp_path: Path, n: int) -> list[Sample]:
    return [Sample(f"s{i}", tmp_path / f"s{i}.png", None, None, None) for i in range(n)]


def test_a_non_finite_sample_is_named_and_the_rest_of_its_batch_kept(tmp_path, capsys):
    samples = _samples(tmp_path, 5)
    manifest = Manifest.open(tmp_path / "out", "test", {})
    done = []

    def process(batch, loaded):
        if any(s.key == "s2" for s in batch):
            raise NonFiniteError("the map holds 3 NaN or infinite values")
        done.extend(s.key for s in batch)

    summary = process_images(samples, manifest, 4, lambda s: False, lambda s: s.key, process, progress=False)
    assert sorted(done) == ["s0", "s1", "s3", "s4"] and summary["failed"] == 1
    assert manifest.data["images"]["s2"]["status"] == "failed" and "s2.png" in manifest.data["images"]["s2"]["error"]
    assert "s2.png" in capsys.readouterr().out


def test_a_nan_map_raises_a_sample_error():
    from conceptseg.thresholding import binarize

    values = np.random.default_rng(0).random((8, 8))
    values[3, 3] = np.nan
    with pytest.raises(NonFiniteError, match="1 NaN"):
        binarize(values)


def test_out_of_memory_halves_the_batch_and_goes_on(tmp_path, capsys):
    samples = _samples(tmp_path, 5)
    manifest = Manifest.open(tmp_path / "out", "test", {})
    seen = []

    def process(batch, loaded):
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        seen.append(batch[0].key)

    summary = process_images(samples, manifest, 4, lambda s: False, lambda s: s.key, process, progress=False)
    assert seen == ["s0", "s1", "s2", "s3", "s4"] and summary["processed"] == 5
    assert "batch size halved to 2" in capsys.readouterr().out

    def always(batch, loaded):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="one image per batch"):
        process_images(samples, Manifest.open(tmp_path / "out2", "test", {}), 2, lambda s: False, lambda s: s.key, always, progress=False)


def test_a_full_disk_names_the_file_and_leaves_nothing_partial(tmp_path, monkeypatch):
    real_save = Image.Image.save

    def full(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(DiskFullError, match=r"out.png.*free some space"):
        save_png(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary file
    monkeypatch.setattr(Image.Image, "save", real_save)
    save_png(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8))  # space freed: it goes on
    assert Image.open(tmp_path / "out.png").size == (4, 4)


def test_an_interrupted_overwrite_leaves_no_old_outputs_to_be_taken_as_done(tmp_path):
    out = tmp_path / "stage"
    Manifest.open(out, "test", {"steps": 1}).flush()
    (out / "masks").mkdir()
    (out / "masks" / "old.png").write_bytes(b"made with steps=1")
    Manifest.open(out, "test", {"steps": 2}, overwrite=True, outputs=("masks",))
    # were the run killed now, a rerun with steps=2 must not find old.png done
    assert not (out / "masks").exists()
    assert json.loads((out / "manifest.json").read_text())["settings"] == {"steps": 2}



def test_a_rerun_with_nothing_to_do_leaves_the_manifest_untouched(tmp_path):
    """A per-image stage whose outputs were all there rewrote its manifest.json (same contents, a new
    file): a second `conceptseg run` touched the crop row's and every segmenter's evaluation folder."""
    samples, out = _samples(tmp_path, 3), tmp_path / "out"

    def run(done: bool) -> dict:
        manifest = Manifest.open(out, "test", {"steps": 1})
        return process_images(samples, manifest, 2, lambda s: done, lambda s: s.key,
                              lambda batch, loaded: [manifest.record(s.key, "done") for s in batch], progress=False)

    run(done=False)
    stat = (out / "manifest.json").stat()
    assert run(done=True)["skipped_done"] == 3
    again = (out / "manifest.json").stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # the atomic write makes a new inode
    assert json.loads((out / "manifest.json").read_text())["counts"] == {"done": 3}

def test_finetune_with_zero_steps_is_refused(tmp_path):
    from conceptseg.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="at least 1 step"):
        FinetuneConfig("bird", images=tmp_path, prelim=tmp_path, out=tmp_path, steps=0)


def test_a_non_finite_loss_stops_naming_the_step_or_skips(tmp_path):
    from conceptseg.training import NonFiniteLoss, check_finite, trainer_accelerator

    with trainer_accelerator() as accelerator:
        assert check_finite(torch.tensor(1.0), 3, tmp_path, "stop", accelerator)
        assert not check_finite(torch.tensor(float("nan")), 3, tmp_path, "skip", accelerator)
        with pytest.raises(NonFiniteLoss, match="step 7.*last good checkpoint: none"):
            check_finite(torch.tensor(float("inf")), 7, tmp_path, "stop", accelerator)


# ---------------------------------------------------------------- the command line

def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    import conceptseg.cli as cli

    def broken(args):
        raise KeyError("a bug")

    parser = cli.build_parser

    def patched():
        p = parser()
        p._subparsers._group_actions[0].choices["evaluate"].set_defaults(func=broken)
        return p

    monkeypatch.setattr(cli, "build_parser", patched)
    argv = ["evaluate", "--pred", str(tmp_path), "--dataset", f"folder:{tmp_path}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "unexpected KeyError" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        main(["--debug"] + argv)


def test_adversarial_folder_through_each_command(tiny_model_dir, tmp_path, make_image, capsys):
    """Every bad input at once: nothing crashes, every problem is named, every good file is processed."""
    images = tmp_path / "images"
    make_image(images / "good.png", 40, 30)
    make_image(images / "classes" / "001.Gull" / "good.jpg", 30, 44, seed=1)  # a class subfolder
    make_image(images / "café.png", 20, 20, seed=2)
    make_image(images / "cafè.png", 20, 20, seed=3)
    Image.new("LAB", (24, 20), (60, 140, 110)).save(images / "lab.tif")
    Image.new("CMYK", (24, 20), (0, 90, 90, 0)).save(images / "cmyk.jpg")
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(images / "depth16.png")
    Image.new("RGBA", (16, 16), (10, 200, 10, 128)).save(images / "rgba.png")
    (images / "garbage.png").write_bytes(b"not an image at all")
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes((images / "classes" / "001.Gull" / "good.jpg").read_bytes()[:60])
    (images / "notes.txt").write_text("not an image")
    good = {"good", "classes__001.Gull__good", "café", "cafè", "lab", "cmyk", "depth16", "rgba"}
    bad = {"garbage", "empty", "truncated"}

    common = ["--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(["prelim", *common, "--concept", "bird", "--images", str(images), "--out", str(tmp_path / "prelim"), "--steps", "2"]) == 0
    assert main(["refine", "--inpainter", "crop", "--images", str(images), "--prelim", str(tmp_path / "prelim"),
                 "--out", str(tmp_path / "crop")]) == 0
    assert main(["refine", *common, "--images", str(images), "--prelim", str(tmp_path / "prelim"), "--out", str(tmp_path / "refine"),
                 "--inpaint-steps", "2"]) == 0
    assert main(["finetune", "--model", str(tiny_model_dir), "--concept", "bird", "--images", str(images), "--prelim",
                 str(tmp_path / "prelim"), "--out", str(tmp_path / "finetune"), "--steps", "1", "--batch-size", "2"]) == 0
    skipped = json.loads((tmp_path / "finetune" / "finetune_config.json").read_text())["skipped"]
    assert all(any(name in line for line in skipped) for name in ("garbage.png", "empty.jpg", "truncated.jpg"))
    from conceptseg.modeling.segmenter import UNet
    from conceptseg.segmenter.predict import save_segmenter

    torch.manual_seed(0)
    save_segmenter(UNet(width=4), tmp_path / "segmenter", 32)
    assert main(["segment", "--segmenter", str(tmp_path / "segmenter"), "--images", str(images), "--out", str(tmp_path / "segment"),
                 "--output", "mask", "rgba", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for stage in ("prelim", "crop", "refine", "segment"):
        entries = json.loads((tmp_path / stage / "manifest.json").read_text())["images"]
        assert {k for k, v in entries.items() if v["status"] == "done"} == good, stage
        assert {k for k, v in entries.items() if v["status"] == "failed"} == bad, stage
        assert {p.stem for p in (tmp_path / stage / "masks").iterdir()} == good
    for name in ("garbage.png", "empty.jpg", "truncated.jpg"):
        assert name in printed
