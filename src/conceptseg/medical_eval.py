"""Scoring stage 1 on chest radiographs the way the paper does for MS-CXR (METHOD.md §6).

For every (image, finding) case: stage 1 with the finding's word, and the pixel-wise AUC-ROC of the
RAW map (no threshold) against the union of that finding's boxes, at the original image size. Per
finding the AUC is the mean over its cases; the headline is the mean over findings (the paper:
79.6 over MS-CXR's eight). Beside it, for reference:

- a centre prior (a fixed map, highest in the image's centre);
- a wrong finding's word: the map of a finding the image does NOT have (in the chest world, the
  one its report usually negates: "No pneumothorax.") scored against the finding it has, so a
  word that lights up whatever is abnormal, or what its negation sits next to, shows up here;
- M_pre: the map thresholded with a k-component GMM (k = 3 by default: background, chest, lesion)
  and the orphan filter, scored by IoU pooled over the finding's cases, against the exact masks
  where the dataset has them (the chest world) and against the boxes otherwise (MS-CXR).

Prompts (`prompt`): "finding" uses the finding's name as the prompt ("pleural effusion"),
"phrase" the case's own phrase (the chest world's "moderate right pleural effusion", MS-CXR's
label_text), "photo" the paper's template "a photo of a {finding}". The map is always the word's
(`FindingCase.word`, e.g. "effusion"). A phrase without the word falls back to the finding's name.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from conceptseg.data.medical import FindingCase
from conceptseg.geometry import image_size, load_mask_file, load_rgb
from conceptseg.metrics import PooledCounts, auc_roc
from conceptseg.models import DiffusionModel
from conceptseg.prelim import PrelimConfig, PrelimRunner
from conceptseg.toy_eval import _centre_prior

PROMPTS = ("finding", "phrase", "photo")


@dataclass
class FindingEvalConfig:
    prompt: str = "finding"  # one of PROMPTS
    steps: int = 40  # T0 of stage 1
    batch_size: int = 40
    gmm_components: int = 3  # M_pre on chest images: background, chest, lesion
    per_finding: int | None = None  # at most this many cases per finding (the first ones), None: all
    wrong_word: bool = True
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


def _maps(model: DiffusionModel, cases: list[FindingCase], prompts: list[tuple[str, str]], cfg: FindingEvalConfig,
          progress: bool, desc: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(raw map at the original size, M_pre at the original size) per case, stage 1 as `prelim` runs it;
    cases sharing a prompt share UNet batches."""
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
    values = [v for v in values if v == v]  # NaN (a box covering the whole image) is left out
    return float(np.mean(values)) if values else float("nan")


def evaluate_model(model: DiffusionModel, cases: list[FindingCase], cfg: FindingEvalConfig, progress: bool = True,
                   truths: list[_Truth] | None = None) -> dict:
    """Per-finding AUC of the raw map against the boxes (and the exact masks, where known), M_pre IoU,
    and the wrong-word AUC; means over findings."""
    truths = truths or [_truth(c) for c in cases]
    findings = sorted({c.finding for c in cases})
    prompts = [prompt_for(c, cfg.prompt) for c in cases]
    maps = _maps(model, cases, prompts, cfg, progress, f"stage 1 {model.source[-30:]}")
    per: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, PooledCounts] = defaultdict(PooledCounts)
    for c, t, (amap, mpre) in zip(cases, truths, maps):
        per[c.finding]["auc"].append(auc_roc(amap, t.boxes))
        if t.mask is not None:
            per[c.finding]["auc_mask"].append(auc_roc(amap, t.mask))
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
    table = {}
    for f in findings:
        row = {"cases": len(per[f]["auc"]), "auc": _mean(per[f]["auc"])}
        for k in ("auc_mask", "wrong_word_auc"):
            if per[f][k]:
                row[k] = _mean(per[f][k])
        row["prelim_iou"] = counts[f].iou
        table[f] = row
    summary = {"mean_auc": _mean([r["auc"] for r in table.values()]),
               "mean_prelim_iou": _mean([r["prelim_iou"] for r in table.values()])}
    for k in ("auc_mask", "wrong_word_auc"):
        if all(k in r for r in table.values()):
            summary[f"mean_{k}"] = _mean([r[k] for r in table.values()])
    return {"per_finding": table, **summary}


def centre_prior(cases: list[FindingCase], truths: list[_Truth]) -> dict:
    per = defaultdict(list)
    for c, t in zip(cases, truths):
        per[c.finding].append(auc_roc(_centre_prior(t.boxes.shape), t.boxes))
    table = {f: {"cases": len(v), "auc": _mean(v)} for f, v in sorted(per.items())}
    return {"per_finding": table, "mean_auc": _mean([r["auc"] for r in table.values()])}


def evaluate_findings(models: dict[str, DiffusionModel], cases: list[FindingCase], cfg: FindingEvalConfig,
                      progress: bool = True) -> dict:
    """The report of `conceptseg evaluate-findings`: each model's table and the centre prior."""
    if not cases:
        raise ValueError("no finding cases to evaluate (is the split empty?)")
    cases = select_cases(cases, cfg.per_finding)
    truths = [_truth(c) for c in cases]
    report = {"config": asdict(cfg), "cases": len(cases), "centre_prior": centre_prior(cases, truths), "models": {}}
    for name, model in models.items():
        report["models"][name] = evaluate_model(model, cases, cfg, progress, truths)
    return report


def format_table(report: dict) -> str:
    """Markdown: one row per finding; centre prior, then per model AUC, wrong word, M_pre IoU."""
    names = list(report["models"])
    head = ["finding", "cases", "centre prior"]
    for n in names:
        parts = Path(n).parts
        short = "/".join(parts[-3:-1]) if len(parts) > 2 and parts[-1] == "model" else (Path(n).name or n)
        head += [f"AUC {short}", f"wrong word {short}", f"IoU M_pre {short}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cp = report["centre_prior"]

    def fmt(x) -> str:
        return "-" if x is None or x != x else f"{x:.3f}"

    for f, row in cp["per_finding"].items():
        cells = [f, str(row["cases"]), fmt(row["auc"])]
        for n in names:
            r = report["models"][n]["per_finding"][f]
            cells += [fmt(r["auc"]), fmt(r.get("wrong_word_auc")), fmt(r["prelim_iou"])]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**mean**", str(report["cases"]), fmt(cp["mean_auc"])]
    for n in names:
        m = report["models"][n]
        cells += [fmt(m["mean_auc"]), fmt(m.get("mean_wrong_word_auc")), fmt(m["mean_prelim_iou"])]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
