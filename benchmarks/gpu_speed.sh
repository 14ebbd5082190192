#!/usr/bin/env bash
# One GPU session's measurement of every fast path (benchmarks/speed_paths.py): the SD 1.5
# architecture with random weights, bf16, 512 px, 4 images x T0=40; stage 1 eager at batch 40
# (today), 80 and 160, channels_last, torch.compile default and reduce-overhead (CUDA graphs) with
# channels_last, and compiled against eager in fp32; the GMM on 16 maps of 64x64 and 512x512;
# train-seg and segment with 0 and 8 workers. Planned for under 8 minutes on one H100/H200 (three
# inductor compilations of the UNet are most of it); the JSON is rewritten after each measurement,
# so a run cut short keeps what it measured.
#
#   bash benchmarks/gpu_speed.sh                      # writes $OUT (or benchmarks/results)/speed_paths-cuda.{json,log}
#   bash benchmarks/gpu_speed.sh --parts prelim       # extra arguments go to speed_paths.py
#
# The GPU machine has torch but not diffusers: put diffusers' wheel in wheels/ first (gpu_env.sh).
#
# The same script on a CPU at a tiny size (proof that it runs; numbers meaningless):
#   DEVICE=cpu bash benchmarks/gpu_speed.sh --preset tiny --images 1 --steps 4 --batch-sizes 4 8 \
#       --compile-modes default --compile-backend aot_eager --gmm-maps 2 --gmm-size 64 --seg-steps 2 --seg-images 8 --workers 2
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"  # repository root, diffusers, PYTHONPATH, $device, $out
# segmenter and GMM first (about 2 min), then stage 1 with its compilations
python benchmarks/speed_paths.py --device "$device" --parts gmm segmenter prelim \
    --json "$out/speed_paths-$device.json" "$@" 2>&1 | tee "$out/speed_paths-$device.log"
