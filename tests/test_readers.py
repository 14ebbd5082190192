"""Dataset readers: each builds a tiny tree in the layout its users download and reads it back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from conceptseg.data.readers import (
    READERS,
    Sample,
    box_iou,
    load_mask,
    mask_to_box,
    read_cars,
    read_dataset,
    read_dogs,
    read_h36m,
)
from conceptseg.geometry import ImageReadError


def write_image(path: Path, width: int, height: int, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (value, 2 * value % 256, 40)).save(path)
    return path


def write_grey(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(a, dtype=np.uint8), mode="L").save(path)
    return path


def not_found(path: Path) -> str:
    """The start of a reader's message for a missing file, as a regex."""
    return "^" + re.escape(f"{path} not found")


def cellstr(strings, shape: str = "column") -> np.ndarray:
    """A MATLAB cell array of strings as savemat wants it: an object array of str."""
    a = np.empty((len(strings), 1) if shape == "column" else (1, len(strings)), dtype=object)
    a.flat[:] = list(strings)
    return a


# ---------------------------------------------------------------- CUB-200-2011

CUB_FILES = [  # id, relpath, train?, (x, y, w, h)
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg", 0, (2.0, 1.0, 5.0, 3.0)),
    (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg", 1, (0.0, 0.0, 8.0, 6.0)),
    (3, "002.Laysan_Albatross/Laysan_Albatross_0001_545.jpg", 0, (1.0, 2.0, 4.0, 4.0)),
]


def make_cub(base: Path, segmentations: str = "inside", boxes: bool = True) -> Path:
    root = base / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in CUB_FILES))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, _ in CUB_FILES))
    if boxes:
        (root / "bounding_boxes.txt").write_text(
            "".join(f"{i} {' '.join(map(str, b))}\n" for i, _, _, b in CUB_FILES))
    seg = {"inside": root / "segmentations", "beside": base / "segmentations", "none": None}[segmentations]
    for i, rel, _, _ in CUB_FILES:
        write_image(root / "images" / rel, 8, 6, value=10 * i)
        if seg:
            soft = np.zeros((6, 8), np.uint8)
            soft[1, 1], soft[1, 2], soft[2, 3], soft[3, 3] = 127, 128, 255, 200  # 127 rounds down
            write_grey(seg / Path(rel).with_suffix(".png"), soft)
    return root


def test_cub_splits_keys_labels_boxes(tmp_path):
    root = make_cub(tmp_path)
    test = read_dataset(f"cub:{root}", "test")
    assert [s.key for s in test] == [
        "001.Black_footed_Albatross__Black_Footed_Albatross_0001_796111",
        "002.Laysan_Albatross__Laysan_Albatross_0001_545",
    ]
    assert [s.key for s in read_dataset(f"cub:{root}", "train")] == [
        "001.Black_footed_Albatross__Black_Footed_Albatross_0002_55"]
    assert len(read_dataset(f"cub:{root}", "all")) == 3
    assert all(s.image.exists() and s.mask.exists() for s in test)
    assert [s.label for s in test] == ["Black footed Albatross", "Laysan Albatross"]
    # "x y w h" -> inclusive (x, y, x + w - 1, y + h - 1)
    assert [s.box for s in test] == [(2, 1, 6, 3), (1, 2, 4, 5)]
    assert read_dataset(f"cub:{root}", "all")[1].box == (0, 0, 7, 5)


@pytest.mark.parametrize("where", ["inside", "beside"])
def test_cub_soft_mask_rounded(tmp_path, where):
    root = make_cub(tmp_path, segmentations=where)
    s = read_dataset(f"cub:{root}")[0]
    assert s.mask == (tmp_path / "segmentations" if where == "beside" else root / "segmentations") / (
        "001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.png")
    m = load_mask(s)
    assert m.dtype == bool and m.shape == (6, 8)
    expected = np.zeros((6, 8), bool)
    expected[1, 2] = expected[2, 3] = expected[3, 3] = True  # 128, 255, 200 foreground; 127 not
    np.testing.assert_array_equal(m, expected)
    assert mask_to_box(m) == (2, 1, 3, 3)


