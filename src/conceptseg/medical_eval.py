"""Scoring stage 1 on chest radiographs the way the paper does for MS-CXR (METHOD.md §6), and the
localisation measures other MS-CXR work publishes.

For every (image, finding) case: stage 1 with the finding's word, and the pixel-wise AUC-ROC of the
RAW map (no threshold) against the union of that finding's boxes, at the original image size. Per
finding the AUC is the mean over its cases; the headline is the mean over findings (the paper:
79.6 over MS-CXR's eight). The same raw map, against the same union of boxes, also gives

- the contrast-to-noise ratio (BioViL's definition, Boecking et al. 2022):
  CNR = |mean inside - mean outside| / sqrt(var inside + var outside), per case; BioViL reports
  1.07 zero-shot, BioViL-T 1.33;
- the pointing game: a hit when the map's maximum lies inside a box (RadZero reports 0.844),

both averaged like the AUC: over a finding's cases, then over findings. Beside them, for reference:

- a centre prior (a fixed map, highest in the image's centre): AUC, CNR, pointing game;
- a wrong finding's word: the map of a finding the image does NOT have (in the chest world, the
  one its report usually negates: "No pneumothorax.") scored against the finding it has, so a
  word that lights up whatever is abnormal, or what its negation sits next to, shows up here;
- M_pre: the map thresholded with a k-component GMM (k = 3 by default: background, chest, lesion)
  and the orphan filter; its IoU against the boxes per case, averaged over cases and findings (the
  mIoU published for MS-CXR), and its IoU pooled over the finding's cases against the exact masks
  where the dataset has them (the chest world), against the boxes otherwise;
- negation, measured: the mean of the word's raw map over images WITHOUT the finding whose report
  negates it (and that show another finding), against its mean over healthy images (`negation`).

Comparable in definition (not in data) to published numbers: AUC against boxes, CNR, pointing
game, mIoU of M_pre against boxes. Only ours: AUC against exact masks, pooled IoU, wrong word,
negation.

Prompts (`prompt`): "photo" (the default) is stage 1's own prompt y_f = "a photo of a {finding}"
(METHOD.md §1; §6: "step 1 with the disease word"); "finding" uses the finding's name alone
("pleural effusion"), which puts the word right after the start token, where no report ever has a
finding's word (a shallow text encoder's keys depend on the position: docs/medical.md measures it);
"phrase" the case's own phrase (the chest world's "moderate right pleural effusion", MS-CXR's
label_text). The map is always the word's (`FindingCase.word`, e.g. "effusion"). A phrase without
the word falls back to the finding's name.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from conceptseg.data.medical import FindingCase, ReportedImage, negates
from conceptseg.families.base import DiffusionModel
from conceptseg.geometry import image_size, load_mask_file, load_rgb
from conceptseg.metrics import PooledCounts, auc_roc
from conceptseg.prelim import PrelimConfig, PrelimRunner
from conceptseg.toy_eval import _centre_prior

PROMPTS = ("finding", "phrase", "photo")


@dataclass
class FindingEvalConfig:
    prompt: str = "photo"  # one of PROMPTS; "photo": stage 1's y_f, "a photo of a {finding}"
    steps: int = 40  # T0 of stage 1
    batch_size: int = 40
    gmm_components: int = 3  # M_pre on chest images: background, chest, lesion
    per_finding: int | None = None  # at most this many cases per finding (the first ones), None: all
    wrong_word: bool = True
    negation: bool = True  # the negation measure, where the dataset has healthy images with reports
    negation_images: int | None = None  # at most this many images per group and finding; None: per_finding's cap
    seed: int = 0

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")


def boxes_mask(boxes, size: tuple[int, int], boxes_refer_to: tuple[int, int] | None = None) -> np.ndarray:
    """The union of inclusive (x0, y0, x1, y1) boxes as a bool HxW mask of `size` = (width, height);
    boxes given for an image of size `boxes_refer_to` are scaled to `size` first."""
    w, h = size
    sx, sy = (w / boxes_refer_to[0], h / boxes_refer_to[1]) if boxes_refer_to else (1.0, 1.0)
    mask = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {(x0, y0, x1, y1)} has x1 < x0 or y1 < y0")
        c0, r0 = max(0, int(np.floor(x0 * sx))), max(0, int(np.floor(y0 * sy)))
        c1, r1 = min(w, int(np.ceil((x1 + 1) * sx))), min(h, int(np.ceil((y1 + 1) * sy)))
        mask[r0:r1, c0:c1] = True
    return mask


def prompt_for(case: FindingCase, mode: str, finding: str | None = None, word: str | None = None) -> tuple[str, str]:
    """(prompt, word) for a case; `finding`/`word` replace the case's own (the wrong-word baseline)."""
    finding, word = finding or case.finding, word or case.word
    if mode == "photo":
        return f"a photo of a {finding}", word
    phrase = case.phrase.lower()
    if mode == "phrase" and finding != case.finding and case.finding in phrase:
        phrase = phrase.replace(case.finding, finding)  # the same phrase, another finding: "moderate right pneumothorax"
    if mode == "phrase" and word.lower() in phrase.split():
        return (case.phrase if finding == case.finding else phrase), word
    return finding, word


