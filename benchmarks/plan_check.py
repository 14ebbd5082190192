"""`conceptseg plan` against a measurement: the embedded toy model's fine-tune on the CPU.

A fine-tune of the embedded model (fp32, 2 steps, a fresh process per batch size) on random
images: the growth of its peak resident set size against `plan`'s finetune prediction for the
same settings on the CPU. Prints a table and writes JSON.

    python benchmarks/plan_check.py --batch-sizes 4 16 --json benchmarks/results/plan_check-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
from datetime import date
from pathlib import Path

MEASURE = textwrap.dedent("""
    import json, os, resource, sys
    from pathlib import Path
    import numpy as np, torch
    from PIL import Image
    import accelerate, diffusers.training_utils  # library code loaded before the baseline
    from conceptseg.finetune import FinetuneConfig, finetune

    work, batch = Path(sys.argv[1]), int(sys.argv[2])
    (work / "images").mkdir(parents=True); (work / "prelim" / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(work / "images" / f"{i}.png")
        mask = np.zeros((64, 64), np.uint8); mask[16:48, 16:48] = 255
        Image.fromarray(mask).save(work / "prelim" / "masks" / f"{i}.png")
    torch.set_num_threads(1)
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    finetune(FinetuneConfig("fish", images=work / "images", prelim=work / "prelim", out=work / "out", steps=2,
                            batch_size=batch, checkpoint_every=1000, progress=False))
    print(json.dumps({"growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before}))
""")


def measure(batch: int) -> dict:
    from conceptseg.pipeline import load_config
    from conceptseg.plan import plan_run

    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-c", MEASURE, str(Path(tmp) / "w"), str(batch)], capture_output=True,
                             text=True, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])["growth"]
    cfg = load_config(None, ["concept=fish", "images=x", "device=cpu", f"finetune.batch_size={batch}"])
    predicted = plan_run(cfg).stages["finetune"].memory
    return {"batch_size": batch, "measured_mib": round(measured / 2**20, 1), "predicted_mib": round(predicted / 2**20, 1),
            "ratio": round(measured / predicted, 2)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    rows = [measure(b) for b in a.batch_sizes]
    print("| batch | measured peak RSS growth (MiB) | predicted (MiB) | measured / predicted |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['measured_mib']} | {r['predicted_mib']} | {r['ratio']} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                                      "command": "python benchmarks/plan_check.py " + " ".join(argv or sys.argv[1:]),
                                      "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
