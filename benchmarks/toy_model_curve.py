"""Stage-1 quality of a `train-t2i` run over its checkpoints: the curve in docs/toy_model.md.

For the base model (step 0, when the run fine-tunes one) and every complete checkpoint of OUT
(its EMA weights, `train_t2i.checkpoint_model`), `conceptseg eval-toy-model`'s measurements on a
fixed held-out subset of DATA: AUC of the class word's map and IoU of M_pre, class by lowest
denoising error, binding on fresh two-object scenes. Checkpoints already measured are read back
from the JSON, so the script can be re-run while training goes on.

    python benchmarks/toy_model_curve.py --run runs/toy_v2_t2i --data data/toy_v2 \\
        --json docs/toy_model_v2_eval_curve.json --per-class 10 --binding-scenes 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def measure(run: Path, data: Path, out_json: Path, per_class: int, binding_scenes: int, threads: int | None) -> dict:
    import torch

    from conceptseg.io import write_json
    from conceptseg.models import load_model
    from conceptseg.toy_eval import ToyEvalConfig, evaluate_toy_model
    from conceptseg.train_t2i import checkpoint_model
    from conceptseg.training import complete_checkpoints

    if threads:
        torch.set_num_threads(threads)
    curve = json.loads(out_json.read_text()) if out_json.exists() else {}
    cfg = ToyEvalConfig(per_class=per_class, binding_scenes=binding_scenes, parts=("localisation", "classify", "binding"))
    base = json.loads((run / "train_config.json").read_text()).get("base_model")
    points = ([(0, None)] if base else []) + [(int(c.name[5:]), c) for c in complete_checkpoints(run)]
    for step, ckpt in points:
        if str(step) in curve:
            continue
        model = load_model(base, device="cpu", dtype="fp32") if ckpt is None else checkpoint_model(run, ckpt, dtype="fp32")
        r = evaluate_toy_model(model, data, cfg, progress=False)
        curve[str(step)] = {"auc": r["correct_word"]["auc"], "prelim_iou": r["correct_word"]["prelim_iou"],
                            "class_by_denoising": r["class_by_denoising_accuracy"], "binding_auc": r["binding_auc"],
                            "images": r["images"], "binding_world": r["binding_world"]}
        print(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in curve[str(step)].items() if isinstance(v, float)), flush=True)
        write_json(out_json, dict(sorted(curve.items(), key=lambda kv: int(kv[0]))))
    return curve


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="train-t2i output folder (OUT)")
    p.add_argument("--data", type=Path, required=True, help="toy-world dataset with a test split")
    p.add_argument("--json", type=Path, required=True, help="the curve, read back and extended")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--binding-scenes", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    return measure(a.run, a.data, a.json, a.per_class, a.binding_scenes, a.threads)


if __name__ == "__main__":
    main()
