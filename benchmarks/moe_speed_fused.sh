#!/usr/bin/env bash
# The fused-experts measurement on the lent H200 (issue #18): the three target shapes, one process each,
# dense / fused / grouped models timed in interleaved rounds, profiled, checked against the loop.
# Usage (on the device, from the repository root): OUT=dir bash benchmarks/moe_speed_fused.sh [steps] [rounds]
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
STEPS=${1:-8}
ROUNDS=${2:-3}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
common=(--steps "$STEPS" --warmup 2 --rounds "$ROUNDS" --variants dense-matched,moe-fused,moe-grouped
        --layer-variants moe-fused,moe-loop --profile --profile-variants dense-matched,moe-fused,moe-grouped)
run() {  # name, time limit (s), extra args
    local name=$1 limit=$2; shift 2
    timeout "$limit" python3 benchmarks/moe_speed.py "${common[@]}" "$@" --out "$OUT/$name.json" 2>&1 \
        | grep -v -e "Online softmax" -e "split the reduction" -e "important use case" -e "softmax.$" -e "warnings.warn" \
        > "$OUT/$name.log"
    echo "== $name (exit $?)"; grep -e "^\[" -e "checks:" -e "x$" "$OUT/$name.log" | grep -v "^\[.*profile" | tail -20
}
run d1024_b16 ${LIMIT_D1024:-130} --batch 16 --seq 2048
run smollm2_b16 ${LIMIT_SMOL:-110} --preset smollm2 --batch 16 --seq 2048
run smollm2_b64x512 ${LIMIT_SMOL:-110} --preset smollm2 --batch 64 --seq 512
