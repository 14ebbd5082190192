#!/usr/bin/env bash
# The chest fine-tune of docs/medical.md at full length on one GPU: the embedded toy model (v1)
# fine-tuned on chest-world image-report pairs with 2 context layers added to its text encoder,
# the curve of mean AUC over its checkpoints, the scored table (base and fine-tuned, wrong word,
# negation) and the exported model. On a 2-core CPU this fine-tune runs about 0.6 s per step; on
# one H100/H200 it should take minutes (the UNet is tiny; decoding 16 PNGs per step is most of a step).
#
#   bash benchmarks/chest_gpu.sh          # writes $OUT (or benchmarks/results)/chest_{curve,findings}-cuda.json,
#                                         # chest_train-cuda.log and chest_model.tgz.part-* (the exported model folder)
#
# Sizes come from the environment: STEPS (16000), BATCH (16), NUM (12000 chest-world images),
# CONTEXT_LAYERS (2), PER_FINDING (15, the table), CURVE_PER_FINDING (5), EVERY (1000: checkpoint and
# curve spacing); DROP_NEGATED=1 trains on the reports without their sentences that negate one of the
# four findings (train-t2i --drop-negated; the last 3,000 steps of the shipped chest model). The GPU
# machine has torch but not diffusers: put diffusers' wheel in wheels/ first (gpu_env.sh).
#
# The same script on a CPU at a tiny size (proof that it runs; numbers meaningless):
#   DEVICE=cpu STEPS=4 EVERY=2 NUM=40 PER_FINDING=1 CURVE_PER_FINDING=1 bash benchmarks/chest_gpu.sh
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"  # repository root, diffusers, PYTHONPATH, $device, $out
work="${WORK:-/tmp/chest_gpu}"
steps="${STEPS:-16000}"
every="${EVERY:-1000}"
mkdir -p "$work"

python -m conceptseg toyworld --domain chest --out "$work/data" --num "${NUM:-12000}" --seed 0 --workers "$(nproc)"
# --device is not a train-t2i option: accelerate takes the GPU when there is one
python -m conceptseg train-t2i --data "$work/data" --out "$work/ft" --base-model embedded:toy-v1 \
    --batch-size "${BATCH:-16}" --lr 1e-3 --warmup-steps 100 --train-text-encoder --context-layers "${CONTEXT_LAYERS:-2}" \
    ${DROP_NEGATED:+--drop-negated consolidation --drop-negated effusion --drop-negated cardiomegaly --drop-negated pneumothorax} \
    --checkpoint-every "$every" --checkpoints-total-limit 0 --seed 0 --steps "$steps" \
    --sample-prompt "Large right pleural effusion. No pneumothorax." --sample-prompt "Marked cardiomegaly. No pleural effusion." \
    2>&1 | tr '\r' '\n' | grep -v "^train UNet" > "$out/chest_train-$device.log" || { tail -20 "$out/chest_train-$device.log"; exit 1; }
python benchmarks/chest_curve.py --run "$work/ft" --data "$work/data" --json "$out/chest_curve-$device.json" \
    --per-finding "${CURVE_PER_FINDING:-5}" --every "$every" --device "$device"
python -m conceptseg evaluate-findings --model embedded:toy-v1 "$work/ft/model" --device "$device" --dtype fp32 \
    --dataset "chest:$work/data" --per-finding "${PER_FINDING:-15}" --out "$out/chest_findings-$device.json"
# in parts under 15 MiB (the device's file limit); join with: cat chest_model.tgz.part-* | tar xz
tar czf - -C "$work/ft" model samples.png | split -b 15m - "$out/chest_model.tgz.part-"
ls -la "$out"
