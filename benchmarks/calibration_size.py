"""Usage: python benchmarks/calibration_size.py DENSE TOKDIR OUT.json

How many calibration tokens per expert make SharingInner's neuron choice stable? Two disjoint samples of
the real sample's training windows, each scored as one group; the overlap of each layer's top-192 neurons."""
import sys, time, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from trainer.checkpoint_io import load_model
from trainer.construct import taylor_scores, calibration_tokens
torch.set_num_threads(2)
G = sys.argv[1]  # the dense SmolLM2-135M (.gguf or model directory)
T = sys.argv[2]  # a `curate tokenize` directory made with its tokenizer
dense, cfg = load_model(G, device="cpu", dtype=torch.float32); dense.eval()
calib, note = calibration_tokens(T, G, cfg, 2 * 128, 128, 0)   # 256 seqs x 128
print(note, calib.shape, flush=True)
res = {}
for n_seqs in (4, 16, 64):
    a, b = calib[:n_seqs], calib[128:128 + n_seqs]
    t0 = time.time()
    s = taylor_scores(dense, [a, b])          # [L, 2, I]
    k = 192
    over = []
    for l in range(s.shape[0]):
        ta = set(s[l, 0].topk(k).indices.tolist()); tb = set(s[l, 1].topk(k).indices.tolist())
        over.append(len(ta & tb) / k)
    res[n_seqs * 128] = {"mean_overlap": sum(over) / len(over), "min_overlap": min(over), "s": time.time() - t0}
    print(n_seqs * 128, "tokens per group:", res[n_seqs * 128], flush=True)
json.dump(res, open(sys.argv[3], "w"), indent=1)
