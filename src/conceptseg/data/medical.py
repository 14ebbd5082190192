"""Readers for chest radiograph data: MIMIC-CXR-JPG image-report pairs, MS-CXR boxes, the chest world.

- MIMIC-CXR-JPG (PhysioNet), as its users download it::

      <root>/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition, ...
      <root>/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split (train/validate/test)
      <root>/files/p10/p10000032/s50414267/<dicom_id>.jpg
      <reports>/files/p10/p10000032/s50414267.txt  (MIMIC-CXR's mimic-cxr-reports.zip; default <reports> = <root>)

  Frontal views only (ViewPosition PA or AP). The text of a pair is the report's IMPRESSION
  section, else its FINDINGS section (RoentGen trained on impressions), read when the pair is
  loaded: listing reads only the two csv files and stats the reports, so 377k images stream.
- MS-CXR (PhysioNet): ``<root>/MS_CXR_Local_Alignment_v1.0.0.csv`` with dicom_id, category_name,
  label_text, x, y, w, h, image_width, image_height (and, in the released file, path: the image's
  path inside MIMIC-CXR-JPG); several rows (boxes) per image and finding. Images come from the
  MIMIC-CXR-JPG root (option ``images=``, default: the MS-CXR root). Boxes are x, y, w, h in the
  original image's pixels; they become inclusive (x, y, x + w - 1, y + h - 1).
- The chest world (`conceptseg.data.chest`): the same per-finding cases, with exact masks.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conceptseg.data.imagefolder import read_imagefolder
from conceptseg.data.samples import Box, Sample, check_split, need_path, safe_key

MIMIC_LAYOUT = ("<root>/mimic-cxr-2.0.0-metadata.csv[.gz], <root>/mimic-cxr-2.0.0-split.csv[.gz], "
                "<root>/files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg, reports <reports>/files/pXX/pXXXXXXXX/sXXXXXXXX.txt")
MSCXR_CSV = "MS_CXR_Local_Alignment_v1.0.0.csv"
MSCXR_LAYOUT = (f"<root>/{MSCXR_CSV} (dicom_id, category_name, label_text, x, y, w, h, image_width, image_height[, path]); "
                "images in the MIMIC-CXR-JPG layout under images=<mimic root> (default <root>)")
FRONTAL = ("PA", "AP")
# The word of each MS-CXR finding whose cross-attention map stage 1 reads.
MSCXR_WORDS: dict[str, str] = {
    "atelectasis": "atelectasis", "cardiomegaly": "cardiomegaly", "consolidation": "consolidation", "edema": "edema",
    "lung opacity": "opacity", "pleural effusion": "effusion", "pneumonia": "pneumonia", "pneumothorax": "pneumothorax",
}
_MIMIC_SPLITS = {"train": ("train",), "test": ("test",), "all": ("train", "validate", "test")}


# ---------------------------------------------------------------- csv helpers

def _find_csv(root: Path, name: str, layout: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{root / name} (or .gz) not found. Expected layout: {layout}")


def _csv_rows(path: Path, required: set[str]) -> Iterator[dict[str, str]]:
    """Rows of a csv or csv.gz, checked for the columns a reader needs; errors name the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = required - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: header lacks {sorted(missing)} (has {reader.fieldnames})")
            yield from reader
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable csv ({e})") from None


def _study_dir(subject_id: str, study_id: str) -> Path:
    """files/p10/p10000032/s50414267 from subject 10000032 and study 50414267."""
    subject, study = subject_id.strip().lstrip("p"), study_id.strip().lstrip("s")
    return Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"


# ---------------------------------------------------------------- reports

