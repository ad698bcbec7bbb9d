"""Usage: python benchmarks/eval_spread.py DENSE TOKDIR OUT.json

How many held-out tokens per domain keep one reweighting from moving on noise? Per-sequence losses of the
real SmolLM2-135M on the real sample's held-out windows (512 tokens), then for eval sizes n the standard error
of each domain's mean loss and the weight jitter of one sheared-code update (eta 1) whose true excess is zero."""
import sys, json, math, random, statistics, torch, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from trainer.checkpoint_io import load_model
from samplers.packed import PackedTokens
from samplers.rules import update_weights
torch.set_num_threads(2)
G = sys.argv[1]  # the dense SmolLM2-135M (.gguf or model directory)
packed = PackedTokens(sys.argv[2])
model, cfg = load_model(G, device="cpu", dtype=torch.float32); model.eval()
T = 512
per_seq = {}
for d in packed.domains:
    try:
        s = torch.from_numpy(packed.eval_sequences(d, T, max_sequences=48))
    except Exception as e:
        print(d, "skipped:", e); continue
    losses = []
    with torch.no_grad():
        for i in range(0, len(s), 4):
            b = s[i:i + 4]
            logits = model(b[:, :-1]).logits.float()
            l = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b[:, 1:], reduction="none").mean(1)
            losses += l.tolist()
    per_seq[d] = losses
    print(d, len(losses), f"mean {statistics.mean(losses):.3f} sd {statistics.pstdev(losses):.3f}", flush=True)
res = {"per_sequence_sd": {d: statistics.pstdev(v) for d, v in per_seq.items()},
       "n_sequences": {d: len(v) for d, v in per_seq.items()}, "sizes": {}}
rng = random.Random(0)
doms = [d for d in per_seq if len(per_seq[d]) >= 8]
for n_tok in (4096, 8192, 16384, 32768, 65536):
    n = n_tok // T
    se = {d: statistics.pstdev(per_seq[d]) / math.sqrt(n) for d in doms}
    # simulate: each domain's estimate = true mean + N(0, se); reference = the true mean; uniform weights
    jit = []
    for _ in range(2000):
        losses = {d: statistics.mean(per_seq[d]) + rng.gauss(0, se[d]) for d in doms}
        ref = {d: statistics.mean(per_seq[d]) for d in doms}
        w = update_weights({d: 1 / len(doms) for d in doms}, losses, ref, rule="sheared-code", eta=1.0)
        jit.append(max(abs(w[d] * len(doms) - 1) for d in doms))
    res["sizes"][n_tok] = {"sequences": n, "mean_se": statistics.mean(se.values()), "max_se": max(se.values()),
                           "weight_jitter_p50": statistics.median(jit), "weight_jitter_p95": sorted(jit)[int(0.95 * len(jit))]}
    print(n_tok, res["sizes"][n_tok], flush=True)
json.dump(res, open(sys.argv[3], "w"), indent=1)
