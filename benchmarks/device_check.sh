#!/usr/bin/env bash
# kfor1 on a GPU machine, in under 8 minutes on one H200 (issue 15, "Accelerators"):
#   1. benchmarks/device/check.py: JAX runs on the accelerator, the CPU-only paths are off, a
#      K-task step equals K single-task steps (1e-5);
#   2. benchmarks/suite/grid.py against PyTorch CUDA (channels_last; AMP off and on: float32, then
#      bfloat16 compute with float32 parameters on both sides), at 224 px, batch 32 and 128, on
#      EfficientNet-Lite0 and MobileNetV2 1.0.
# Run from the repository root: bash benchmarks/device_check.sh [OUTDIR]. Results (logs and
# JSON) go to OUTDIR (default: $OUT where set, else /tmp/kfor1-device-check). Python packages
# the machine lacks (ml_collections, the packaged weights) can sit in ./.devsite, which is put
# on PYTHONPATH. Each stage has its own time limit, so one that hangs leaves the others' results.
set -uo pipefail
out=${1:-${OUT:-/tmp/kfor1-device-check}}
mkdir -p "$out"
if [ -d .devsite ]; then export PYTHONPATH="$PWD/.devsite${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
python=${PYTHON:-python3}
status=0
stage() {  # stage NAME SECONDS COMMAND...: runs it with a limit, its output in OUTDIR/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 \
  | tee "$out/nvidia-smi.log"
stage device_check 120 "$python" -m benchmarks.device.check --json "$out/device_check.json"
grid=(--model efficientnet_lite0,mobilenet_v2 --resolution 224 --repeats 7 --pause 0.1)
stage suite_fp32 200 "$python" -m benchmarks.suite "${grid[@]}" --batch 32,128 \
  --precision float32 --only patch_step,inference,full_step,k_tasks,flops --ks 1,2,4,8 \
  --json "$out/suite_fp32.json"
stage suite_bf16 120 "$python" -m benchmarks.suite "${grid[@]}" --batch 128 \
  --precision bfloat16 --only patch_step,inference,full_step,flops \
  --json "$out/suite_bf16.json"
exit $status
