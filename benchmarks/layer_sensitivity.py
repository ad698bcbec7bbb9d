"""Which layers' conversion costs the most? Convert a dense LLaMA once, then put the MoE FFN in one layer at
a time (every other layer dense) and the reverse (every layer converted but that one), and print the
held-out loss of each hybrid (CPU, float32, no gate noise).

    PYTHONPATH=$PWD python benchmarks/layer_sensitivity.py --dense SmolLM2-135M-Instruct.Q4_1.gguf --tokens TOKDIR

TOKDIR: a `curate tokenize` output made with the dense model's tokenizer; one held-out sequence per domain.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samplers.packed import PackedTokens  # noqa: E402
from trainer.construct import ConvertConfig, convert_dense, load_dense  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--method", default="independent-random")
    p.add_argument("--seq-len", type=int, default=512)
    a = p.parse_args(argv)
    dense, _ = load_dense(a.dense)
    moe, _ = convert_dense(a.dense, ConvertConfig(experts=a.experts, top_k=a.top_k, method=a.method),
                           log=lambda s: None, model=dense)
    packed = PackedTokens(a.tokens)
    seqs = torch.cat([torch.from_numpy(packed.eval_sequences(d, a.seq_len, max_sequences=1)) for d in packed.domains])
    x, y = seqs[:, :-1], seqs[:, 1:]

    def loss(model) -> float:
        with torch.no_grad():
            return model.eval()(x, y).loss.item()

    dense_mlp = [layer.mlp for layer in dense.layers]
    moe_mlp = [layer.mlp for layer in moe.layers]
    print(f"dense {loss(dense):.3f}, every layer converted {loss(moe):.3f}")
    print(f"{'layer':>5} {'only this one converted':>24} {'all but this one':>17}")
    for i in range(len(moe.layers)):
        for j, layer in enumerate(moe.layers):
            layer.mlp = moe_mlp[j] if j == i else dense_mlp[j]
        only = loss(moe)
        for j, layer in enumerate(moe.layers):
            layer.mlp = dense_mlp[j] if j == i else moe_mlp[j]
        print(f"{i:>5} {only:>24.3f} {loss(moe):>17.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
