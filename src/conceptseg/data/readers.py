"""Readers for the evaluation datasets, each for the layout its users download (docs/datasets.md).

`read_dataset("cub:/data/CUB_200_2011", "test")` -> [Sample(key, image, mask, box, label), ...].
Readers only read index files (text, .mat, .xml, .csv): they never open an image, so listing a
dataset is quick; `load_mask` reads one mask at its image's size.

Boxes are (x0, y0, x1, y1), inclusive pixel coordinates in the original image. CUB's "x y w h"
becomes (x, y, x + w - 1, y + h - 1); Stanford Dogs' and Cars' corners are kept as the files give
them (their 0/1-based convention is undocumented; one pixel moves box IoU by < 1% at their sizes).
"""

from __future__ import annotations

import csv
import glob
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import loadmat

from conceptseg.data.imagefolder import read_imagefolder
from conceptseg.data.medical import read_mimic_cxr, read_mscxr_samples
from conceptseg.data.samples import Box, Sample, check_split, need_path, safe_key
from conceptseg.geometry import image_size, load_mask_file

# every extension Pillow can open (.jpg, .png, .tif, .webp, .bmp, ...)
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
H36M_SUBSET = 6000  # the paper's Human3.6M evaluation size; drawn with np.random.default_rng(0)


# ---------------------------------------------------------------- helpers

def _path_key(rel: str) -> str:
    """'001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg' -> '001.Black..__Black..'"""
    return "__".join(safe_key(part) for part in Path(rel).with_suffix("").parts)


def _class_name(folder: str) -> str:
    """'001.Black_footed_Albatross' / 'n02085620-Chihuahua' -> 'Black footed Albatross' / 'Chihuahua'."""
    return re.sub(r"^(\d+\.|n\d+-)", "", folder).replace("_", " ")


def _id_table(path: Path) -> dict[str, str]:
    """'<id> <rest of line>' lines (CUB's index files), in file order."""
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{path}, line {n}: expected '<id> <value>', got {line!r}")
            table[parts[0]] = parts[1].strip()
    return table


def _loadmat(path: Path) -> dict:
    try:
        return loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several types for a file that is not MATLAB v5
        raise ValueError(f"{path}: not a readable MATLAB v5 .mat file ({e})") from None


def _mat_field(mat: dict, name: str, path: Path):
    if name not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no variable {name!r} (has {keys})")
    return mat[name]


def _strings(x) -> list[str]:
    """A MATLAB cell array of strings as a flat list, whatever its nesting or squeezing."""
    if isinstance(x, str):
        return [x]
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "U":
            return [str(s) for s in x.flat]
        return [s for e in x.flat for s in _strings(e)]
    raise ValueError(f"expected a cell array of strings, found {type(x).__name__}")


def _structs(x) -> list:
    """A MATLAB struct array (loaded with struct_as_record=False) as a flat list of structs."""
    return list(np.asarray(x, dtype=object).flat) if isinstance(x, np.ndarray) else [x]


def _corners(values) -> Box:
    x0, y0, x1, y1 = (max(0, int(round(float(v)))) for v in values)
    return x0, y0, max(x0, x1), max(y0, y1)


def _area(box: Box) -> int:
    return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)


# ---------------------------------------------------------------- readers

CUB_LAYOUT = ("<root>/images.txt, <root>/train_test_split.txt, <root>/images/<class>/<name>.jpg, "
              "optional <root>/bounding_boxes.txt, masks in <root>/segmentations or <root>/../segmentations")


def read_cub(root: Path, split: str = "test") -> list[Sample]:
    root, split = Path(root), check_split(split)
    images = _id_table(need_path(root / "images.txt", CUB_LAYOUT))
    is_train = _id_table(need_path(root / "train_test_split.txt", CUB_LAYOUT))
    need_path(root / "images", CUB_LAYOUT)
    boxes = {}
    if (root / "bounding_boxes.txt").exists():
        for i, value in _id_table(root / "bounding_boxes.txt").items():
            x, y, w, h = (float(v) for v in value.split())
            boxes[i] = _corners((x, y, x + w - 1, y + h - 1))
    seg = next((d for d in (root / "segmentations", root.parent / "segmentations") if d.is_dir()), None)
    samples = []
    for i, rel in images.items():
        if i not in is_train:
            raise ValueError(f"{root / 'train_test_split.txt'}: no entry for image id {i} ({rel})")
        if split != "all" and (is_train[i] == "1") != (split == "train"):
            continue
        samples.append(Sample(key=_path_key(rel), image=root / "images" / rel,
                              mask=seg / Path(rel).with_suffix(".png") if seg else None,
                              box=boxes.get(i), label=_class_name(Path(rel).parent.name)))
    return samples