_HEADER = re.compile(r"^\s*([A-Z][A-Z /&()-]+):", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """A free-text MIMIC report's sections by upper-case header ("FINDINGS", "IMPRESSION", ...),
    whitespace collapsed. Text before the first header is under ""."""
    sections: dict[str, str] = {}
    heads = list(_HEADER.finditer(text))
    bounds = [(m.group(1).strip(), m.end(), heads[k + 1].start() if k + 1 < len(heads) else len(text)) for k, m in enumerate(heads)]
    if heads:
        sections[""] = text[: heads[0].start()]
    else:
        sections[""] = text
    for name, start, end in bounds:
        sections[name] = (sections.get(name, "") + " " + text[start:end]).strip()
    return {k: " ".join(v.split()) for k, v in sections.items()}


def report_text(text: str, section: str = "impression") -> str:
    """The text a pair trains on: "impression" (else findings), "findings" (else impression) or
    "both" (findings then impression); "" when the report has neither."""
    s = report_sections(text)
    findings, impression = s.get("FINDINGS", ""), s.get("IMPRESSION", "")
    if section == "impression":
        return impression or findings
    if section == "findings":
        return findings or impression
    if section == "both":
        return " ".join(x for x in (findings, impression) if x)
    raise ValueError(f"section must be impression, findings or both, got {section!r}")


# ---------------------------------------------------------------- image-text pairs

@dataclass(frozen=True)
class ImageTextPair:
    """One training pair; `text` is given, or read from `report` when the pair is loaded."""

    key: str
    image: Path
    text: str | None = None
    report: Path | None = None
    section: str = "impression"

    def caption(self) -> str:
        if self.text is not None:
            return self.text
        try:
            return report_text(self.report.read_text(encoding="utf-8", errors="replace"), self.section)
        except OSError as e:
            raise ValueError(f"{self.report}: report not readable ({e})") from None


def read_mimic_cxr_pairs(root: Path, split: str = "train", reports: Path | None = None,
                         section: str = "impression") -> list[ImageTextPair]:
    """Frontal MIMIC-CXR-JPG images with their study's report, in metadata order. Images whose
    study has no report file are left out (MIMIC-CXR has a few)."""
    root, split = Path(root), check_split(split)
    reports = Path(reports) if reports else root
    need_path(root / "files", MIMIC_LAYOUT)
    meta = _find_csv(root, "mimic-cxr-2.0.0-metadata.csv", MIMIC_LAYOUT)
    split_csv = _find_csv(root, "mimic-cxr-2.0.0-split.csv", MIMIC_LAYOUT)
    wanted = _MIMIC_SPLITS[split]
    in_split = {r["dicom_id"] for r in _csv_rows(split_csv, {"dicom_id", "split"}) if r["split"].strip() in wanted}
    pairs, has_report = [], {}
    for r in _csv_rows(meta, {"dicom_id", "subject_id", "study_id", "ViewPosition"}):
        if r["dicom_id"] not in in_split or r["ViewPosition"].strip() not in FRONTAL:
            continue
        study = _study_dir(r["subject_id"], r["study_id"])
        report = reports / study.with_suffix(".txt")
        if study not in has_report:
            has_report[study] = report.is_file()
        if has_report[study]:
            pairs.append(ImageTextPair(key=safe_key(r["dicom_id"]), image=root / study / f"{r['dicom_id']}.jpg",
                                       report=report, section=section))
    return pairs


def read_imagefolder_pairs(root: Path, split: str = "train") -> list[ImageTextPair]:
    """This project's imagefolder layout (the toy and chest worlds): file_name and caption; "train"
    takes every row not in the test split."""
    rows = read_imagefolder(root)
    keep = {"train": lambda s: s != "test", "test": lambda s: s == "test", "all": lambda s: True}[check_split(split)]
    return [ImageTextPair(key=safe_key(r.image.stem), image=r.image, text=r.caption) for r in rows if keep(r.split)]


def read_pairs(spec: str | Path, split: str = "train") -> list[ImageTextPair]:
    """Image-text pairs of `spec`: an imagefolder path, or "mimic-cxr:ROOT[,reports=DIR][,section=S]"."""
    spec = str(spec)
    if spec.startswith("mimic-cxr:"):
        root, *opts = re.split(r",(?=\w+=)", spec.partition(":")[2])
        options = dict(o.split("=", 1) for o in opts)
        unknown = set(options) - {"reports", "section"}
        if unknown:
            raise ValueError(f"{spec!r}: mimic-cxr takes the options reports= and section=, not {sorted(unknown)}")
        return read_mimic_cxr_pairs(Path(root).expanduser(), split, options.get("reports"), options.get("section", "impression"))
    if spec.startswith("imagefolder:"):
        spec = spec.partition(":")[2]
    return read_imagefolder_pairs(Path(spec).expanduser(), split)


def read_mimic_cxr(root: Path, split: str = "test", reports: str | None = None) -> list[Sample]:
    """READERS entry: frontal MIMIC-CXR-JPG images (no masks or boxes), e.g. for `prelim`."""
    return [Sample(key=p.key, image=p.image, mask=None, box=None, label=None)
            for p in read_mimic_cxr_pairs(root, split, reports)]


# ---------------------------------------------------------------- per-finding evaluation cases

@dataclass(frozen=True)
class FindingCase:
    """One image and one finding in it: its boxes (and exact masks where known)."""

    key: str  # unique per (image, finding)
    image: Path
    finding: str  # lower-case category, e.g. "pleural effusion"
    word: str  # the word whose map stage 1 reads
    phrase: str  # how the finding is written, e.g. "Moderate right pleural effusion" / MS-CXR's label_text
    boxes: tuple[Box, ...]
    image_size: tuple[int, int] | None = None  # (width, height) the boxes refer to, where the dataset says
    masks: tuple[Path, ...] = field(default=())
    other_findings: tuple[str, ...] = ()  # the image's other findings (for the negation check)


def read_mscxr(root: Path, images: Path | None = None, mimic_root: Path | None = None) -> list[FindingCase]:
    """MS-CXR's boxes grouped per (image, finding). The image path comes from the csv's `path`
    column, else from MIMIC-CXR-JPG's metadata under `mimic_root` (default `images`)."""
    root = Path(root)
    images = Path(images) if images else root
    path = need_path(root / MSCXR_CSV, MSCXR_LAYOUT)
    need = {"dicom_id", "category_name", "label_text", "x", "y", "w", "h", "image_width", "image_height"}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    has_path = False
    for n, r in enumerate(_csv_rows(path, need), 2):
        has_path = has_path or bool(r.get("path"))
        try:
            r["_box"] = tuple(float(r[c]) for c in ("x", "y", "w", "h"))
            r["_size"] = (int(float(r["image_width"])), int(float(r["image_height"])))
        except ValueError:
            raise ValueError(f"{path}, line {n}: non-numeric box or image size") from None
        groups[(r["dicom_id"].strip(), r["category_name"].strip().lower())].append(r)
    locate = None
    if not has_path:
        mroot = Path(mimic_root) if mimic_root else images
        meta = _find_csv(mroot, "mimic-cxr-2.0.0-metadata.csv", f"{MSCXR_LAYOUT}; without a path column, {MIMIC_LAYOUT}")
        wanted = {d for d, _ in groups}
        locate = {r["dicom_id"]: _study_dir(r["subject_id"], r["study_id"]) / f"{r['dicom_id']}.jpg"
                  for r in _csv_rows(meta, {"dicom_id", "subject_id", "study_id"}) if r["dicom_id"] in wanted}
    per_image = defaultdict(set)
    for dicom, cat in groups:
        per_image[dicom].add(cat)
    cases = []
    for (dicom, cat), rows in groups.items():
        if locate is not None and dicom not in locate:
            raise ValueError(f"{path}: image {dicom} is not in the MIMIC-CXR-JPG metadata")
        rel = rows[0]["path"].strip() if has_path and rows[0].get("path") else locate[dicom]
        boxes = tuple((int(round(x)), int(round(y)), int(round(x + w)) - 1, int(round(y + h)) - 1)
                      for x, y, w, h in (r["_box"] for r in rows))
        cases.append(FindingCase(key=safe_key(f"{dicom}_{cat}"), image=images / rel, finding=cat,
                                 word=MSCXR_WORDS.get(cat, cat.split()[-1]), phrase=rows[0]["label_text"].strip() or cat,
                                 boxes=boxes, image_size=rows[0]["_size"],
                                 other_findings=tuple(sorted(per_image[dicom] - {cat}))))
    return cases


def read_mscxr_samples(root: Path, split: str = "test", images: str | None = None) -> list[Sample]:
    """READERS entry: one Sample per (image, finding), labelled with the finding; `box` is the
    bounding box of all that finding's boxes (the full set: `read_mscxr`). MS-CXR is an
    evaluation set: every split returns all of it."""
    check_split(split)
    out = []
    for c in read_mscxr(root, images):
        out.append(Sample(key=c.key, image=c.image, mask=None, label=c.finding,
                          box=(min(b[0] for b in c.boxes), min(b[1] for b in c.boxes),
                               max(b[2] for b in c.boxes), max(b[3] for b in c.boxes))))
    return out


def _chest_rows(root: Path, split: str) -> Iterator[dict]:
    """The rows of the chest world's metadata.jsonl in `split` ("all": every row)."""
    import json

    root = Path(root)
    meta = need_path(root / "metadata.jsonl", "<root>/metadata.jsonl written by `conceptseg toyworld --domain chest`")
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            r["findings"]  # noqa: B018  (a row without the key is not a chest-world row)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}, line {n}: not a chest-world row with findings ({e})") from None
        if split == "all" or r.get("split", "train") == split:
            yield r


def read_chest_world(root: Path, split: str = "test") -> list[FindingCase]:
    """The chest world's per-finding cases (boxes and exact masks) from its metadata.jsonl."""
    root = Path(root)
    cases = []
    for r in _chest_rows(root, split):
        findings = r["findings"]
        names = [f["finding"] for f in findings]
        for f in findings:
            if f.get("box") is None:  # drawn, then hidden entirely by a later finding: nothing to score
                continue
            phrase = " ".join(x for x in (f.get("size"), f.get("side"), f["finding"]) if x)
            cases.append(FindingCase(key=f"{Path(r['file_name']).stem}_{safe_key(f['finding'])}", image=root / r["file_name"],
                                     finding=f["finding"], word=f["word"], phrase=phrase, boxes=(tuple(f["box"]),),
                                     masks=(root / f["mask_file_name"],),
                                     other_findings=tuple(sorted(set(names) - {f["finding"]}))))
    return cases


def _finding_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    """(dataset name, root, options) of "chest:ROOT" or "ms-cxr:ROOT[,images=MIMIC_ROOT]"."""
    name, _, rest = str(spec).partition(":")
    root, *opts = re.split(r",(?=\w+=)", rest)
    options = dict(o.split("=", 1) for o in opts)
    if (name == "chest" and not options) or (name == "ms-cxr" and set(options) <= {"images"}):
        return name, Path(root).expanduser(), options
    raise ValueError(f"finding dataset spec {spec!r}: expected 'chest:ROOT' or 'ms-cxr:ROOT[,images=MIMIC_ROOT]'")


def read_finding_cases(spec: str, split: str = "test") -> list[FindingCase]:
    """"chest:ROOT" (the chest world) or "ms-cxr:ROOT[,images=MIMIC_ROOT]"."""
    name, root, options = _finding_spec(spec)
    if name == "chest":
        return read_chest_world(root, split)
    return read_mscxr(root, options.get("images"))


# ---------------------------------------------------------------- images with their reports (the negation measure)

@dataclass(frozen=True)
class ReportedImage:
    """One image of an evaluation split with its report and every finding it has (healthy: none)."""

    key: str
    image: Path
    report: str
    findings: tuple[str, ...]


# A negation cue before the word in the same sentence: "No pneumothorax.", "Heart size is normal, no
# cardiomegaly.", "without effusion", "negative for consolidation". Enough for template reports (the
# chest world's); real reports would want a full NegEx-style rule set.
_NEGATION_CUE = re.compile(r"\b(?:no|not|without|negative for|free of|absence of)\b", re.IGNORECASE)


def _sentences(report: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;!?])\s+", report.strip()) if s]


