"""Block-size sweep of trainer/fused_moe.py's kernels at one MoE layer's shape, against grouped_mm.

Times the three largest expert GEMMs of one training step of one layer (the up projection with its
SwiGLU epilogue, the up projection's input gradient, its weight gradient) for a few launch configs each,
plus the current config with the gather or scatter switched off (rows already in expert order), which
separates what the gathered loads cost from what the Triton GEMM itself costs. Each result is checked
against grouped_mm on the same rows before it is timed.

  PYTHONPATH=$PWD python benchmarks/fused_moe_configs.py --out configs.json           # GPU, d=1024 layer
  TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/fused_moe_configs.py --smoke --out /tmp/c.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer import fused_moe as fm  # noqa: E402
from trainer.moe import _grouped_mm  # noqa: E402

GEMM = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (128, 64, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4)]
SCATTER = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4)]
WGRAD = [  # BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages
    (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-size", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, interpreter blocks (CPU)")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if a.smoke:
        a.tokens, a.hidden, a.experts, a.top_k, a.expert_size = 24, 32, 4, 2, 16
    N, H, E, k, I = a.tokens, a.hidden, a.experts, a.top_k, a.expert_size
    torch.manual_seed(0)
    indices = torch.rand(N, E, device=dev).argsort(dim=1)[:, :k]
    expert_sorted, order = torch.sort(indices.reshape(-1).to(torch.int32), stable=True)
    ends = torch.searchsorted(expert_sorted, torch.arange(E, device=dev, dtype=torch.int32), right=True).to(torch.int32)
    offs = ends
    x = torch.randn(N, H, device=dev, dtype=dt)
    xs = x.index_select(0, order // k)
    w1 = (torch.randn(E, 2 * I, H, device=dev) * 0.02).to(dt)
    dh = torch.randn(N * k, 2 * I, device=dev, dtype=dt)
    ws = torch.rand(N * k, device=dev)
    rows = N * k

    def bench(fn) -> float:
        if dev.type != "cuda":
            fn()
            return float("nan")
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=40, return_mode="median")

    def rel(got, ref) -> float:
        return ((got.float() - ref.float()).norm() / ref.float().norm()).item()

    def gm(A, B, o):
        return _grouped_mm(A, B, offs=o) if _grouped_mm is not None and dev.type == "cuda" else None

    results = {"shape": {"tokens": N, "hidden": H, "experts": E, "top_k": k, "expert_size": I},
               "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "rows": []}

    def record(kernel, config, ms, flops, err, note=""):
        r = {"kernel": kernel, "config": config, "ms": ms, "tflops": flops / ms / 1e9 if ms == ms else None,
             "rel_err_vs_grouped_mm": err, "note": note}
        results["rows"].append(r)
        print(f"{kernel:28s} {str(config):24s} {ms:8.3f} ms {r['tflops'] or 0:7.1f} TFLOP/s  err {err:.1e} {note}", flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1))  # after every row: a run cut short keeps them

    # up projection (h = x W1^T, gate and up), SwiGLU epilogue
    f_up = 2 * rows * H * 2 * I
    ref_h = gm(xs, w1.transpose(1, 2), offs)
    if ref_h is not None:
        record("grouped_mm up (no SwiGLU)", "cutlass", bench(lambda: gm(xs, w1.transpose(1, 2), offs)), f_up, 0.0)
    for c, gather in [(GEMM[0], True), (GEMM[0], False)] + [(c, True) for c in GEMM[1:]]:
        bm, bn, bk, nw, ns = c
        blocks = ({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
                  if not a.smoke else None)
        h = x.new_empty(rows, 2 * I)
        act = x.new_empty(rows, I)

        def run():
            fm._launch_gemm(x if gather else xs, w1, h, order, ends, n_out=I, k=H, stride_be=w1.stride(0),
                            stride_bk=w1.stride(2), stride_bn=w1.stride(1), top_k=k if gather else 1,
                            gather_a=gather, scatter_c=False, epilogue=1, ws=ws, h=h, act=act,
                            up_offset=I * w1.stride(1), blocks=blocks)
        ms = bench(run)
        run()
        ref = ref_h if ref_h is not None else torch.cat([xs[s:e] @ w1[i].T for i, (s, e) in enumerate(
            zip([0] + ends[:-1].tolist(), ends.tolist()))])
        record("fused up + SwiGLU", c, ms, f_up, rel(h, ref), "" if gather else "rows pre-permuted (no gather)")

    # up projection's input gradient: dx[slot] = dh @ W1[e], scattered
    ref_dx = gm(dh, w1, offs)
    if ref_dx is not None:
        record("grouped_mm dgrad up", "cutlass", bench(lambda: gm(dh, w1, offs)), f_up, 0.0)
    for c, scatter in [(SCATTER[0], True), (SCATTER[0], False)] + [(c, True) for c in SCATTER[1:]]:
        bm, bn, bk, nw, ns = c
        blocks = ({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
                  if not a.smoke else None)
        y = x.new_empty(rows, H)

        def run():
            fm._launch_gemm(dh, w1, y, order, ends, n_out=H, k=2 * I, stride_be=w1.stride(0), stride_bk=w1.stride(1),
                            stride_bn=w1.stride(2), top_k=1, gather_a=False, scatter_c=scatter, blocks=blocks)
        ms = bench(run)
        run()
        got = y.index_select(0, order) if scatter else y
        ref = ref_dx if ref_dx is not None else torch.cat([dh[s:e] @ w1[i] for i, (s, e) in enumerate(
            zip([0] + ends[:-1].tolist(), ends.tolist()))])
        record("fused dgrad up (scatter)", c, ms, f_up, rel(got, ref), "" if scatter else "stored in expert order (no scatter)")

    # up projection's weight gradient: dW1[e] = dh_e^T x_e, x rows gathered
    ref_dw = gm(dh.t(), xs, offs)
    if ref_dw is not None:
        record("grouped_mm wgrad up", "cutlass", bench(lambda: gm(dh.t(), xs, offs)), f_up, 0.0)
    for c, gather in [(WGRAD[0], True), (WGRAD[0], False)] + [(c, True) for c in WGRAD[1:]]:
        bn, bk, br, nw, ns = c
        blocks = {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br, "num_warps": nw, "num_stages": ns} if not a.smoke else None
        dw = w1.new_empty(E, 2 * I, H)

        def run():
            fm._launch_wgrad(dh, x if gather else xs, dw, order, ends, k if gather else 1, False, gather, blocks)
        ms = bench(run)
        run()
        ref = ref_dw if ref_dw is not None else torch.stack([dh[s:e].T @ xs[s:e] for s, e in
                                                             zip([0] + ends[:-1].tolist(), ends.tolist())])
        record("fused wgrad up", c, ms, f_up, rel(dw, ref), "" if gather else "rows pre-permuted (no gather)")

    # the dense GEMM of the same FLOPs, for scale
    if dev.type == "cuda":
        A = torch.randn(rows, H, device=dev, dtype=dt)
        B = torch.randn(H, 2 * I, device=dev, dtype=dt)
        record("dense mm, same FLOPs", "cublas", bench(lambda: A @ B), f_up, 0.0)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out} ({time.strftime('%H:%M:%S')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
