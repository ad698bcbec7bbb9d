#!/usr/bin/env bash
# `curate train` against benchmarks/moe_speed.py at the same shape, interleaved in one call (#18's ratio).
#   bash benchmarks/trainer_speed/vs_benchmark.sh TOKENS OUT [ROUNDS] [LR]
# Both: a random-init SmolLM2-135M-shaped MoE (8 x 192, top-2, linear gate, cv2), bf16 autocast,
# blocks compiled, micro-batches of 64 x 512. `curate train` runs the product loop on TOKENS (a `curate
# tokenize` output made with SmolLM2's tokenizer); its metrics.jsonl gives tokens/s per logged interval
# (median over steps >= 10). The benchmark times its own steps (median of 3 rounds of 20) on the first 8
# micro-batches the same stream draws from TOKENS (the ratio), and on uniform random tokens for reference:
# real text routes unevenly, which changes the expert GEMMs' speed.
# Writes OUT/bench-R.json, OUT/bench-random-R.json, OUT/metrics-R.jsonl and OUT/vs_benchmark.json (the ratios
# per round, their median, and the ratio of the medians). LR: curate train's peak learning rate (3e-4); at
# the benchmark's 1e-5 the routing stays where it starts in both, while at 3e-4 on real text the random-init
# model's routing collapses within the run (most experts under 1%), which changes the expert GEMMs' speed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
tokens=$(realpath "$1"); out=$(mkdir -p "$2" && realpath "$2"); rounds=${3:-4}; lr=${4:-3.0e-4}
sed 's/gate: noisy-mlp/gate: linear/' "$here/model.yaml" > "$out/model-linear.yaml"
sed "s|tokens: ../../tokens|tokens: $tokens|; s|path: model.yaml|path: $out/model-linear.yaml|; s|max_steps: 40|max_steps: 60|; s|lr: 3.0e-4|lr: $lr|" \
    "$here/train64.yaml" > "$out/train.yaml"
cd "$root"
bench() {   # ROUND: the benchmark on the micro-batches curate train draws from TOKENS, then on random tokens
  python -W ignore::UserWarning benchmarks/moe_speed.py --preset smollm2 --batch 64 --seq 512 --variants moe-grouped \
      --no-layer --steps 20 --rounds 3 --tokens "$tokens" --out "$out/bench-$1.json" > "$out/bench-$1.log" 2>&1
  python -W ignore::UserWarning benchmarks/moe_speed.py --preset smollm2 --batch 64 --seq 512 --variants moe-grouped \
      --no-layer --steps 20 --rounds 3 --out "$out/bench-random-$1.json" > "$out/bench-random-$1.log" 2>&1
}
curate_train() {
  rm -rf "$out/run-$1"
  python -W ignore::UserWarning -m pipeline.cli train --config "$out/train.yaml" --out "$out/run-$1" > "$out/train-$1.log" 2>&1
  cp "$out/run-$1/metrics.jsonl" "$out/metrics-$1.jsonl"
  rm -rf "$out/run-$1"    # checkpoints and TensorBoard files: too many to bring back from the device
}
# the machine's speed drifts by 10-15% over minutes: alternate which goes first (ABBA), so drift
# within a pair of rounds falls on both alike
for r in $(seq 1 "$rounds"); do
  if (( r % 2 )); then bench "$r"; curate_train "$r"; else curate_train "$r"; bench "$r"; fi
done
python - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, rounds + 1):
    def speed(name):
        return json.load(open(f"{out}/{name}-{r}.json"))["model"]["moe-grouped"]["tokens_per_s"]
    bench, random_tokens = speed("bench"), speed("bench-random")
    m = [json.loads(l) for l in open(f"{out}/metrics-{r}.jsonl")]
    train = statistics.median(x["tokens_per_s"] for x in m if x["step"] >= 10)
    rows.append({"round": r, "benchmark": bench, "benchmark_random_tokens": random_tokens, "curate_train": train,
                 "ratio": train / bench, "ratio_vs_random_tokens": train / random_tokens})
    print(f"round {r}: benchmark {bench:,.0f} tokens/s on the same tokens ({random_tokens:,.0f} on random ones), "
          f"curate train {train:,.0f} -> {train / bench:.3f}x ({train / random_tokens:.3f}x the random-token benchmark)")
ratios = [r["ratio"] for r in rows]
summary = {"rounds": rows, "median_ratio": statistics.median(ratios),
           "ratio_of_medians": statistics.median(r["curate_train"] for r in rows) / statistics.median(r["benchmark"] for r in rows)}
summary["median_ratio_vs_random_tokens"] = statistics.median(r["ratio_vs_random_tokens"] for r in rows)
print(f"median ratio {summary['median_ratio']:.3f}x; ratio of medians {summary['ratio_of_medians']:.3f}x; "
      f"against the random-token benchmark {summary['median_ratio_vs_random_tokens']:.3f}x")
json.dump(summary, open(f"{out}/vs_benchmark.json", "w"), indent=1)
PY
