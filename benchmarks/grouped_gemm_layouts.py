"""Is `torch._grouped_mm` slower than a dense GEMM of the same FLOPs, and does the operand layout matter?

For each of the six expert GEMMs of one MoE layer's training step (forward, input gradient and weight
gradient of gate_up and of down), times `_grouped_mm` with the weights in the layout trainer/moe.py
uses ([E, out, in], as Mixtral stores them) and in the transposed layout ([E, in, out]), and a dense
`torch.mm` of the same total FLOPs (one expert's weights, every row). bf16, CUDA events, median of 20.

    PYTHONPATH=$PWD python benchmarks/grouped_gemm_layouts.py --out layouts.json [--rows 65536]

Defaults are the d=1024, 16 x 256, top-4, 8 x 2048 tokens benchmark of moe_speed.py (65,536 routed rows,
equal groups). Needs a GPU with grouped_mm (sm90).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm")


def timed(fn, reps: int = 20) -> float:
    """Median milliseconds of fn() on the current stream."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=65536, help="routed (token, slot) rows")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--expert-size", type=int, default=256)
    a = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    E, M, H, I = a.experts, a.rows, a.hidden, a.expert_size
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (M // E)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=bf)  # noqa: E731
    results = {}
    for name, k_in, n_out in (("gate_up", H, 2 * I), ("down", I, H)):
        x, grad = rnd(M, k_in), rnd(M, n_out)
        w = rnd(E, n_out, k_in)                      # ours: [E, out, in]
        wt = w.transpose(1, 2).contiguous()          # the other layout: [E, in, out]
        flops = 2 * M * k_in * n_out
        cases = {
            "forward, ours (B = w.T view)": lambda: GROUPED_MM(x, w.transpose(1, 2), offs=offs),
            "forward, [E, in, out] weights": lambda: GROUPED_MM(x, wt, offs=offs),
            "forward, dense mm, same FLOPs": lambda: x @ w[0].t(),
            "input grad, ours (B = w)": lambda: GROUPED_MM(grad, w, offs=offs),
            "input grad, [E, in, out] weights": lambda: GROUPED_MM(grad, wt.transpose(1, 2), offs=offs),
            "input grad, dense mm, same FLOPs": lambda: grad @ w[0],
            "weight grad, ours (grad.T @ x)": lambda: GROUPED_MM(grad.t(), x, offs=offs),
            "weight grad, x.T @ grad": lambda: GROUPED_MM(x.t(), grad, offs=offs),
            "weight grad, dense mm, same FLOPs": lambda: grad.t() @ x,
        }
        for case, fn in cases.items():
            ms = timed(fn)
            results[f"{name}: {case}"] = {"ms": ms, "tflops": flops / ms / 1e9}
            print(f"{name:8s} {case:36s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(a)}
    Path(a.out).write_text(json.dumps({**info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
