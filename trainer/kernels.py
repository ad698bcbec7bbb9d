"""A Triton kernel for the MoE layer's expert activation, where the compiled block left a pass behind.

Each routed row's activation is act = silu(gate) * up * w, with h = [gate | up] the first grouped
GEMM's output and w the row's routing weight (applied here rather than to the expert's output: see
trainer/moe.py). Its backward needs d(gate), d(up) and the weight's gradient sum(grad * silu(gate) * up).
Inductor compiled that as a pointwise pass and a second pass over the same rows for the reduction;
`swiglu_weighted` keeps the forward in torch ops (inductor fuses it into one pass) and computes the
whole backward in one Triton pass: 1.7% more tokens/s for the d=1024 MoE step on an H200
(benchmarks/results/moe_speed_notes.md, "v5", which also records the kernels that did not pay).

Off CUDA, or where Triton is not installed (the CPU wheel of torch has none), it is the same arithmetic
in plain torch with autograd; TRITON_INTERPRET=1 runs the kernel on CPU tensors through Triton's
interpreter, which is how the tests check it without a GPU. The kernel is a torch custom op, so
torch.compile calls it inside a compiled block instead of breaking the graph.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for tensors like `t` (CUDA, or CPU under Triton's interpreter)."""
    return triton is not None and (t.is_cuda or _INTERPRET)


def swiglu_weighted(h: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype,
                    use_triton: bool | None = None) -> torch.Tensor:
    """act = silu(gate) * up * ws with h = [gate | up] ([M, 2I]) and ws [M, 1], in out_dtype."""
    if triton_runs_on(h) if use_triton is None else use_triton:
        if triton is None:
            raise RuntimeError("swiglu_weighted(use_triton=True) needs triton, which is not installed")
        return _SwiGLUWeighted.apply(h, ws, out_dtype)
    return _swiglu_weighted_torch(h, ws, out_dtype)


def _swiglu_weighted_torch(h: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) * up * ws).to(out_dtype)


class _SwiGLUWeighted(torch.autograd.Function):
    """Forward in plain torch ops (inductor fuses them into one pass); backward one Triton pass."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(h, ws)
        return _swiglu_weighted_torch(h, ws, out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, ws = ctx.saved_tensors
        dh, dws = torch.ops.curate.swiglu_weighted_backward(h, ws, grad.contiguous())
        return dh, dws.to(ws.dtype).view_as(ws), None


if triton is not None:

    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_I": i}, num_warps=w)
                for m, i, w in ((4, 256, 4), (8, 256, 4), (8, 128, 4), (16, 128, 8), (16, 256, 8))]
    # Tuned on the first call of each shape, which waits on the GPU while it times the configs; a training
    # run has one shape (dropless routing: always tokens x k rows). The interpreter times nothing, so it
    # gets one small fixed block instead.
    _tuned = (triton.heuristics({"BLOCK_M": lambda _: 4, "BLOCK_I": lambda _: 16}) if _INTERPRET
              else triton.autotune(configs=_CONFIGS, key=["M", "I"]))

    @_tuned
    @triton.jit
    def _swiglu_weighted_backward_kernel(h_ptr, ws_ptr, grad_ptr, dh_ptr, dws_ptr, M, I,
                                         stride_h, stride_grad, stride_dh,
                                         BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        r64 = rows.to(tl.int64)[:, None]
        w = tl.load(ws_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        dws = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, I, BLOCK_I):
            cols = start + tl.arange(0, BLOCK_I)
            mask = row_ok[:, None] & (cols[None, :] < I)
            g = tl.load(h_ptr + r64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            u = tl.load(h_ptr + r64 * stride_h + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(grad_ptr + r64 * stride_grad + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            dws += tl.sum(dy * silu * u, axis=1)
            d_act = dy * w
            tl.store(dh_ptr + r64 * stride_dh + cols[None, :],
                     (d_act * u * sig * (1.0 + g * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_ptr + r64 * stride_dh + I + cols[None, :], (d_act * silu).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dws_ptr + rows, dws, mask=row_ok)

    def _rows_2d(t: torch.Tensor, what: str) -> None:
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{what}: expected a 2-D tensor with contiguous rows, got shape {tuple(t.shape)} "
                             f"strides {t.stride()}")

    @torch.library.custom_op("curate::swiglu_weighted_backward", mutates_args=())
    def _swiglu_backward_op(h: torch.Tensor, ws: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _rows_2d(h, "swiglu_weighted_backward")
        _rows_2d(grad, "swiglu_weighted_backward")
        M, I = grad.shape
        if h.shape != (M, 2 * I) or ws.numel() != M:
            raise ValueError(f"swiglu_weighted_backward: shapes h {tuple(h.shape)}, ws {tuple(ws.shape)}, "
                             f"grad {tuple(grad.shape)} do not agree")
        ws = ws.reshape(M).contiguous()
        dh = torch.empty_like(h)
        dws = torch.empty(M, device=h.device, dtype=torch.float32)
        if M and I:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
            _swiglu_weighted_backward_kernel[grid](h, ws, grad, dh, dws, M, I, h.stride(0), grad.stride(0),
                                                   dh.stride(0))
        return dh, dws

    @_swiglu_backward_op.register_fake
    def _(h, ws, grad):
        return torch.empty_like(h), h.new_empty(grad.shape[0], dtype=torch.float32)