def test_cub_without_segmentations_or_boxes(tmp_path):
    root = make_cub(tmp_path, segmentations="none", boxes=False)
    s = read_dataset(f"cub:{root}")[0]
    assert s.mask is None and s.box is None
    with pytest.raises(ValueError, match="segmentations"):
        load_mask(s)


@pytest.mark.parametrize("missing", ["images.txt", "train_test_split.txt"])
def test_cub_wrong_root(tmp_path, missing):
    root = make_cub(tmp_path)
    (root / missing).unlink()
    with pytest.raises(FileNotFoundError, match=not_found(root / missing)) as e:
        read_dataset(f"cub:{root}")
    assert "Expected layout" in str(e.value)
    with pytest.raises(FileNotFoundError, match=not_found(tmp_path / "images.txt")):
        read_dataset(f"cub:{tmp_path}")  # the parent of the real root


def test_cub_incomplete_split_file(tmp_path):
    root = make_cub(tmp_path)
    (root / "train_test_split.txt").write_text("1 0\n2 1\n")
    with pytest.raises(ValueError, match="image id 3"):
        read_dataset(f"cub:{root}")


# ---------------------------------------------------------------- Stanford Dogs

def voc_xml(*boxes, width=40, height=30) -> str:
    objects = "".join(
        f"<object><name>Chihuahua</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    return (f"<annotation><folder>02085620</folder><filename>%s</filename><source><database>ImageNet"
            f"</database></source><size><width>{width}</width><height>{height}</height><depth>3</depth>"
            f"</size><segment>0</segment>{objects}</annotation>")


DOGS = {  # relpath -> (split, boxes in the XML)
    "n02085620-Chihuahua/n02085620_5927.jpg": ("train", [(3, 4, 20, 25)]),
    "n02085620-Chihuahua/n02085620_10074.jpg": ("test", [(1, 1, 5, 5), (10, 2, 39, 29), (0, 0, 9, 9)]),
    "n02085782-Japanese_spaniel/n02085782_82.jpg": ("test", [(0, 0, 39, 29)]),
}


def make_dogs(root: Path, shape: str = "column") -> Path:
    for rel, (_, boxes) in DOGS.items():
        write_image(root / "Images" / rel, 40, 30)
        anno = root / "Annotation" / rel.removesuffix(".jpg")  # no extension, as in annotation.tar
        anno.parent.mkdir(parents=True, exist_ok=True)
        anno.write_text(voc_xml(*boxes) % Path(rel).stem)
    for split in ("train", "test"):
        files = [rel for rel, (s, _) in DOGS.items() if s == split]
        labels = np.array([[1.0 if "Chihuahua" in f else 2.0] for f in files])
        sio.savemat(root / f"{split}_list.mat", {
            "file_list": cellstr(files, shape),
            "annotation_list": cellstr([f.removesuffix(".jpg") for f in files], shape),
            "labels": labels if shape == "column" else labels.T,
        })
    return root


@pytest.mark.parametrize("shape", ["column", "row"])
def test_dogs(tmp_path, shape):
    root = make_dogs(tmp_path / "dogs", shape)
    test = read_dataset(f"dogs:{root}", "test")
    assert [s.key for s in test] == ["n02085620-Chihuahua__n02085620_10074", "n02085782-Japanese_spaniel__n02085782_82"]
    assert all(s.image.exists() and s.mask is None for s in test)
    assert [s.label for s in test] == ["Chihuahua", "Japanese spaniel"]
    assert [s.box for s in test] == [(10, 2, 39, 29), (0, 0, 39, 29)]  # several objects: the largest
    (train,) = read_dataset(f"dogs:{root}", "train")
    assert train.key == "n02085620-Chihuahua__n02085620_5927" and train.box == (3, 4, 20, 25)
    assert len(read_dataset(f"dogs:{root}", "all")) == 3


