#!/usr/bin/env bash
# `curate train` throughput at two micro-batch sizes, same global batch (65,536 tokens), on one GPU.
#   bash benchmarks/trainer_speed/run.sh TOKENS OUT
# TOKENS: a `curate tokenize` output made with SmolLM2's tokenizer (vocab 49,152), e.g. the real sample:
#   curate filter ../shared/data/redpajama-sample --out f && curate tokenize f --tokenizer SmolLM2.gguf --out TOKENS
# The model is a random-init SmolLM2-135M-shaped MoE (model.yaml: 8 x 192, top-2, noisy gate).
# Writes OUT/metrics-<config>.jsonl and prints the median tokens/s over steps >= 10.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tokens=$(realpath "$1"); out=$(mkdir -p "$2" && realpath "$2")
for name in train train64; do
  sed "s|tokens: ../../tokens|tokens: $tokens|; s|path: model.yaml|path: $here/model.yaml|" "$here/$name.yaml" > "$out/$name.yaml"
  python -W ignore::UserWarning -m pipeline.cli train --config "$out/$name.yaml" --out "$out/run-$name" > "$out/$name.log" 2>&1
  cp "$out/run-$name/metrics.jsonl" "$out/metrics-$name.jsonl"
  python - "$out/metrics-$name.jsonl" "$name" <<'PY'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1])]
steady = [r["tokens_per_s"] for r in m if r["step"] >= 10]
print(sys.argv[2], "median tokens/s (steps >= 10):", round(statistics.median(steady)),
      "peak GB:", max(r["max_mem_gb"] or 0 for r in m))
PY
done
