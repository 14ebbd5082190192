"""Seeded procedural chest world: radiograph-like images with findings of known extent and their reports.

A known-truth stand-in for MIMIC-CXR + MS-CXR (METHOD.md §6), where no real data can be had. Each
image is a grayscale frontal (PA) chest radiograph drawn from a density model: dark air outside
the body, soft tissue, two lucent lung fields with vessel markings, the heart shadow and
mediastinum, ribs and clavicles, then exposure (contrast, brightness, gamma) and noise vary.

Findings (four of MS-CXR's eight), laterality and size varying, several per image allowed:

- ``consolidation``: an irregular opacity inside one lung zone (upper, mid, lower);
- ``pleural effusion``: fluid density filling a lung base up to a meniscus that rises laterally;
- ``cardiomegaly``: an enlarged heart shadow (cardiothoracic ratio 0.56-0.68 against 0.42-0.48);
- ``pneumothorax``: a lucent rim without lung markings between the chest wall and the collapsed
  lung, whose edge is a thin white visceral pleural line.

A finding's mask is exactly the set of pixels its drawing changes (for pneumothorax: the pleural
air space; the pleural line is drawn on the collapsed lung's edge). Cardiomegaly's mask is the
enlarged heart shadow. Nothing is blurred after the findings are drawn, so the masks are exact.
Boxes are the masks' tight inclusive boxes (x0, y0, x1, y1). Findings on one side can overlap (a
mid-zone consolidation under a large effusion); the later-drawn one owns the shared pixels, and a
finding hidden entirely (about 1 row in 1,000) keeps its report sentence with an empty mask and
box null (evaluation skips it). Sides follow the radiological
convention: the patient's right is on the image's LEFT.

Each image has a report written from templates the way radiologists write: the findings with size,
side and location, then negations of (most) absent findings ("No pneumothorax."). Healthy images
have normal reports. ``generate`` writes the project's imagefolder layout; row ``i`` depends only
on ``(seed, i)`` and the config.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from conceptseg.data.toyworld import render_rows
from conceptseg.io import save_mask_png, save_png, write_json, write_text

FINDINGS: tuple[str, ...] = ("consolidation", "pleural effusion", "cardiomegaly", "pneumothorax")
# The word of each finding whose cross-attention map stage 1 reads (as it appears in every report
# that mentions the finding, positively or negated).
FINDING_WORDS: dict[str, str] = {"consolidation": "consolidation", "pleural effusion": "effusion",
                                 "cardiomegaly": "cardiomegaly", "pneumothorax": "pneumothorax"}
SIDES = ("right", "left")  # the patient's sides; right is on the image's left
SIZES = ("small", "moderate", "large")
ZONES = ("upper", "mid", "lower")
CARDIOMEGALY_GRADES = {"small": "mild", "moderate": "moderate", "large": "marked"}


@dataclass(frozen=True)
class Finding:
    name: str  # one of FINDINGS
    side: str | None  # "right" / "left"; None for cardiomegaly
    size: str  # one of SIZES
    zone: str | None = None  # consolidation only


@dataclass(frozen=True)
class ChestImage:
    image: np.ndarray  # HxW uint8
    findings: list[Finding]
    masks: list[np.ndarray]  # one HxW bool per finding
    report: str


# ------------------------------------------------------------------------ anatomy


@dataclass
class _Anatomy:
    """Where things are, in normalised coordinates (x right, y down, both 0..1 over the image)."""

    cx: float  # body midline
    cy: float  # vertical shift
    scale: float
    lung_half_width: float
    lung_top: float
    lung_base: dict  # side -> y of the costophrenic angle
    heart_ctr: float  # cardiothoracic ratio
    heart_height: float

    def lung_centre(self, side: str) -> float:
        offset = 0.175 * self.scale
        return self.cx - offset if side == "right" else self.cx + offset

    @property
    def thorax_half_width(self) -> float:
        return 0.175 * self.scale + self.lung_half_width

    def heart(self) -> tuple[float, float, float, float]:
        """(centre x, centre y, half width, half height) of the heart shadow."""
        hw = self.heart_ctr * self.thorax_half_width
        return self.cx + 0.3 * hw, self.lung_base["left"] - 1.05 * self.heart_height, hw, self.heart_height


def _random_anatomy(rng: np.random.Generator) -> _Anatomy:
    scale = rng.uniform(0.92, 1.04)
    base = rng.uniform(0.76, 0.8)
    return _Anatomy(cx=0.5 + rng.uniform(-0.02, 0.02), cy=rng.uniform(-0.02, 0.02), scale=scale,
                    lung_half_width=0.13 * scale * rng.uniform(0.95, 1.08), lung_top=0.15 + rng.uniform(-0.02, 0.02),
                    lung_base={"right": base - rng.uniform(0.01, 0.03), "left": base},
                    heart_ctr=rng.uniform(0.42, 0.48), heart_height=rng.uniform(0.1, 0.12))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each HxW in 0..1."""
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c)