def test_dogs_single_image_list_and_no_annotation_list(tmp_path):
    """A one-entry list squeezes to a bare string; annotation_list is optional."""
    root = make_dogs(tmp_path)
    rel = "n02085620-Chihuahua/n02085620_5927.jpg"
    sio.savemat(root / "test_list.mat", {"file_list": cellstr([rel])})
    (s,) = read_dogs(root, "test")
    assert s.image == root / "Images" / rel and s.box == (3, 4, 20, 25)


def test_dogs_wrong_root(tmp_path):
    root = make_dogs(tmp_path / "dogs")
    with pytest.raises(FileNotFoundError, match=not_found(tmp_path / "test_list.mat")):
        read_dataset(f"dogs:{tmp_path}")
    (root / "Annotation" / "n02085782-Japanese_spaniel" / "n02085782_82").unlink()
    with pytest.raises(FileNotFoundError, match=not_found(root / "Annotation/n02085782-Japanese_spaniel/n02085782_82")):
        read_dataset(f"dogs:{root}")
    (root / "test_list.mat").write_text("not a mat file")
    with pytest.raises(ValueError, match=re.escape(f"{root / 'test_list.mat'}: not a readable")):
        read_dataset(f"dogs:{root}")


# ---------------------------------------------------------------- Stanford Cars

FIELDS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]


def struct_array(rows, shape: str = "row", labelled: bool = True) -> np.ndarray:
    """`annotations` as in the devkit: a 1xN struct array of 1x1 numbers and a char fname."""
    fields = FIELDS if labelled else [f for f in FIELDS if f != "class"]
    a = np.zeros((1, len(rows)) if shape == "row" else (len(rows), 1), dtype=[(f, object) for f in fields])
    for i, (box, cls, fname) in enumerate(rows):
        values = [np.array([[v]], dtype=np.uint16) for v in box]
        values += [np.array([[cls]], dtype=np.uint8)] if labelled else []
        a.flat[i] = (*values, fname)
    return a


CARS_TRAIN = [((5, 6, 30, 20), 2, "00001.jpg"), ((0, 1, 39, 29), 1, "00002.jpg")]
CARS_TEST = [((2, 3, 17, 19), 1, "00001.jpg")]


def make_cars(root: Path, shape: str = "row", test_annos: str = "devkit/cars_test_annos_withlabels.mat",
              meta: bool = True) -> Path:
    (root / "devkit").mkdir(parents=True)
    for part, rows in (("train", CARS_TRAIN), ("test", CARS_TEST)):
        for _, _, fname in rows:
            write_image(root / f"cars_{part}" / fname, 40, 30)
    sio.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(CARS_TRAIN, shape)})
    sio.savemat(root / test_annos, {"annotations": struct_array(CARS_TEST, shape, "withlabels" in test_annos)})
    if meta:
        names = cellstr(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], "row")
        sio.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    return root


@pytest.mark.parametrize("shape", ["row", "column"])
def test_cars(tmp_path, shape):
    root = make_cars(tmp_path / "cars", shape)
    train = read_dataset(f"cars:{root}", "train")
    assert [s.key for s in train] == ["train_00001", "train_00002"]
    assert [s.box for s in train] == [(5, 6, 30, 20), (0, 1, 39, 29)]
    assert [s.label for s in train] == ["Acura RL Sedan 2012", "AM General Hummer SUV 2000"]
    (test,) = read_dataset(f"cars:{root}", "test")
    assert test.key == "test_00001" and test.image == root / "cars_test" / "00001.jpg" and test.image.exists()
    assert test.box == (2, 3, 17, 19) and test.label == "AM General Hummer SUV 2000" and test.mask is None
    assert [s.key for s in read_dataset(f"cars:{root}", "all")] == ["train_00001", "train_00002", "test_00001"]


