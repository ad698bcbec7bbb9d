#!/usr/bin/env bash
# Second H200 call of issue #18 (short): is the SmolLM2 64 x 512 MoE step host-bound? The same three models with
# every block compiled in mode "reduce-overhead" (CUDA graphs: no per-kernel launches from the host), then the
# fused kernels' block-size sweep for whatever time is left.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout "${1:-50}" python3 benchmarks/moe_speed.py --preset smollm2 --batch 64 --seq 512 --steps 8 --warmup 3 --rounds 2 \
    --variants dense-matched,moe-grouped,moe-fused --no-layer --compile-mode reduce-overhead \
    --out "$OUT/smollm2_b64x512_cudagraphs.json" 2>&1 | grep -v -i -e "softmax" -e "split the reduction" -e "warnings.warn" \
    | tee "$OUT/smollm2_b64x512_cudagraphs.log" | grep -e "^\[" -e "x$" -e "rror"
timeout "${2:-18}" python3 benchmarks/fused_moe_configs.py --out "$OUT/fused_configs_d1024.json" 2>&1 | tail -20