def _lung(anat: _Anatomy, side: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A lung field: narrow apex leaning medially, widening downwards, a domed diaphragm."""
    top, base = anat.lung_top + anat.cy, anat.lung_base[side] + anat.cy
    c, a = anat.lung_centre(side), anat.lung_half_width
    medial = 1.0 if side == "right" else -1.0  # the right lung's medial side is towards +x
    t = np.clip((y - top) / (base - top), 0.0, 1.0)
    half = a * np.sqrt(np.clip(t / 0.35, 0.0, 1.0)) * (0.75 + 0.25 * t)
    inside = np.abs(x - (c + medial * 0.25 * a * (1 - t))) < half
    dome = base - 0.06 * np.clip(1 - ((x - c) / a) ** 2, 0, 1)
    return inside & (y > top) & (y < dome)


def _heart_mask(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    hx, hy, hw, hh = anat.heart()
    hy += anat.cy
    return ((x - hx) / hw) ** 2 + ((y - hy) / hh) ** 2 < 1.0


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma * size / 64)
    return n / (n.std() + 1e-8)


# ----------------------------------------------------------------------- findings


def _consolidation(rng: np.random.Generator, anat: _Anatomy, f: Finding, lung: np.ndarray, x, y, size: int) -> np.ndarray:
    """An irregular blob in one zone of the lung (upper / mid / lower third of its height)."""
    top, base = anat.lung_top + anat.cy, anat.lung_base[f.side] + anat.cy
    k = ZONES.index(f.zone)
    ys = top + (base - top) * (k + rng.uniform(0.35, 0.65)) / 3
    xs = anat.lung_centre(f.side) + rng.uniform(-0.35, 0.35) * anat.lung_half_width
    r = {"small": 0.045, "moderate": 0.065, "large": 0.09}[f.size] * anat.scale * rng.uniform(0.9, 1.1)
    rx, ry = r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25)
    shape = np.sqrt(((x - xs) / rx) ** 2 + ((y - ys) / ry) ** 2) + 0.25 * _smooth_noise(rng, size, 2.0)
    blob = (shape < 1.0) & lung
    if not blob.any():  # never empty: at least the pixel nearest the centre, if it is lung
        d = np.where(lung, (x - xs) ** 2 + (y - ys) ** 2, np.inf)
        blob.flat[np.argmin(d)] = True
    return blob


def _effusion(rng: np.random.Generator, anat: _Anatomy, f: Finding, lung: np.ndarray, x, y) -> np.ndarray:
    """The lung base below a meniscus: level set by the size, rising towards the chest wall."""
    top, base = anat.lung_top + anat.cy, anat.lung_base[f.side] + anat.cy
    depth = {"small": 0.17, "moderate": 0.32, "large": 0.5}[f.size] * rng.uniform(0.9, 1.1) * (base - top)
    lateral = np.clip(np.where(f.side == "right", -1.0, 1.0) * (x - anat.lung_centre(f.side)) / anat.lung_half_width, -1, 1.5)
    meniscus = base - depth - 0.06 * np.clip(lateral + 0.3, 0, None) ** 2
    return lung & (y > meniscus)


def _pneumothorax(rng: np.random.Generator, anat: _Anatomy, f: Finding, x, y) -> tuple[np.ndarray, np.ndarray]:
    """(pleural air space, collapsed lung): the lung shrunk towards its hilum; the air is the rest."""
    top, base = anat.lung_top + anat.cy, anat.lung_base[f.side] + anat.cy
    hx = anat.lung_centre(f.side) + np.where(f.side == "right", 1, -1) * 0.6 * anat.lung_half_width
    hy = top + 0.6 * (base - top)
    k = {"small": 0.78, "moderate": 0.64, "large": 0.5}[f.size] * rng.uniform(0.96, 1.04)
    full = _lung(anat, f.side, x, y)
    collapsed = _lung(anat, f.side, hx + (x - hx) / k, hy + (y - hy) / k)
    return full & ~collapsed, collapsed & full


def _finding_list(rng: np.random.Generator, healthy_fraction: float) -> list[Finding]:
    """0 findings (healthy) or 1-3 distinct ones; no effusion or consolidation on a pneumothorax side,
    and no lower-zone consolidation on an effusion side (they would overdraw each other)."""
    if rng.random() < healthy_fraction:
        return []
    count = int(rng.choice([1, 2, 3], p=[0.55, 0.33, 0.12]))
    names = [str(n) for n in rng.choice(FINDINGS, size=count, replace=False)]
    order = sorted(names, key=FINDINGS.index)
    ptx_side = str(rng.choice(SIDES)) if "pneumothorax" in order else None
    eff_side = str(rng.choice([s for s in SIDES if s != ptx_side])) if "pleural effusion" in order else None
    out = []
    for name in order:
        size = str(rng.choice(SIZES))
        if name == "cardiomegaly":
            out.append(Finding(name, None, size))
        elif name == "pneumothorax":
            out.append(Finding(name, ptx_side, size))
        elif name == "pleural effusion":
            out.append(Finding(name, eff_side, size))
        else:
            side = str(rng.choice([s for s in SIDES if s != ptx_side]))
            zones = [z for z in ZONES if not (side == eff_side and z == "lower")]
            out.append(Finding(name, side, size, str(rng.choice(zones))))
    return out


# ------------------------------------------------------------------------ reports


def _sentence(rng: np.random.Generator, f: Finding) -> str:
    if f.name == "cardiomegaly":
        grade = CARDIOMEGALY_GRADES[f.size]
        return str(rng.choice([f"{grade.capitalize()} cardiomegaly.", f"The heart is enlarged, {grade} cardiomegaly."]))
    if f.name == "pleural effusion":
        return str(rng.choice([f"{f.size.capitalize()} {f.side} pleural effusion.",
                               f"{f.size.capitalize()} {f.side} pleural effusion with blunting of the costophrenic angle."]))
    if f.name == "pneumothorax":
        return str(rng.choice([f"{f.size.capitalize()} {f.side} pneumothorax.", f"{f.size.capitalize()} {f.side} apical pneumothorax."]))
    size = {"small": "Small focal", "moderate": "Patchy", "large": "Large"}[f.size]
    return f"{size} consolidation in the {f.side} {f.zone} lung."


NEGATIONS: dict[str, tuple[str, ...]] = {
    "consolidation": ("No focal consolidation.", "No consolidation."),
    "pleural effusion": ("No pleural effusion.", "No effusion."),
    "cardiomegaly": ("No cardiomegaly.", "Heart size is normal, no cardiomegaly."),
    "pneumothorax": ("No pneumothorax.",),
}


def write_report(rng: np.random.Generator, findings: list[Finding], negate_fraction: float = 0.85) -> str:
    """Findings first (size, side, location), then negations of most absent findings."""
    parts = [_sentence(rng, f) for f in findings]
    if not findings:
        parts.append(str(rng.choice(["The lungs are clear.", "No acute cardiopulmonary process.", "Normal chest radiograph."])))
    present = {f.name for f in findings}
    for name in FINDINGS:
        if name not in present and rng.random() < negate_fraction:
            parts.append(str(rng.choice(NEGATIONS[name])))
    return " ".join(parts)


# ------------------------------------------------------------------------- images


def render_chest(rng: np.random.Generator, findings: list[Finding], size: int = 64) -> ChestImage:
    """Draw a radiograph with the given findings; each mask is exactly the pixels its finding changed."""
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    unknown = [f.name for f in findings if f.name not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown findings {unknown}; known: {FINDINGS}")
    x, y = _grid(size)
    # separate streams: the same rng draws the same patient, exposure and noise with or without findings
    rng, finding_rng, report_rng = rng.spawn(3)
    anat = _random_anatomy(rng)
    if any(f.name == "cardiomegaly" for f in findings):
        f = next(f for f in findings if f.name == "cardiomegaly")
        anat.heart_ctr = {"small": 0.57, "moderate": 0.62, "large": 0.67}[f.size] + finding_rng.uniform(-0.01, 0.01)
        anat.heart_height *= 1.0 + (anat.heart_ctr - 0.45)
    # body: soft tissue with shoulders, air outside
    body_w = anat.thorax_half_width + 0.07
    body = (np.abs(x - anat.cx) < body_w + 0.05 * np.clip((y - 0.1) / 0.2, 0, 1)) & (y > 0.06)
    density = np.where(body, 0.52 + 0.08 * (1 - np.abs(x - anat.cx) / (body_w + 0.05)), 0.06)
    density = density + 0.08 * np.clip((y - 0.8) / 0.2, 0, 1) * body  # abdomen
    lungs = {s: _lung(anat, s, x, y) for s in SIDES}
    heart = _heart_mask(anat, x, y)
    spine = (np.abs(x - anat.cx) < 0.045 * anat.scale) & body
    for s in SIDES:
        lungs[s] &= ~heart & ~spine
    markings = 0.025 * _smooth_noise(rng, size, 0.6)
    hilar = {s: np.exp(-(((x - anat.lung_centre(s)) * (1 if s == "left" else -1) + 0.6 * anat.lung_half_width) ** 2) / 0.01) for s in SIDES}
    for s in SIDES:
        lung_density = 0.2 + markings + 0.12 * hilar[s] * (1 + 0.5 * markings / 0.025)
        density = np.where(lungs[s], lung_density, density)
    density = np.where(heart | spine, np.maximum(density, 0.62), density)
    healthy = density.copy()

    masks = []
    for f in findings:
        if f.name == "consolidation":
            m = _consolidation(finding_rng, anat, f, lungs[f.side], x, y, size)
            gain = finding_rng.uniform(0.25, 0.33) * (1 + 0.15 * _smooth_noise(finding_rng, size, 1.0))
            density = np.where(m, density + np.clip(gain, 0.12, None), density)
        elif f.name == "pleural effusion":
            m = _effusion(finding_rng, anat, f, lungs[f.side], x, y)
            density = np.where(m, finding_rng.uniform(0.56, 0.62) + 0.01 * _smooth_noise(finding_rng, size, 3.0), density)
        elif f.name == "pneumothorax":
            m, collapsed = _pneumothorax(finding_rng, anat, f, x, y)
            m &= lungs[f.side]
            collapsed &= lungs[f.side]
            density = np.where(m, finding_rng.uniform(0.04, 0.08), density)  # air, no markings
            edge = collapsed & ~ndimage.binary_erosion(collapsed)
            density = np.where(edge & ndimage.binary_dilation(m), density + 0.15, density)  # visceral pleural line
        else:  # cardiomegaly: the enlarged heart shadow drawn above
            m = heart.copy()
        masks.append(m)

    # bones superimpose on everything: posterior ribs as arcs, clavicles, then exposure and noise
    bones = np.zeros_like(density)
    for k in range(9):
        y0 = anat.lung_top + anat.cy + 0.02 + k * 0.068 * anat.scale
        for s, sign in (("right", -1), ("left", 1)):
            u = sign * (x - anat.cx)
            arc = y0 + 0.35 * (u - 0.12) ** 2 - 0.03 * u
            bones += 0.07 * ((np.abs(y - arc) < 0.012) & (u > 0.04) & (u < anat.thorax_half_width + 0.02))
    for sign in (-1, 1):
        u = sign * (x - anat.cx)
        clav = 0.16 + anat.cy - 0.12 * (u - 0.05)
        bones += 0.12 * ((np.abs(y - clav) < 0.014) & (u > 0.04) & (u < 0.3))
    bones *= body
    contrast, brightness, gamma = rng.uniform(0.85, 1.2), rng.uniform(-0.06, 0.06), rng.uniform(0.8, 1.25)
    noise = rng.normal(0.0, rng.uniform(0.005, 0.025), density.shape)

    def expose(d: np.ndarray) -> np.ndarray:
        return np.clip((d + bones) * contrast + brightness, 0, 1) ** gamma + noise

    image = np.round(np.clip(expose(density), 0, 1) * 255).astype(np.uint8)
    # exact masks: a finding's pixels are those it changed and no later finding redrew
    exact: list[np.ndarray] = []
    for f, m in zip(findings, masks):
        if f.name != "cardiomegaly":
            m = m & (density != healthy)
            exact = [o & ~m for o in exact]
        exact.append(m)
    return ChestImage(image=image, findings=list(findings), masks=exact, report=write_report(report_rng, list(findings)))


# ----------------------------------------------------------------------- datasets


@dataclass
class ChestWorldConfig:
    """Dataset composition. Changing it changes the content of existing row indices."""

    size: int = 64
    healthy_fraction: float = 0.2
    test_fraction: float = 0.2
    findings: tuple[str, ...] = field(default=FINDINGS)


def _row_spec(seed: int, i: int, cfg: ChestWorldConfig) -> tuple[np.random.Generator, list[Finding], str]:
    rng = np.random.default_rng([seed, i, 7])  # a stream of its own: not the toy world's row i
    split = "test" if rng.random() < cfg.test_fraction else "train"
    findings = [f for f in _finding_list(rng, cfg.healthy_fraction) if f.name in cfg.findings]
    return rng, findings, split


def mask_box(mask: np.ndarray) -> list[int] | None:
    """Tight inclusive [x0, y0, x1, y1] of a mask, None if empty."""
    from conceptseg.data.readers import mask_to_box

    box = mask_to_box(mask)
    return list(box) if box is not None else None


def _render_row(out: Path, seed: int, cfg: ChestWorldConfig, i: int) -> dict:
    rng, findings, split = _row_spec(seed, i, cfg)
    chest = render_chest(rng, findings, cfg.size)
    stem = f"{i:05d}"
    rows = []
    for k, (f, m) in enumerate(zip(chest.findings, chest.masks)):
        name = f"masks/{stem}_f{k}.png"
        save_mask_png(out / name, m)
        rows.append({"finding": f.name, "word": FINDING_WORDS[f.name], "side": f.side, "size": f.size, "zone": f.zone,
                     "box": mask_box(m), "mask_file_name": name})
    union = np.logical_or.reduce(chest.masks) if chest.masks else np.zeros(chest.image.shape, bool)
    save_mask_png(out / f"masks/{stem}.png", union)
    record = {
        "file_name": f"images/{stem}.png",
        "mask_file_name": f"masks/{stem}.png",
        "caption": chest.report,
        "split": split,
        "classes": [f.name for f in chest.findings],
        "object_mask_file_names": [r["mask_file_name"] for r in rows],
        "findings": rows,
    }
    save_png(out / record["file_name"], chest.image)  # written last: its presence marks a complete row
    return record


def _row_done(out: Path, i: int) -> bool:
    return (out / f"images/{i:05d}.png").exists() and (out / "rows" / f"{i:05d}.json").exists()


def _render_and_keep(out: Path, seed: int, cfg: ChestWorldConfig, i: int) -> None:
    """Render row i; its record (rows/<i>.json, written last) marks it complete for a resumed run."""
    write_json(out / "rows" / f"{i:05d}.json", _render_row(out, seed, cfg, i))


def generate(out_dir: str | Path, num: int, seed: int = 0, config: ChestWorldConfig | None = None,
             progress: bool = True, workers: int = 1) -> Path:
    """Write ``num`` rows as an imagefolder dataset (``images/``, ``masks/``, ``metadata.jsonl``).

    Existing rows are not re-rendered (resume or extend with a larger ``num``, same seed and config).
    Rows render in ``workers`` processes; a row depends only on (seed, i, config), so the output does not.
    """


    cfg = config or ChestWorldConfig()
    unknown = set(cfg.findings) - set(FINDINGS)
    if unknown or not cfg.findings:
        raise ValueError(f"config.findings must be a non-empty subset of {FINDINGS}, got {cfg.findings}")
    if not 0 <= cfg.healthy_fraction <= 1 or not 0 <= cfg.test_fraction <= 1:
        raise ValueError("healthy_fraction and test_fraction must be between 0 and 1")
    out = Path(out_dir)
    missing = [i for i in range(num) if not _row_done(out, i)]
    render_rows(functools.partial(_render_and_keep, out, seed, cfg), missing, workers, "chest world", progress)
    lines = [json.dumps(json.loads((out / "rows" / f"{i:05d}.json").read_text())) + "\n" for i in range(num)]
    write_text(out / "metadata.jsonl", "".join(lines))
    return out
