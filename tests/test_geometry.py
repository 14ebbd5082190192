"""Image reading (any mode, EXIF, corrupt files) and the canvas geometry round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conceptseg.geometry import PAD_VALUE, Canvas, ImageReadError, load_rgb, to_rgb

# ------------------------------------------------------------------ reading images


@pytest.mark.parametrize("size", [(37, 80), (80, 37), (1, 1), (3, 500)])
def test_load_rgb_keeps_size(tmp_path, make_image, size) -> None:
    path = make_image(tmp_path / "im.png", *size)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == size
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(path).convert("RGB")))


def test_load_grayscale(tmp_path) -> None:
    a = np.arange(37 * 80, dtype=np.uint32).reshape(80, 37) % 256
    Image.fromarray(a.astype(np.uint8)).save(tmp_path / "g.png")
    im = load_rgb(tmp_path / "g.png")
    assert im.mode == "RGB" and im.size == (37, 80)
    rgb = np.asarray(im)
    for c in range(3):
        assert np.array_equal(rgb[..., c], a)


def test_load_16_bit_rescaled_from_its_own_range(tmp_path) -> None:
    a = np.linspace(1000, 61000, 20 * 30).reshape(20, 30).astype(np.uint16)
    a[0, 0], a[-1, -1] = 1000, 61000
    Image.fromarray(a).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode in ("I;16", "I")
    rgb = np.asarray(load_rgb(tmp_path / "d.png"))
    assert rgb.shape == (20, 30, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    expected = np.round((a.astype(np.float64) - 1000) / 60000 * 255).astype(np.uint8)
    assert np.array_equal(rgb[..., 1], expected)


def test_float_and_32_bit_images() -> None:
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32))
    assert np.array_equal(np.asarray(to_rgb(f))[..., 0], [[0, 64], [128, 255]])
    i = Image.fromarray(np.array([[-5, 5]], dtype=np.int32))
    assert np.array_equal(np.asarray(to_rgb(i))[..., 2], [[0, 255]])
    flat = Image.fromarray(np.full((2, 2), 7, dtype=np.uint16))
    assert np.array_equal(np.asarray(to_rgb(flat)), np.zeros((2, 2, 3), np.uint8))


def test_load_rgba_composited_on_white(tmp_path) -> None:
    a = np.zeros((4, 6, 4), np.uint8)
    a[..., :3] = (10, 20, 30)
    a[0, 0, 3] = 0  # transparent
    a[1, 1, 3] = 255  # opaque
    a[2, 2, 3] = 128  # half
    Image.fromarray(a).save(tmp_path / "a.png")
    rgb = np.asarray(load_rgb(tmp_path / "a.png")).astype(int)
    assert rgb.shape == (4, 6, 3)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[1, 1].tolist() == [10, 20, 30]
    assert np.all(np.abs(rgb[2, 2] - np.array([132, 137, 142])) <= 1)


def test_load_grayscale_with_alpha() -> None:
    la = Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255], [10, 10, 10]]]


def test_load_palette(tmp_path) -> None:
    p = Image.new("P", (5, 3))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 9))
    p.putpixel((1, 1), 1)
    p.putpixel((2, 1), 2)
    p.save(tmp_path / "p.png")
    rgb = np.asarray(load_rgb(tmp_path / "p.png"))
    assert rgb.shape == (3, 5, 3)
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [0, 255, 0] and rgb[1, 2].tolist() == [0, 0, 255]
    # with a transparent palette entry: that colour becomes white
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    rgb = np.asarray(load_rgb(tmp_path / "pt.png"))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[1, 1].tolist() == [0, 255, 0]


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_load_applies_exif_rotation(tmp_path, ext) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 4, 4))  # a red corner at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / f"r.{ext}", exif=exif, **({"quality": 95} if ext == "jpg" else {}))
    out = load_rgb(tmp_path / f"r.{ext}")
    assert out.size == (20, 40)  # transposed
    a = np.asarray(out).astype(int)
    assert a[1, -2, 0] > 200 and a[1, -2, 2] < 60  # the red corner is now top-right
    assert a[1, 1, 2] > 200 and a[1, 1, 0] < 60  # top-left is blue


def test_unreadable_files_raise_image_read_error(tmp_path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "garbage.png").write_bytes(rng.bytes(600))
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("garbage.png", "truncated.jpg", "empty.png", "missing.png"):
        with pytest.raises(ImageReadError, match=name):
            load_rgb(tmp_path / name)
    assert issubclass(ImageReadError, ValueError)


def test_decompression_bomb_is_an_image_read_error(tmp_path, monkeypatch) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 px > 2 x limit: Pillow refuses to open it
    with pytest.raises(ImageReadError, match="huge.png"):
        load_rgb(tmp_path / "huge.png")


# ------------------------------------------------------------------ the canvas


def test_canvas_inner_and_place() -> None:
    c = Canvas(16, 32, 64)  # portrait, scale 2
    assert c.scale == 2 and c.inner == (16, 0, 32, 64)
    c2 = Canvas(80, 37, 32)
    left, top, w, h = c2.inner
    assert (left, w) == (0, 32) and h == round(37 * 32 / 80) and top == (32 - h) // 2
    im = Image.new("RGB", (16, 32), (0, 10, 250))
    placed = c.place(im)
    assert placed.shape == (64, 64, 3) and placed.dtype == np.uint8
    assert (placed[:, :16] == PAD_VALUE).all() and (placed[:, 48:] == PAD_VALUE).all()
    assert (placed[:, 16:48] == (0, 10, 250)).all()
    gray = c.place(Image.new("L", (16, 32), 3))
    assert gray.shape == (64, 64) and (gray[:, 16:48] == 3).all() and (gray[:, :16] == PAD_VALUE).all()


@pytest.mark.parametrize("size", [(16, 32), (32, 16), (64, 64), (8, 8), (4, 16)])
def test_place_mask_then_restore_is_identity_for_even_scales(size) -> None:
    w, h = size
    c = Canvas(w, h, 64)
    mask = np.random.default_rng(w * 100 + h).random((h, w)) > 0.5
    placed = c.place_mask(mask)
    assert placed.dtype == bool and placed.shape == (64, 64)
    back = c.restore(placed)
    assert back.dtype == bool and back.shape == (h, w)
    assert np.array_equal(back, mask)
    assert placed.sum() == mask.sum() * int(c.scale) ** 2  # each pixel became a scale x scale block


def test_restore_then_place_mask_on_the_latent_grid() -> None:
    c = Canvas(16, 32, 64)  # image pixel = 2 canvas px; latent cell (16 grid) = 4 canvas px
    valid = c.valid(16)
    grid = (np.random.default_rng(5).random((16, 16)) > 0.5) & valid
    mask = c.restore(grid)
    assert mask.shape == (32, 16)
    assert np.array_equal(c.place_mask(mask), np.kron(grid, np.ones((4, 4), bool)))


@pytest.mark.parametrize("size", [(1, 1), (3, 500), (1000, 7), (37, 80), (80, 37), (33, 31)])
@pytest.mark.parametrize("resolution", [16, 32])
def test_restore_gives_the_original_size(size, resolution) -> None:
    w, h = size
    c = Canvas(w, h, 32)
    grid = np.random.default_rng(0).random((resolution, resolution)) > 0.5
    m = c.restore(grid)
    assert m.dtype == bool and m.shape == (h, w)
    f = c.restore(grid.astype(np.float32) * 0.75)
    assert f.dtype == np.float32 and f.shape == (h, w)
    assert set(np.unique(f)) <= {0.0, 0.75}
    assert np.array_equal(f > 0.5, m)
    # a grid that is True everywhere in the image gives an all-True mask, and False an all-False one
    assert c.restore(np.ones((resolution, resolution), bool)).all()
    assert not c.restore(np.zeros((resolution, resolution), bool)).any()


@pytest.mark.parametrize("size", [(16, 32), (32, 16), (37, 80), (80, 37), (3, 500), (1000, 7), (64, 64), (60, 64), (64, 60)])
def test_valid_marks_padding_false(size) -> None:
    w, h = size
    c = Canvas(w, h, 64)
    left, top, iw, ih = c.inner
    # at canvas resolution, valid is exactly where the image was placed
    assert np.array_equal(c.valid(64), c.place_mask(np.ones((h, w), bool)))
    v = c.valid(64)
    assert v[top : top + ih, left : left + iw].all()
    assert v.sum() == iw * ih
    # at a coarser resolution, a cell is valid iff its centre lies on the image
    v16 = c.valid(16)
    centres = (np.arange(16) + 0.5) * 4
    for i, cy in enumerate(centres):
        for j, cx in enumerate(centres):
            assert v16[i, j] == (top <= cy < top + ih and left <= cx < left + iw)
    if iw >= 4 and ih >= 4:  # an image at least one cell wide and high covers some cell centres
        assert v16.any()


def test_valid_portrait_example() -> None:
    v = Canvas(16, 32, 64).valid(16)
    expected = np.zeros((16, 16), bool)
    expected[:, 4:12] = True
    assert np.array_equal(v, expected)
    assert Canvas(64, 64, 64).valid(16).all()
