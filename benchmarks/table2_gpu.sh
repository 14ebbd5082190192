#!/usr/bin/env bash
# Table 2 over 2 toy-world seeds x 3 segmenter seeds at larger settings, on one GPU: sized for about
# ten minutes of an H100/H200 (an estimate from the toy model's GPU speeds in docs/toy_model.md; this
# script has not run yet). Every stage resumes, so a second call after a time limit picks up where the
# first stopped. Run from the repository root; results land in benchmarks/results/ and, on the
# project's device machine, in $OUT.
#
#   bash benchmarks/table2_gpu.sh              # larger settings (below)
#   FULL=1 bash benchmarks/table2_gpu.sh       # the paper's settings (demo --full): longer than ten minutes
set -euo pipefail
# the device machine has torch but not diffusers: install it from wheels brought along (pip download
# diffusers==0.42.1 --no-deps -d wheels), without touching torch
python -c "import diffusers" 2>/dev/null || pip install -q --no-deps --no-index --find-links "${WHEELS:-wheels}" diffusers
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "${FULL:-}" ]; then
  python benchmarks/table2.py --full --device cuda --json benchmarks/results/table2-full-cuda.json
  json=benchmarks/results/table2-full-cuda.json
else
  # 5x the demo's images, 5x its fine-tuning, 8x its synthetic set, 10x its segmenter steps
  python benchmarks/table2.py --device cuda --out runs/table2/large --num-images 2000 \
    --set finetune.steps=1500 --set synth.num=512 --set segmenter.steps=3000 --set segmenter.batch_size=32 \
    --json benchmarks/results/table2-large-cuda.json
  json=benchmarks/results/table2-large-cuda.json
fi
if [ -n "${OUT:-}" ]; then cp "$json" "$OUT/"; fi