def _negated_in(sentence: str, word: str) -> bool:
    """Whether `sentence` names `word` (or its plural) after a negation cue."""
    mention = re.compile(rf"\b{re.escape(word)}s?\b", re.IGNORECASE)
    return any(_NEGATION_CUE.search(sentence[: m.start()]) for m in mention.finditer(sentence))


def negates(report: str, word: str) -> bool:
    """Whether a sentence of `report` names `word` (or its plural) after a negation cue."""
    return any(_negated_in(s, word) for s in _sentences(report))


def drop_negated_sentences(report: str, words: Sequence[str]) -> str:
    """`report` without the sentences that negate one of `words` ("No pneumothorax." for
    "pneumothorax"). A text encoder that cannot read negation (the embedded model's has no context)
    sees such a word as often with images lacking the finding as with images showing it."""
    return " ".join(s for s in _sentences(report) if not any(_negated_in(s, w) for w in words))


def read_chest_world_images(root: Path, split: str = "test") -> list[ReportedImage]:
    """Every image of the chest world's split with its report (the caption) and its findings,
    healthy images and findings hidden by a later one included."""
    root = Path(root)
    return [ReportedImage(key=Path(r["file_name"]).stem, image=root / r["file_name"], report=r.get("caption", ""),
                          findings=tuple(f["finding"] for f in r["findings"]))
            for r in _chest_rows(root, split)]


def read_reported_images(spec: str, split: str = "test") -> list[ReportedImage] | None:
    """The split's images with reports and findings, for the negation measure; None for MS-CXR,
    whose images all have a finding (no healthy ones to compare with) and whose csv holds the
    boxes' phrases, not reports."""
    name, root, _ = _finding_spec(spec)
    return read_chest_world_images(root, split) if name == "chest" else None