def wrong_finding(case: FindingCase, findings: list[str]) -> str | None:
    """The next finding after the case's own (in `findings` order, cyclic) that the image does not have."""
    if case.finding not in findings:
        return None
    k = findings.index(case.finding)
    for f in findings[k + 1 :] + findings[:k]:
        if f != case.finding and f not in case.other_findings:
            return f
    return None


def select_cases(cases: list[FindingCase], per_finding: int | None) -> list[FindingCase]:
    count: dict[str, int] = defaultdict(int)
    out = []
    for c in cases:
        if per_finding is None or count[c.finding] < per_finding:
            out.append(c)
            count[c.finding] += 1
    return out


@dataclass
class _Truth:
    boxes: np.ndarray  # bool HxW at the original size
    mask: np.ndarray | None  # exact mask, where known


def _truth(case: FindingCase) -> _Truth:
    size = image_size(case.image)
    mask = None
    if case.masks:
        mask = np.logical_or.reduce([load_mask_file(m) for m in case.masks])
        if mask.shape != (size[1], size[0]):
            raise ValueError(f"{case.masks[0]}: mask is {mask.shape[1]}x{mask.shape[0]} but {case.image} is {size[0]}x{size[1]}")
    return _Truth(boxes_mask(case.boxes, size, case.image_size), mask)


def _maps(model: DiffusionModel, cases: list[FindingCase | ReportedImage], prompts: list[tuple[str, str]],
          cfg: FindingEvalConfig, progress: bool, desc: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(raw map at the original size, M_pre at the original size) per case (or image), stage 1 as
    `prelim` runs it; cases sharing a prompt share UNet batches."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(cases)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    per_batch = max(1, cfg.batch_size // cfg.steps)
    bar = tqdm(total=len(cases), desc=desc, disable=not progress, leave=False)
    for (prompt, word), idx in groups.items():
        runner = PrelimRunner(model, PrelimConfig(word, prompt=prompt, steps=cfg.steps, batch_size=cfg.batch_size,
                                                  seed=cfg.seed, gmm_components=cfg.gmm_components))
        for s in range(0, len(idx), per_batch):
            chunk = idx[s : s + per_batch]
            results = runner([load_rgb(cases[i].image) for i in chunk], [cases[i].key for i in chunk])
            for i, r in zip(chunk, results):
                out[i] = (r.canvas.restore(r.attention), r.mask)
            bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]


def _mean(values) -> float:
    values = [v for v in values if v == v]  # NaN (an undefined measure, e.g. a box covering the whole image) is left out
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------- the measures, per case


