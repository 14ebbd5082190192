"""Stage-1 quality of a chest `train-t2i` run over its checkpoints: the curve in docs/medical.md.

For the base model (step 0) and every complete checkpoint of RUN (its EMA weights,
`train_t2i.checkpoint_model`), the per-finding AUC of the raw map of the finding's word (prompt =
the finding's name) against the boxes, on the first PER_FINDING held-out cases of each finding of
DATA (`conceptseg evaluate-findings`' protocol, no wrong word, no negation). Points already
measured are read back from the JSON, so the script can be re-run while training goes on.

    python benchmarks/chest_curve.py --run runs/chest_ft --data runs/chest_data \\
        --json docs/medical_curve.json --per-finding 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(run: Path, data: Path, out_json: Path, per_finding: int, device: str | None, every: int) -> dict:
    from conceptseg.data.medical import read_finding_cases
    from conceptseg.io import write_json
    from conceptseg.medical_eval import FindingEvalConfig, evaluate_findings
    from conceptseg.models import load_model
    from conceptseg.train_t2i import checkpoint_model
    from conceptseg.training import complete_checkpoints

    curve = json.loads(out_json.read_text()) if out_json.exists() else {}
    cases = read_finding_cases(f"chest:{data}", "test")
    cfg = FindingEvalConfig(per_finding=per_finding, wrong_word=False, negation=False)
    base = json.loads((run / "train_config.json").read_text())["base_model"]
    points = [(0, None)] + [(int(c.name[5:]), c) for c in complete_checkpoints(run) if int(c.name[5:]) % every == 0]
    for step, ckpt in points:
        if str(step) in curve:
            continue
        start = time.perf_counter()
        model = load_model(base, device=device) if ckpt is None else checkpoint_model(run, ckpt, device=device)
        r = evaluate_findings({"m": model}, cases, cfg, progress=False)["models"]["m"]
        curve[str(step)] = {"mean_auc": r["mean_auc"], "mean_cnr": r["mean_cnr"], "mean_pointing_game": r["mean_pointing_game"],
                            "auc": {f: row["auc"] for f, row in r["per_finding"].items()},
                            "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps({"step": step, **curve[str(step)]}), flush=True)
        write_json(out_json, dict(sorted(curve.items(), key=lambda kv: int(kv[0]))))
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="train-t2i OUT folder (train_config.json, checkpoints/)")
    p.add_argument("--data", type=Path, required=True, help="the chest world the run trained on (its test split is scored)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--per-finding", type=int, default=5)
    p.add_argument("--every", type=int, default=1, help="only checkpoints whose step is a multiple of this")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    measure(args.run, args.data, args.json, args.per_finding, args.device, args.every)


if __name__ == "__main__":
    main()
