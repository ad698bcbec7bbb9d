#!/usr/bin/env bash
# `curate train` against benchmarks/moe_speed.py at the same shape, interleaved in one call (#18's ratio).
#   bash benchmarks/trainer_speed/vs_benchmark.sh TOKENS OUT [ROUNDS]
# Both: a random-init SmolLM2-135M-shaped MoE (8 x 192, top-2, linear gate, cv2), bf16 autocast,
# blocks compiled, micro-batches of 64 x 512. The benchmark times its own steps on synthetic batches;
# `curate train` runs the product loop on TOKENS (a `curate tokenize` output made with SmolLM2's
# tokenizer) and its metrics.jsonl gives tokens/s per logged interval (median over steps >= 10).
# Writes OUT/bench-R.json, OUT/metrics-R.jsonl and OUT/vs_benchmark.json (the ratio per round).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
tokens=$(realpath "$1"); out=$(mkdir -p "$2" && realpath "$2"); rounds=${3:-2}
sed 's/gate: noisy-mlp/gate: linear/' "$here/model.yaml" > "$out/model-linear.yaml"
sed "s|tokens: ../../tokens|tokens: $tokens|; s|path: model.yaml|path: $out/model-linear.yaml|; s|max_steps: 40|max_steps: 60|" \
    "$here/train64.yaml" > "$out/train.yaml"
cd "$root"
for r in $(seq 1 "$rounds"); do
  python -W ignore::UserWarning benchmarks/moe_speed.py --preset smollm2 --batch 64 --seq 512 --variants moe-grouped \
      --no-layer --steps 30 --out "$out/bench-$r.json" > "$out/bench-$r.log" 2>&1
  rm -rf "$out/run-$r"
  python -W ignore::UserWarning -m pipeline.cli train --config "$out/train.yaml" --out "$out/run-$r" > "$out/train-$r.log" 2>&1
  cp "$out/run-$r/metrics.jsonl" "$out/metrics-$r.jsonl"
  rm -rf "$out/run-$r"    # checkpoints and TensorBoard files: too many to bring back from the device
done
python - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, rounds + 1):
    bench = json.load(open(f"{out}/bench-{r}.json"))["model"]["moe-grouped"]["tokens_per_s"]
    m = [json.loads(l) for l in open(f"{out}/metrics-{r}.jsonl")]
    train = statistics.median(x["tokens_per_s"] for x in m if x["step"] >= 10)
    rows.append({"round": r, "benchmark": bench, "curate_train": train, "ratio": train / bench})
    print(f"round {r}: benchmark {bench:,.0f} tokens/s, curate train {train:,.0f} -> {train / bench:.3f}x")
json.dump(rows, open(f"{out}/vs_benchmark.json", "w"), indent=1)
PY