DOGS_LAYOUT = ("<root>/train_list.mat, <root>/test_list.mat (from lists.tar), "
               "<root>/Images/<breed>/<name>.jpg, <root>/Annotation/<breed>/<name> (XML)")


def _voc_box(path: Path) -> Box | None:
    """The box of the largest <object> in a PASCAL-VOC-style XML file (None if it has none)."""
    try:
        tree = ET.parse(need_path(path, DOGS_LAYOUT))
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a readable annotation XML ({e})") from None
    boxes = []
    for bb in tree.getroot().iter("bndbox"):
        try:
            boxes.append(_corners(bb.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: a <bndbox> without numeric xmin/ymin/xmax/ymax") from None
    return max(boxes, key=_area) if boxes else None  # max keeps the first of equal areas


def read_dogs(root: Path, split: str = "test") -> list[Sample]:
    root, split = Path(root), check_split(split)
    lists = ["train_list.mat", "test_list.mat"] if split == "all" else [f"{split}_list.mat"]
    mats = [(root / name, _loadmat(need_path(root / name, DOGS_LAYOUT))) for name in lists]
    need_path(root / "Images", DOGS_LAYOUT)
    need_path(root / "Annotation", DOGS_LAYOUT)
    samples = []
    for path, mat in mats:
        files = _strings(_mat_field(mat, "file_list", path))
        annos = _strings(mat["annotation_list"]) if "annotation_list" in mat else [
            str(Path(f).with_suffix("")) for f in files]
        if len(annos) != len(files):
            raise ValueError(f"{path}: {len(files)} files but {len(annos)} annotations")
        for rel, anno in zip(files, annos):
            samples.append(Sample(key=_path_key(rel), image=root / "Images" / rel, mask=None,
                                  box=_voc_box(root / "Annotation" / anno),
                                  label=_class_name(Path(rel).parent.name)))
    return samples


CARS_LAYOUT = ("<root>/devkit/cars_train_annos.mat with <root>/cars_train/*.jpg; "
               "<root>/devkit/cars_test_annos_withlabels.mat (or <root>/cars_test_annos_withlabels.mat, "
               "or unlabelled devkit/cars_test_annos.mat) with <root>/cars_test/*.jpg; "
               "optional <root>/devkit/cars_meta.mat")


def read_cars(root: Path, split: str = "test") -> list[Sample]:
    root, split = Path(root), check_split(split)
    devkit = root / "devkit"
    meta = devkit / "cars_meta.mat"
    names = _strings(_mat_field(_loadmat(meta), "class_names", meta)) if meta.exists() else None
    test_annos = [devkit / "cars_test_annos_withlabels.mat", root / "cars_test_annos_withlabels.mat",
                  devkit / "cars_test_annos.mat"]
    parts = {"train": devkit / "cars_train_annos.mat",
             "test": next((p for p in test_annos if p.exists()), test_annos[0])}
    samples = []
    for part in ("train", "test") if split == "all" else (split,):
        annos_path, image_dir = need_path(parts[part], CARS_LAYOUT), need_path(root / f"cars_{part}", CARS_LAYOUT)
        for a in _structs(_mat_field(_loadmat(annos_path), "annotations", annos_path)):
            try:
                fname = str(a.fname)
                box = _corners(getattr(a, f) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
            except AttributeError as e:
                raise ValueError(f"{annos_path}: an annotation lacks a field ({e})") from None
            cls = getattr(a, "class", None)
            if names and cls is not None and not 1 <= int(cls) <= len(names):
                raise ValueError(f"{annos_path}: class {cls} of {fname} not in {meta} ({len(names)} names)")
            label = None if cls is None else names[int(cls) - 1] if names else str(int(cls))
            samples.append(Sample(key=f"{part}_{_path_key(fname)}", image=image_dir / fname,
                                  mask=None, box=box, label=label))
    return samples


H36M_LAYOUT = "<root>/boxes.csv (header key,x0,y0,x1,y1,split) and <root>/images/<key>.jpg"


def read_h36m(root: Path, split: str = "test") -> list[Sample]:
    """Human3.6M crops; a split with more than 6,000 rows is cut to a seeded 6,000-row subset."""
    root, split = Path(root), check_split(split)
    path = need_path(root / "boxes.csv", H36M_LAYOUT)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"key", "x0", "y0", "x1", "y1", "split"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: header lacks {sorted(missing)}. Expected layout: {H36M_LAYOUT}")
        rows = [r for r in reader if split == "all" or r["split"].strip() == split]
    if len(rows) > H36M_SUBSET:
        chosen = np.sort(np.random.default_rng(0).choice(len(rows), H36M_SUBSET, replace=False))
        rows = [rows[i] for i in chosen]
    samples = []
    for r in rows:
        key = r["key"].strip()
        if key != safe_key(key):
            raise ValueError(f"{path}: key {key!r} is not filesystem-safe (use A-Z a-z 0-9 . _ -)")
        try:
            box = _corners(r[c] for c in ("x0", "y0", "x1", "y1"))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: row {key!r} has a non-numeric box") from None
        samples.append(Sample(key=key, image=root / "images" / f"{key}.jpg", mask=None, box=box, label=None))
    return samples


def _images_in(folder: Path) -> dict[str, Path]:
    """Images in `folder` and its subfolders (hidden ones skipped), by key: the relative path without
    its extension ('a.jpg' -> 'a', '001.Albatross/x.jpg' -> '001.Albatross__x'); an error if two share one."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel.parts):
            key = _path_key(str(rel))
            if key in found:
                raise ValueError(f"{found[key]} and {p} would both be named {key!r}: rename one")
            found[key] = p
    return found


def read_folder(root: Path, split: str = "all", masks: str | Path | None = None) -> list[Sample]:
    """Every image in `root`, subfolders included (CUB's images/<class>/...); with `masks`, the mask
    at the same relative path (any extension)."""
    root, _ = Path(root), check_split(split)  # a plain folder has no splits
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found or not a folder. Expected layout: <root>/<name>.<image ext>")
    images = _images_in(root)
    if not images:
        raise FileNotFoundError(f"no image files (any format Pillow opens) in {root} or its subfolders")
    mask_files = None
    if masks is not None:
        masks = Path(masks).expanduser()
        if not masks.is_dir():
            raise FileNotFoundError(f"mask folder {masks} not found. Expected <masks>/<image stem>.<image ext>")
        mask_files = _images_in(masks)
        lacking = [k for k in images if k not in mask_files]
        if lacking:
            raise FileNotFoundError(f"no mask in {masks} for {len(lacking)} image(s), e.g. {lacking[:5]}")
    return [Sample(key=key, image=p, mask=mask_files[key] if mask_files else None, box=None, label=None)
            for key, p in images.items()]


def read_imagefolder_samples(root: Path, split: str = "test") -> list[Sample]:
    """This project's own imagefolder layout (metadata.jsonl); keys are image stems, or relative
    paths where stems repeat."""
    root, split = Path(root), check_split(split)
    rows = read_imagefolder(root)  # keys are decided over every split: a key names one file whatever the split
    by_stem = len({r.image.stem for r in rows}) == len(rows)
    return [Sample(key=safe_key(r.image.stem) if by_stem else _path_key(str(r.image.relative_to(root))),
                   image=r.image, mask=r.mask, box=None,
                   label=r.classes[0] if len(r.classes) == 1 else None) for r in rows if split == "all" or r.split == split]


READERS: dict[str, Callable[..., list[Sample]]] = {
    "cub": read_cub, "dogs": read_dogs, "cars": read_cars, "h36m": read_h36m,
    "folder": read_folder, "imagefolder": read_imagefolder_samples,
    "mimic-cxr": read_mimic_cxr, "ms-cxr": read_mscxr_samples,
}
# "name:/root,option=value" options a reader accepts
_OPTIONS = {"folder": {"masks"}, "mimic-cxr": {"reports"}, "ms-cxr": {"images"}}


def read_dataset(spec: str, split: str = "test") -> list[Sample]:
    """Samples of `spec` ("name:/path/to/root", e.g. "cub:/data/CUB_200_2011",
    "folder:/imgs,masks=/masks") for split "train", "test" or "all"."""
    name, sep, rest = spec.partition(":")
    if name not in READERS:
        raise ValueError(f"unknown dataset reader {name!r} in {spec!r}: expected 'name:/path' with "
                         f"name one of {sorted(READERS)}")
    if not sep or not rest:
        raise ValueError(f"dataset spec {spec!r} lacks a root: expected '{name}:/path/to/root'")
    root, *opts = re.split(r",(?=\w+=)", rest)
    options = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in _OPTIONS.get(name, set()):
            raise ValueError(f"{spec!r}: reader {name!r} takes no option {key!r} "
                             f"(accepts {sorted(_OPTIONS.get(name, ())) or 'none'})")
        options[key] = value
    samples = READERS[name](Path(root).expanduser(), check_split(split), **options)
    _check_unique(samples, repr(spec))
    return samples


def list_samples(source: str | Path | Sequence[Path | Sample], split: str = "all") -> list[Sample]:
    """The images a per-image stage works on, each with its key: the one name of its outputs.

    `source`: a dataset spec ("cub:/data/CUB_200_2011", with `split`), a folder (subfolders
    included; one with metadata.jsonl is read as the imagefolder layout, with `split`), one image file, a glob pattern ("photos/*.jpg"), or a list of paths or Samples.
    A path's key is its stem; a folder's are relative paths. Keys are unique or this raises."""
    if isinstance(source, (list, tuple)):
        samples = [s if isinstance(s, Sample) else Sample(safe_key(Path(s).stem), Path(s), None, None, None) for s in source]
        where = "the image list"
    else:
        text, path = str(source), Path(source).expanduser()
        if (path / "metadata.jsonl").is_file():  # this project's imagefolder layout (e.g. a synthetic set)
            return read_imagefolder_samples(path, split)
        if path.is_dir():
            samples = read_folder(path)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path}: not an image file by its extension ({path.suffix or 'none'}); give images Pillow opens")
            samples = [Sample(safe_key(path.stem), path, None, None, None)]
        elif glob.has_magic(text):
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))
                       if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS]
            if not matches:
                raise FileNotFoundError(f"no image matches {text!r}")
            samples = [Sample(safe_key(p.stem), p, None, None, None) for p in matches]
        elif ":" in text.split("/")[0]:
            return read_dataset(text, split)
        else:
            raise FileNotFoundError(f"{text} does not exist: --images takes a folder, an image file, a glob "
                                    "('photos/*.jpg') or a dataset spec (cub:/path/to/CUB_200_2011)")
        where = text
    _check_unique(samples, where)
    return samples


def _check_unique(samples: list[Sample], where: str) -> None:
    keys: dict[str, Sample] = {}
    for s in samples:
        if s.key in keys:
            raise ValueError(f"{where}: {keys[s.key].image} and {s.image} share the key {s.key!r} (outputs are named "
                             "by key): rename one")
        keys[s.key] = s


def keyed_apart(first: list[Sample], second: list[Sample], prefix: str = "test") -> list[Sample]:
    """`second` keyed so that no key of it names a different file than the same key of `first`
    (outputs are named by key; e.g. train and test folders that both hold 00001.jpg).

    Where no key collides, `second` is returned as it is: the keys of a single source, or of sources
    whose names differ, never change. Otherwise each sample of `second` that is not also in `first`
    (the same file) is keyed `<prefix>_<key>` (`test_00001`, as the Stanford Cars reader keys by split)."""
    files = {s.key: s.image.resolve() for s in first}

    def clashes(s: Sample) -> bool:
        return s.key in files and files[s.key] != s.image.resolve()

    if not any(clashes(s) for s in second):
        return second
    renamed = [s if files.get(s.key) == s.image.resolve() else replace(s, key=f"{prefix}_{s.key}") for s in second]
    still = [s for s in renamed if clashes(s)]
    if still:
        raise ValueError(f"{still[0].image} and {files[still[0].key]} would both be named {still[0].key!r} (outputs are "
                         "named by key): rename one")
    _check_unique(renamed, f"the {prefix} images")
    return renamed


# ---------------------------------------------------------------- masks and boxes

def load_mask(sample: Sample) -> np.ndarray:
    """The ground-truth mask as bool HxW at the image's size, read by `geometry.load_mask_file` (grey
    >= half range, CUB's soft masks rounded; 0/1 values; an alpha matte). A mask of another size but
    the same aspect ratio is resized (bilinear, >= 0.5)."""
    if sample.mask is None:
        raise ValueError(f"{sample.key}: no ground-truth mask for {sample.image} (for CUB, put the "
                         "segmentations download at <root>/segmentations or <root>/../segmentations)")
    mask = load_mask_file(sample.mask)
    w, h = image_size(sample.image)
    if mask.shape != (h, w):
        mh, mw = mask.shape
        if abs(mw * h - mh * w) > 0.02 * mw * h:
            raise ValueError(f"mask {sample.mask} is {mw}x{mh} but image {sample.image} is {w}x{h}: not the same picture")
        mask = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)) >= 0.5
    return mask


def mask_to_box(mask: np.ndarray) -> Box | None:
    """Tight inclusive (x0, y0, x1, y1) box of a 2-D mask's foreground; None if it is empty."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def box_iou(a: Box | None, b: Box | None) -> float:
    """IoU of two inclusive pixel boxes (area (x1-x0+1)*(y1-y0+1)); no box against no box is 1.0,
    no box against a box 0.0."""
    if a is None or b is None:
        return 1.0 if a is None and b is None else 0.0
    for box in (a, b):
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"box {box} has x1 < x0 or y1 < y0")
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0, iw) * max(0, ih)
    return inter / (_area(a) + _area(b) - inter)
