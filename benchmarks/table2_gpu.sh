#!/usr/bin/env bash
# Table 2 over 2 toy-world seeds x 3 segmenter seeds at larger settings, on one GPU: sized for about
# ten minutes of an H100/H200 (an estimate from the toy model's GPU speeds in docs/toy_model.md; this
# script has not run yet). Every stage resumes, so a second call after a time limit picks up where the
# first stopped. Run folders land in runs/table2/, the JSON in $OUT (or benchmarks/results).
#
#   bash benchmarks/table2_gpu.sh              # larger settings (below)
#   FULL=1 bash benchmarks/table2_gpu.sh       # the paper's settings (demo --full): longer than ten minutes
#
# The GPU machine has torch but not diffusers: put diffusers' wheel in wheels/ first (gpu_env.sh).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"  # repository root, diffusers, PYTHONPATH, $device, $out
if [ -n "${FULL:-}" ]; then
  python benchmarks/table2.py --full --device "$device" --json "$out/table2-full-$device.json"
else
  # 5x the demo's images, 5x its fine-tuning, 8x its synthetic set, 10x its segmenter steps
  python benchmarks/table2.py --device "$device" --out runs/table2/large --num-images 2000 \
    --set finetune.steps=1500 --set synth.num=512 --set segmenter.steps=3000 --set segmenter.batch_size=32 \
    --json "$out/table2-large-$device.json"
fi