def cnr(amap: np.ndarray, region: np.ndarray) -> float:
    """Contrast-to-noise ratio (BioViL, Boecking et al. 2022) of a raw map: |mean inside - mean
    outside| / sqrt(var inside + var outside), population variances. Invariant to an affine rescale
    a * map + b (a != 0): both the difference of means and the deviations scale by |a|, so raw
    attention, a min-max normalised map and BioViL's cosine similarities are scored alike. NaN when
    the region or its outside is empty, or the map is constant on both (undefined)."""
    region = np.asarray(region, dtype=bool)
    amap = np.asarray(amap, dtype=np.float64)
    if region.all() or not region.any():
        return float("nan")
    inside, outside = amap[region], amap[~region]
    noise = np.sqrt(inside.var() + outside.var())
    return float(abs(inside.mean() - outside.mean()) / noise) if noise > 0 else float("nan")


def pointing_hit(amap: np.ndarray, region: np.ndarray) -> float:
    """The pointing game for one case: 1.0 when the map's maximum lies inside the region (the union of
    the finding's boxes), else 0.0. Ties count as a hit when any maximal pixel is inside: the
    restored map is constant over each attention cell, so its maximum is a block of pixels."""
    amap = np.asarray(amap)
    return float(np.asarray(region, dtype=bool)[amap == amap.max()].any())


def case_iou(pred: np.ndarray, region: np.ndarray) -> float:
    """Foreground IoU of one binary mask against one region (`metrics.PooledCounts` on one case)."""
    counts = PooledCounts()
    counts.add(pred, region)
    return counts.iou


def _case_scores(amap: np.ndarray, mpre: np.ndarray, t: _Truth) -> dict[str, float]:
    """Every per-case measure of a raw map and its M_pre against the boxes (and the exact mask)."""
    scores = {"auc": auc_roc(amap, t.boxes), "cnr": cnr(amap, t.boxes), "pointing_game": pointing_hit(amap, t.boxes),
              "prelim_miou_boxes": case_iou(mpre, t.boxes)}
    if t.mask is not None:
        scores["auc_mask"] = auc_roc(amap, t.mask)
    return scores


# ---------------------------------------------------------------- per finding, per model

PER_CASE = ("auc", "auc_mask", "cnr", "pointing_game", "prelim_miou_boxes", "wrong_word_auc")
OPTIONAL = ("auc_mask", "wrong_word_auc")  # only where the dataset has exact masks / the baseline ran


def _table(per: dict[str, dict[str, list]], counts: dict[str, PooledCounts]) -> dict:
    """Per-finding rows (means over the finding's cases) and their means over findings."""
    table = {}
    for f in sorted(per):
        row: dict = {"cases": len(per[f]["auc"])}
        row.update({k: _mean(per[f][k]) for k in PER_CASE if per[f][k]})
        if f in counts:
            row["prelim_iou"] = counts[f].iou
        table[f] = row
    summary = {}
    for k in (*PER_CASE, "prelim_iou"):
        if table and all(k in r for r in table.values()):
            summary[f"mean_{k}"] = _mean([r[k] for r in table.values()])
    return {"per_finding": table, **summary}


def evaluate_model(model: DiffusionModel, cases: list[FindingCase], cfg: FindingEvalConfig, progress: bool = True,
                   truths: list[_Truth] | None = None) -> dict:
    """Per-finding AUC, CNR and pointing game of the raw map against the boxes (AUC also against the
    exact masks, where known), M_pre IoU, and the wrong-word AUC; means over findings."""
    truths = truths or [_truth(c) for c in cases]
    findings = sorted({c.finding for c in cases})
    prompts = [prompt_for(c, cfg.prompt) for c in cases]
    maps = _maps(model, cases, prompts, cfg, progress, f"stage 1 {model.source[-30:]}")
    per: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, PooledCounts] = defaultdict(PooledCounts)
    for c, t, (amap, mpre) in zip(cases, truths, maps):
        for k, v in _case_scores(amap, mpre, t).items():
            per[c.finding][k].append(v)
        counts[c.finding].add(mpre, t.mask if t.mask is not None else t.boxes)
    if cfg.wrong_word:
        wrong = [(i, wrong_finding(c, findings)) for i, c in enumerate(cases)]
        wrong = [(i, f) for i, f in wrong if f is not None]
        word_of = {c.finding: c.word for c in cases}
        sub = [cases[i] for i, _ in wrong]
        wmaps = _maps(model, sub, [prompt_for(cases[i], cfg.prompt, f, word_of[f]) for i, f in wrong], cfg, progress,
                      "stage 1, wrong word")
        for (i, f), (amap, _) in zip(wrong, wmaps):
            per[cases[i].finding]["wrong_word_auc"].append(auc_roc(amap, truths[i].boxes))
    return _table(per, counts)


