"""`conceptseg medical CONFIG`: the paper's medical experiment (METHOD.md §6) from one YAML file.

1. Fine-tune a text-to-image model on image-report pairs (`train-t2i --base-model`, streamed):
   MIMIC-CXR-JPG for the paper (`configs/mscxr.yaml`), the chest world here (`configs/chest.yaml`).
2. Stage 1 with each finding's word on the evaluation cases (MS-CXR boxes, or the chest world's
   held-out images), scored by `medical_eval` (AUC, CNR, pointing game, M_pre IoU, negation) for the
   base model and the fine-tuned one, beside the centre prior and the wrong finding's word.
3. Optionally the curve: mean AUC of every fine-tuning checkpoint, on fewer cases.

Writes OUT/finetune (the train-t2i run), OUT/findings.json, OUT/curve.json and prints the tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conceptseg.config import apply_overrides, build_config, field_default
from conceptseg.io import write_json
from conceptseg.medical_eval import FindingEvalConfig, evaluate_findings, format_table
from conceptseg.train_t2i import TrainT2IConfig


@dataclass
class FinetuneT2ISection:
    """The `train-t2i` settings a medical config sets; their defaults (and meaning) are TrainT2IConfig's."""

    steps: int = field_default(TrainT2IConfig, "steps")
    batch_size: int = field_default(TrainT2IConfig, "batch_size")
    lr: float | None = field_default(TrainT2IConfig, "lr")
    warmup_steps: int = field_default(TrainT2IConfig, "warmup_steps")
    # a new word (a finding unknown to the base model) needs its token embedding trained: set it true
    train_text_encoder: bool | None = field_default(TrainT2IConfig, "train_text_encoder")
    context_layers: int = field_default(TrainT2IConfig, "context_layers")
    attention_layers: int = field_default(TrainT2IConfig, "attention_layers")
    drop_negated: list[str] | None = field_default(TrainT2IConfig, "drop_negated")
    checkpoint_every: int = field_default(TrainT2IConfig, "checkpoint_every")
    mixed_precision: str = field_default(TrainT2IConfig, "mixed_precision")
    seed: int = field_default(TrainT2IConfig, "seed")
    sample_prompts: list[str] = field_default(TrainT2IConfig, "sample_prompts")
    samples_per_prompt: int = field_default(TrainT2IConfig, "samples_per_prompt")


@dataclass
class EvaluateSection:
    prompt: str = FindingEvalConfig.prompt
    per_finding: int | None = None
    steps: int = 40  # T0
    batch_size: int = 40
    gmm_components: int = 3
    wrong_word: bool = True
    negation: bool = True  # the negation measure (needs healthy images with reports: the chest world, not MS-CXR)
    negation_images: int | None = None  # per group and finding; None: per_finding's cap
    curve_per_finding: int | None = 10  # cases per finding for the curve over checkpoints; None: no curve


@dataclass
class MedicalConfig:
    out: str
    eval_data: str  # "chest:ROOT" or "ms-cxr:ROOT,images=MIMIC_ROOT"
    train_data: str | None = None  # imagefolder or "mimic-cxr:ROOT"; None: evaluate `model` only
    base_model: str | None = None  # default: the embedded toy model
    model: str | None = None  # evaluate this model instead of fine-tuning one
    eval_split: str = "test"
    device: str | None = None
    dtype: str = "auto"
    finetune: FinetuneT2ISection = field(default_factory=FinetuneT2ISection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)


def load_medical_config(path: str | Path, overrides: list[str] = ()) -> MedicalConfig:
    """A MedicalConfig from YAML, then `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config {path} not found")
    try:
        data: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    data = apply_overrides(data, overrides)  # the same key.sub=value overrides as `conceptseg run`
    return build_config(MedicalConfig, data, str(path))


def _eval_config(e: EvaluateSection, per_finding: int | None, full: bool) -> FindingEvalConfig:
    """The scoring settings; not `full` (the curve): no wrong word and no negation measure."""
    return FindingEvalConfig(prompt=e.prompt, steps=e.steps, batch_size=e.batch_size, gmm_components=e.gmm_components,
                             per_finding=per_finding, wrong_word=full and e.wrong_word, negation=full and e.negation,
                             negation_images=e.negation_images)


def run_medical(cfg: MedicalConfig, progress: bool = True) -> dict:
    from conceptseg.data.medical import read_finding_cases, read_reported_images
    from conceptseg.models import load_model
    from conceptseg.train_t2i import checkpoint_model
    from conceptseg.training import last_checkpoint

    out = Path(cfg.out)
    cases = read_finding_cases(cfg.eval_data, cfg.eval_split)  # fail on a bad dataset before training
    images = read_reported_images(cfg.eval_data, cfg.eval_split)  # for the negation measure (None: MS-CXR)
    tuned = cfg.model
    if cfg.train_data is not None and tuned is None:
        from conceptseg.models import EMBEDDED_MODEL
        from conceptseg.train_t2i import train_t2i

        tuned = str(train_t2i(TrainT2IConfig(
            data=cfg.train_data, out=out / "finetune", preset=None, base_model=str(cfg.base_model or EMBEDDED_MODEL),
            checkpoints_total_limit=None if cfg.evaluate.curve_per_finding else 2,  # the curve reads every checkpoint
            progress=progress, **dataclasses.asdict(cfg.finetune))))
    names = {"base": cfg.base_model, "fine-tuned": tuned} if tuned else {"base": cfg.base_model}
    models = {n: load_model(m, device=cfg.device, dtype=cfg.dtype) for n, m in names.items()}
    e = cfg.evaluate
    report = evaluate_findings(models, cases, _eval_config(e, e.per_finding, True), progress, images)
    report["models_used"] = {n: str(m) if m else "embedded toy model" for n, m in names.items()}
    write_json(out / "findings.json", report)
    print(f"{cfg.eval_data} ({cfg.eval_split}): prompt {e.prompt}; M_pre with a {e.gmm_components}-component GMM\n"
          f"{format_table(report)}", flush=True)
    ft = out / "finetune"
    if e.curve_per_finding and (ft / "checkpoints").is_dir() and last_checkpoint(ft) is not None:
        curve = {"per_finding_cases": e.curve_per_finding, "points": []}
        ckpts = sorted((ft / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        base = report if e.per_finding == e.curve_per_finding else None
        first = evaluate_findings({"base": models["base"]}, cases, _eval_config(e, e.curve_per_finding, False), progress) \
            if base is None else base
        curve["points"].append({"step": 0, "mean_auc": first["models"]["base"]["mean_auc"],
                                "per_finding": {k: v["auc"] for k, v in first["models"]["base"]["per_finding"].items()}})
        for ckpt in ckpts:
            if not (ckpt / "state.json").exists():
                continue
            m = checkpoint_model(ft, ckpt, device=cfg.device, dtype=cfg.dtype)
            r = evaluate_findings({"m": m}, cases, _eval_config(e, e.curve_per_finding, False), progress)["models"]["m"]
            step = int(ckpt.name.split("-")[1])
            curve["points"].append({"step": step, "mean_auc": r["mean_auc"],
                                    "per_finding": {k: v["auc"] for k, v in r["per_finding"].items()}})
            print(f"step {step}: mean AUC {r['mean_auc']:.3f}", flush=True)
            write_json(out / "curve.json", curve)
        report["curve"] = curve
    return report
