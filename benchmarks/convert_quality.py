"""Held-out loss of a real dense LLaMA right after conversion, per construction method (CPU is enough).

Before any continual pre-training, how much does each way of splitting the FFNs cost? The dense
model's loss is the reference; the experts = top-k = scale row with a zero gate must equal it (the
sanity property). Text: C4 and Wikipedia documents of the real RedPajama sample, the first half of the
documents for the sharing-* calibration, the second half for evaluation.

  python benchmarks/convert_quality.py --dense SmolLM2-135M-Instruct.Q4_1.gguf \\
      --text ../shared/data/redpajama-sample --out convert_quality.json
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainer.checkpoint_io import dense_from_hf, load_hf_llama, load_tokenizer  # noqa: E402
from trainer.construct import METHODS, ConvertConfig, build_moe  # noqa: E402

SETS = ("RedPajamaC4", "RedPajamaWikipedia")


def read_docs(root: Path) -> list[str]:
    import zstandard

    docs = []
    for shard in sorted(root.rglob("*.jsonl.zst")):
        with open(shard, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
            for line in io.TextIOWrapper(r, encoding="utf-8"):
                d = json.loads(line)
                if d.get("meta", {}).get("redpajama_set_name") in SETS:
                    docs.append(d["text"])
    return docs


def windows(tok, docs: list[str], n: int, length: int) -> torch.Tensor:
    stream: list[int] = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= n * (length + 1):
            break
    if len(stream) < n * (length + 1):
        raise SystemExit(f"only {len(stream)} tokens of text; need {n * (length + 1)}")
    return torch.tensor(stream[: n * (length + 1)]).view(n, length + 1)


@torch.no_grad()
def loss(model, seqs: torch.Tensor) -> float:
    model.eval()
    return sum(model(s[None, :-1], labels=s[None, 1:]).loss.item() for s in seqs) / len(seqs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="dense LLaMA: .gguf or Hugging Face directory")
    p.add_argument("--text", required=True, help="a directory of SlimPajama-format *.jsonl.zst shards")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seqs", type=int, default=8, help="evaluation sequences")
    p.add_argument("--len", type=int, default=256, help="evaluation sequence length")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.time()
    dense, cfg = dense_from_hf(load_hf_llama(Path(a.dense)).eval())
    tok = load_tokenizer(a.dense)
    docs = read_docs(Path(a.text))
    half = len(docs) // 2
    calib = windows(tok, docs[:half], a.experts * 4, 128)
    evals = windows(tok, docs[half:], a.seqs, a.len)
    print(f"loaded {a.dense} and {len(docs)} C4/Wikipedia documents in {time.time() - t0:.0f}s")

    rows = [{"model": "dense", "loss": loss(dense, evals)}]
    runs = [(m, None) for m in METHODS] + [("independent-random", 1.0)]
    for method, scale in runs:
        t = time.time()
        s = ConvertConfig(experts=a.experts, top_k=a.top_k, method=method, gate="linear", gate_init="random",
                            scale=scale, seed=0)
        moe, mcfg = build_moe(copy.deepcopy(dense), s, calib, "C4/Wikipedia sample", log=lambda _: None)
        rows.append({"model": f"{method}, scale {mcfg.moe.scale:g}", "convert_s": time.time() - t,
                     "loss": loss(moe, evals)})
        print(rows[-1])
    s = ConvertConfig(experts=a.experts, top_k=a.experts, scale=float(a.experts), method="independent-random",
                        gate="linear", gate_init="zero")
    moe, _ = build_moe(copy.deepcopy(dense), s, log=lambda _: None)
    rows.append({"model": f"sanity: {a.experts} experts, top-{a.experts}, scale {a.experts}, zero gate",
                 "loss": loss(moe, evals)})

    print(f"\n{'model':55s} {'loss':>7s} {'convert s':>10s}")
    for r in rows:
        print(f"{r['model']:55s} {r['loss']:7.3f} {r.get('convert_s', float('nan')):10.1f}")
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "dense": a.dense,
                                       "eval_tokens": a.seqs * a.len, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