def centre_prior(cases: list[FindingCase], truths: list[_Truth]) -> dict:
    """The reference rows: AUC, CNR and pointing game of a fixed map highest in the image's centre."""
    per: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for c, t in zip(cases, truths):
        prior = _centre_prior(t.boxes.shape)
        per[c.finding]["auc"].append(auc_roc(prior, t.boxes))
        per[c.finding]["cnr"].append(cnr(prior, t.boxes))
        per[c.finding]["pointing_game"].append(pointing_hit(prior, t.boxes))
    return _table(per, {})


# ---------------------------------------------------------------- negation


NO_REPORTS = ("the dataset has no healthy images with reports (MS-CXR: every image has a finding, and its csv "
              "holds the boxes' phrases, not reports)")


def negation_groups(images: list[ReportedImage] | None, words: dict[str, str], cap: int | None) -> dict | str:
    """Per finding f: (a) images without f whose report negates f's word and that show another
    finding, (b) healthy images (no finding); the first `cap` of each. A string (why) when the
    dataset cannot provide (b)."""
    if images is None:
        return NO_REPORTS
    healthy = [im for im in images if not im.findings][:cap]
    if not healthy:
        return "no healthy images in the split"
    return {f: ([im for im in images if im.findings and f not in im.findings and negates(im.report, w)][:cap], healthy)
            for f, w in sorted(words.items())}


def negation_row(negated: list[np.ndarray], healthy: list[np.ndarray]) -> dict:
    """Means over images of each map's pixel mean, for (a) negated and (b) healthy images, and a / b:
    above 1, the word lights up more where its finding is negated beside another than on healthy images."""
    a, b = _mean([float(m.mean()) for m in negated]), _mean([float(m.mean()) for m in healthy])
    return {"negated_images": len(negated), "healthy_images": len(healthy), "mean_negated": a, "mean_healthy": b,
            "ratio": a / b if b > 0 else float("nan")}


def evaluate_negation(model: DiffusionModel, groups: dict | str, words: dict[str, str], cfg: FindingEvalConfig,
                      progress: bool = True) -> dict:
    """The negation measure of one model. The map is stage 1's raw map (`PrelimResult.attention`):
    the word's cross-attention PROBABILITY (softmax over the prompt's tokens), averaged over heads,
    layers and timesteps and never normalised per image, so its mean over an image's pixels compares
    across images. The prompt is the finding's name ("a photo of a ..." with prompt "photo"): the
    case's phrase does not exist for an image without the finding."""
    if isinstance(groups, str):
        return {"absent": groups}
    table = {}
    for f, (negated, healthy) in groups.items():
        prompt = (f"a photo of a {f}" if cfg.prompt == "photo" else f, words[f])
        maps = _maps(model, negated + healthy, [prompt] * (len(negated) + len(healthy)), cfg, progress, f"negation {f}")
        amaps = [amap for amap, _ in maps]
        table[f] = negation_row(amaps[: len(negated)], amaps[len(negated) :])
    return {"prompt": cfg.prompt if cfg.prompt == "photo" else "finding", "per_finding": table,
            "lit_up": [f for f, r in table.items() if r["ratio"] > 1]}


def evaluate_findings(models: dict[str, DiffusionModel], cases: list[FindingCase], cfg: FindingEvalConfig,
                      progress: bool = True, images: list[ReportedImage] | None = None) -> dict:
    """The report of `conceptseg evaluate-findings`: each model's table and the centre prior; with
    `cfg.negation`, each model's negation measure on `images` (the split's images with their
    reports, `data.medical.read_reported_images`; None: reported absent)."""
    if not cases:
        raise ValueError("no finding cases to evaluate (is the split empty?)")
    cases = select_cases(cases, cfg.per_finding)
    truths = [_truth(c) for c in cases]
    report = {"config": asdict(cfg), "cases": len(cases), "centre_prior": centre_prior(cases, truths), "models": {}}
    words = {c.finding: c.word for c in cases}
    groups = negation_groups(images, words, cfg.negation_images or cfg.per_finding) if cfg.negation else None
    for name, model in models.items():
        report["models"][name] = evaluate_model(model, cases, cfg, progress, truths)
        if groups is not None:
            report["models"][name]["negation"] = evaluate_negation(model, groups, words, cfg, progress)
    return report