def test_cars_single_annotation_test_file_at_root_no_meta(tmp_path):
    root = make_cars(tmp_path, test_annos="cars_test_annos_withlabels.mat", meta=False)
    (test,) = read_cars(root, "test")  # a 1x1 struct array squeezes to one struct
    assert test.box == (2, 3, 17, 19) and test.label == "1"  # no cars_meta.mat: the class number


def test_cars_unlabelled_test_annotations(tmp_path):
    root = make_cars(tmp_path, test_annos="devkit/cars_test_annos.mat")
    (test,) = read_cars(root, "test")
    assert test.box == (2, 3, 17, 19) and test.label is None


def test_cars_wrong_root(tmp_path):
    root = make_cars(tmp_path / "cars")
    with pytest.raises(FileNotFoundError, match=not_found(tmp_path / "devkit/cars_train_annos.mat")):
        read_dataset(f"cars:{tmp_path}", "train")
    with pytest.raises(FileNotFoundError, match=not_found(tmp_path / "devkit/cars_test_annos_withlabels.mat")):
        read_dataset(f"cars:{tmp_path}", "test")
    (root / "cars_test" / "00001.jpg").unlink()
    (root / "cars_test").rmdir()
    with pytest.raises(FileNotFoundError, match=not_found(root / "cars_test")):
        read_dataset(f"cars:{root}", "test")


# ---------------------------------------------------------------- Human3.6M crops

def make_h36m(root: Path, n_test: int, n_train: int = 3) -> Path:
    root.mkdir(parents=True)
    lines = ["key,x0,y0,x1,y1,split"]
    lines += [f"S9_Walking_{i:05d},{i % 50},{i % 30},{200 + i % 50},{240 - i % 7},test" for i in range(n_test)]
    lines += [f"S1_Eating_{i:05d},10,20,100,200,train" for i in range(n_train)]
    (root / "boxes.csv").write_text("\n".join(lines) + "\n")
    return root


def test_h36m_small(tmp_path):
    root = make_h36m(tmp_path / "h36m", n_test=2)
    write_image(root / "images" / "S9_Walking_00001.jpg", 256, 256)
    test = read_dataset(f"h36m:{root}", "test")
    assert [s.key for s in test] == ["S9_Walking_00000", "S9_Walking_00001"]
    assert test[1].image == root / "images" / "S9_Walking_00001.jpg" and test[1].image.exists()
    assert test[1].box == (1, 1, 201, 239) and test[1].mask is None and test[1].label is None
    assert len(read_dataset(f"h36m:{root}", "train")) == 3
    assert len(read_dataset(f"h36m:{root}", "all")) == 5


def test_h36m_seeded_subset_without_opening_images(tmp_path):
    root = make_h36m(tmp_path / "h36m", n_test=6010)  # no images/ at all: reading must not open any
    a, b = read_h36m(root, "test"), read_dataset(f"h36m:{root}", "test")
    assert len(a) == 6000 and a == b
    expected = np.sort(np.random.default_rng(0).choice(6010, 6000, replace=False))
    assert [s.key for s in a] == [f"S9_Walking_{i:05d}" for i in expected]  # in file order
    assert len(read_h36m(root, "train")) == 3  # the subset is drawn within the split


def test_h36m_wrong_root_and_bad_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match=not_found(tmp_path / "boxes.csv")):
        read_dataset(f"h36m:{tmp_path}")
    (tmp_path / "boxes.csv").write_text("key,x0,y0,x1,y1\na,1,2,3,4\n")
    with pytest.raises(ValueError, match="split"):
        read_dataset(f"h36m:{tmp_path}")
    (tmp_path / "boxes.csv").write_text("key,x0,y0,x1,y1,split\n../a,1,2,3,4,test\n")
    with pytest.raises(ValueError, match="filesystem-safe"):
        read_dataset(f"h36m:{tmp_path}")


# ---------------------------------------------------------------- plain folder

def test_folder_with_masks(tmp_path):
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    write_image(imgs / "b.jpg", 6, 4)
    write_image(imgs / "a.png", 5, 3)
    (imgs / "notes.txt").write_text("not an image")
    write_grey(masks / "a.bmp", np.array([[0, 255, 255, 0, 0]] * 3))  # any image extension
    write_grey(masks / "b.png", np.eye(4, 6) * 255)
    samples = read_dataset(f"folder:{imgs},masks={masks}", "test")  # split ignored
    assert [(s.key, s.image.name, s.mask.name) for s in samples] == [("a", "a.png", "a.bmp"), ("b", "b.jpg", "b.png")]
    assert mask_to_box(load_mask(samples[0])) == (1, 0, 2, 2)
    np.testing.assert_array_equal(load_mask(samples[1]), np.eye(4, 6, dtype=bool))
    plain = read_dataset(f"folder:{imgs}")
    assert [s.mask for s in plain] == [None, None] and [s.box for s in plain] == [None, None]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_dataset(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="no image files"):
        read_dataset(f"folder:{tmp_path}")
    write_image(tmp_path / "imgs" / "a.png", 5, 3)
    write_image(tmp_path / "imgs" / "c.png", 5, 3)
    write_grey(tmp_path / "masks" / "a.png", np.zeros((3, 5)))
    with pytest.raises(FileNotFoundError, match="'c'"):
        read_dataset(f"folder:{tmp_path / 'imgs'},masks={tmp_path / 'masks'}")
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        read_dataset(f"folder:{tmp_path / 'imgs'},masks={tmp_path / 'elsewhere'}")
    write_image(tmp_path / "imgs" / "a.jpg", 5, 3)
    with pytest.raises(ValueError, match="would both be named"):
        read_dataset(f"folder:{tmp_path / 'imgs'}")


def test_train_and_test_sources_are_keyed_apart(tmp_path):
    """Two folders that both hold 00001.png: the test images are keyed `test_<key>`; the keys of
    sources that do not collide (and a test image that is one of the training images) stay as they are."""
    from conceptseg.data.readers import keyed_apart, list_samples

    for name in ("00001.png", "00002.png"):
        write_image(tmp_path / "A" / name, 5, 3)
    write_image(tmp_path / "B" / "00001.png", 5, 3, value=20)
    write_image(tmp_path / "B" / "00003.png", 5, 3, value=30)
    write_image(tmp_path / "C" / "x.png", 5, 3)
    train = list_samples(tmp_path / "A")
    assert [s.key for s in train] == ["00001", "00002"]
    test = keyed_apart(train, list_samples(tmp_path / "B"))
    assert [(s.key, s.image.parent.name) for s in test] == [("test_00001", "B"), ("test_00003", "B")]
    distinct = list_samples(tmp_path / "C")
    assert keyed_apart(train, distinct) is distinct  # no collision: today's keys
    same = [train[0], *list_samples(tmp_path / "B")]  # 00001 is A's own file: it keeps its key
    assert [s.key for s in keyed_apart(train, same)] == ["00001", "test_00001", "test_00003"]
    write_image(tmp_path / "A" / "test_00003.png", 5, 3)  # the prefixed name is taken too: refused, naming both
    with pytest.raises(ValueError, match="test_00003.*rename one"):
        keyed_apart(list_samples(tmp_path / "A"), list_samples(tmp_path / "B"))


# ---------------------------------------------------------------- this project's imagefolder