# ---------------------------------------------------------------- tables

COMPARABLE = ("Comparable in definition (not in data) to published MS-CXR numbers: AUC against boxes (the paper: "
              "79.6, 0.796 here), CNR (BioViL 1.07 zero-shot, BioViL-T 1.33), pointing game (RadZero 0.844), mIoU of M_pre "
              "against boxes. Only ours: AUC against exact masks, pooled IoU against masks, wrong word, negation.")


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def _short(name: str) -> str:
    parts = Path(name).parts
    return "/".join(parts[-3:-1]) if len(parts) > 2 and parts[-1] == "model" else (Path(name).name or name)


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def _measure_table(report: dict, prior_keys: tuple[str, ...], model_keys: tuple[tuple[str, str], ...]) -> str:
    """One row per finding and a mean row: the centre prior's `prior_keys`, then each model's
    (column label, key) pairs."""
    names, cp = list(report["models"]), report["centre_prior"]
    labels = {"auc": "AUC", "cnr": "CNR", "pointing_game": "pointing"}
    head = ["finding", "cases"] + [f"centre prior {labels[k]}" if len(prior_keys) > 1 else "centre prior" for k in prior_keys]
    head += [f"{label} {_short(n)}" for n in names for label, _ in model_keys]
    rows = []
    for f, row in cp["per_finding"].items():
        cells = [f, str(row["cases"])] + [_fmt(row.get(k)) for k in prior_keys]
        rows.append(cells + [_fmt(report["models"][n]["per_finding"][f].get(k)) for n in names for _, k in model_keys])
    cells = ["**mean**", str(report["cases"])] + [_fmt(cp.get(f"mean_{k}")) for k in prior_keys]
    rows.append(cells + [_fmt(report["models"][n].get(f"mean_{k}")) for n in names for _, k in model_keys])
    return _markdown(head, rows)


def _negation_table(report: dict) -> str:
    """Per model and finding: the word's mean map on negated and on healthy images, and their ratio."""
    lines = []
    for n, m in report["models"].items():
        neg = m.get("negation")
        if neg is None:
            continue
        if "absent" in neg:
            lines.append(f"negation, {_short(n)}: absent ({neg['absent']})")
            continue
        rows = [[f, str(r["negated_images"]), str(r["healthy_images"]), _fmt(r["mean_negated"], ".4g"), _fmt(r["mean_healthy"], ".4g"),
                 _fmt(r["ratio"])] for f, r in neg["per_finding"].items()]
        lines.append(f"negation, {_short(n)}: the word's mean raw map on images whose report negates it (and that show "
                     f"another finding) against healthy images; ratio > 1: it lights up more there\n\n"
                     + _markdown(["finding", "negated images", "healthy images", "mean negated", "mean healthy", "ratio"], rows))
    return "\n\n".join(lines)


def format_table(report: dict) -> str:
    """Markdown: the AUC table (centre prior, then per model AUC, wrong word, pooled M_pre IoU), the
    localisation table (CNR, pointing game, mIoU of M_pre against boxes), the negation tables, and
    which columns compare with published numbers."""
    auc = _measure_table(report, ("auc",), (("AUC", "auc"), ("wrong word", "wrong_word_auc"), ("IoU M_pre", "prelim_iou")))
    loc = _measure_table(report, ("cnr", "pointing_game"),
                         (("CNR", "cnr"), ("pointing", "pointing_game"), ("mIoU M_pre boxes", "prelim_miou_boxes")))
    parts = [auc, loc, _negation_table(report), COMPARABLE]
    return "\n\n".join(p for p in parts if p)