def test_imagefolder(tmp_path):
    write_image(tmp_path / "images" / "0001.png", 6, 4)
    write_image(tmp_path / "images" / "0002.png", 6, 4)
    write_grey(tmp_path / "masks" / "0001.png", np.pad(np.full((2, 2), 255), ((1, 1), (1, 3))))
    rows = [
        {"file_name": "images/0001.png", "mask_file_name": "masks/0001.png", "split": "test", "classes": ["bird"]},
        {"file_name": "images/0002.png", "split": "train", "classes": ["bird", "dog"]},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (s,) = read_dataset(f"imagefolder:{tmp_path}", "test")
    assert s.key == "0001" and s.image.exists() and s.label == "bird" and s.box is None
    assert load_mask(s).shape == (4, 6) and mask_to_box(load_mask(s)) == (1, 1, 2, 2)
    (t,) = read_dataset(f"imagefolder:{tmp_path}", "train")
    assert t.label is None and t.mask is None  # two classes: no single label
    assert len(read_dataset(f"imagefolder:{tmp_path}", "all")) == 2
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_dataset(f"imagefolder:{tmp_path / 'images'}")


# ---------------------------------------------------------------- specs, masks, boxes

def test_registry_and_spec_errors(tmp_path):
    assert set(READERS) == {"cub", "dogs", "cars", "h36m", "folder", "imagefolder", "mimic-cxr", "ms-cxr"}
    with pytest.raises(ValueError, match="imagefolder") as e:
        read_dataset(f"voc:{tmp_path}")
    assert all(name in str(e.value) for name in READERS)
    with pytest.raises(ValueError, match="cub"):
        read_dataset(str(tmp_path))  # no "name:"
    with pytest.raises(ValueError, match="root"):
        read_dataset("cub:")
    with pytest.raises(ValueError, match="split"):
        read_dataset(f"cub:{tmp_path}", "val")
    with pytest.raises(ValueError, match="masks"):
        read_dataset(f"cub:{tmp_path},masks=/m")


def test_load_mask_sizes(tmp_path):
    image = write_image(tmp_path / "im.png", 8, 4)
    half = write_grey(tmp_path / "half.png", np.pad(np.full((2, 2), 255), ((0, 0), (0, 2))))
    m = load_mask(Sample("k", image, half, None, None))  # 4x2 mask of an 8x4 image: scaled up
    assert m.shape == (4, 8) and m[:, :3].all() and not m[:, 5:].any()
    square = write_grey(tmp_path / "square.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="4x4"):
        load_mask(Sample("k", image, square, None, None))
    with pytest.raises(ImageReadError, match="missing.png"):
        load_mask(Sample("k", image, tmp_path / "missing.png", None, None))


def test_load_mask_follows_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the 8x4 file shows as 4x8
    image = tmp_path / "rotated.jpg"
    Image.new("RGB", (8, 4)).save(image, exif=exif)
    mask = write_grey(tmp_path / "mask.png", np.full((8, 4), 255))
    assert load_mask(Sample("k", image, mask, None, None)).shape == (8, 4)


def test_mask_to_box():
    m = np.zeros((5, 7), bool)
    assert mask_to_box(m) is None
    m[1, 2] = True
    assert mask_to_box(m) == (2, 1, 2, 1)
    m[3, 5] = True
    assert mask_to_box(m) == (2, 1, 5, 3)
    assert mask_to_box(np.ones((5, 7))) == (0, 0, 6, 4)
    with pytest.raises(ValueError):
        mask_to_box(np.ones((2, 2, 2)))


def test_box_iou():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    # 10x10 and 10x10 overlapping in 5x10: 50 / (100 + 100 - 50)
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    # inclusive coordinates: a single pixel has area 1; (0,0,1,1) is 2x2 = 4
    assert box_iou((1, 1, 1, 1), (0, 0, 1, 1)) == pytest.approx(1 / 4)
    assert box_iou((0, 0, 2, 2), (2, 2, 4, 4)) == pytest.approx(1 / 17)  # corners touch: 1 pixel
    assert box_iou((0, 0, 2, 2), (3, 3, 4, 4)) == 0.0
    assert box_iou((2, 3, 5, 7), (0, 0, 9, 9)) == pytest.approx(20 / 100)  # contained
    assert box_iou(None, (0, 0, 1, 1)) == 0.0 and box_iou((0, 0, 1, 1), None) == 0.0
    assert box_iou(None, None) == 1.0
    with pytest.raises(ValueError):
        box_iou((3, 0, 1, 1), (0, 0, 1, 1))
