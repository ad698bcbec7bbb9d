"""The MoE experts with the token permutation fused into the expert GEMMs (Triton, forward and backward).

The plain grouped path (trainer/moe.py, `Experts._grouped`) moves every routed row through memory three
extra times per direction: it gathers the N*k token rows into expert order before the first GEMM,
gathers the second GEMM's output back into token order afterwards, and does the mirror of both in the
backward. Here those passes disappear into the GEMMs' operand loads and stores, the way ScatterMoE and
MegaBlocks do it:

  forward   h, act = SwiGLU(x[token(p)] @ W1[e]^T) * w_p   rows gathered on load; h and act in expert order
            y[slot(p)] = act[p] @ W2[e]^T                  rows scattered to (token, slot) order on store
            out[t] = sum_j y[t*k + j]                      a plain reduction over k (fused by inductor)
  backward  dact = dy[token(p)] @ W2[e], and in the same epilogue the SwiGLU backward: dh and the routing
            weight's gradient; dx[slot(p)] = dh[p] @ W1[e] (scattered), dx = sum over k; the two weight
            gradients gather their rows inside the reduction over each expert's tokens.

p runs over the N*k (token, slot) pairs sorted by expert (`order[p]` is the pair's slot index t*k + j),
`ends[e]` is the end of expert e's rows. Nothing reads a GPU value back to the host: every launch
covers the most tiles the routing can need (one partial tile per expert), and the tiles beyond an
expert's rows exit at once.

The kernels are torch custom ops, so a compiled block calls them without breaking its graph. The
reference is the plain path; tests/test_model_fused_moe.py checks this one against the exact per-expert
loop on CPU through Triton's interpreter (TRITON_INTERPRET=1), benchmarks/moe_speed.py on the GPU.
"""
from __future__ import annotations

import torch

from trainer.kernels import _INTERPRET, triton

if triton is not None:
    import triton.language as tl


def available() -> bool:
    return triton is not None


def fused_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ws: torch.Tensor,
                  order: torch.Tensor, ends: torch.Tensor, k: int) -> torch.Tensor:
    """sum_j w[t, j] * expert_{e(t, j)}(x[t]) for every token t.

    x [N, H], w1 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], all in the compute dtype;
    ws [N*k] the routing weights in expert order (fp32); order [N*k] the slot index of each sorted
    pair; ends [E] the end of each expert's rows in that order. Returns [N, H] in x's dtype."""
    if triton is None:
        raise RuntimeError("the fused MoE experts need triton, which is not installed")
    return _FusedExperts.apply(x, w1, w2, ws, order, ends, k)


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, ws, order, ends, k):
        N, H = x.shape
        ends = ends.to(torch.int32)
        h, act = torch.ops.curate.moe_up_swiglu(x, w1, ws, order, ends, k)
        y = torch.ops.curate.moe_down_scatter(act, w2, order, ends, True)
        ctx.save_for_backward(x, w1, w2, ws, order, ends, h, act)
        ctx.k = k
        return y.view(N, k, H).sum(1)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, ws, order, ends, h, act = ctx.saved_tensors
        k, (N, H) = ctx.k, x.shape
        grad = grad.to(x.dtype).contiguous()
        need_x, need_w1, need_w2, need_ws = ctx.needs_input_grad[:4]
        dh, dws = torch.ops.curate.moe_swiglu_backward_gemm(grad, w2, h, ws, order, ends, k)
        dw2 = torch.ops.curate.moe_weight_grad(grad, act, order, ends, k, True, False) if need_w2 else None
        dw1 = torch.ops.curate.moe_weight_grad(dh, x, order, ends, k, False, True) if need_w1 else None
        dx = None
        if need_x:
            dx = torch.ops.curate.moe_down_scatter(dh, w1, order, ends, False).view(N, k, H).sum(1)
        return dx, dw1, dw2, (dws.to(ws.dtype) if need_ws else None), None, None, None


# ------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # Triton's interpreter (3.9) multiplies bf16 operands wrongly, so under it they go to fp32 first
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc, input_precision=PRECISION)
        return out

    @triton.jit
    def _expert_tile(ends_ptr, pid_m, E: tl.constexpr, BLOCK_M: tl.constexpr):
        """(expert, first row, end row) of row tile pid_m, tiles numbered expert by expert; expert -1
        past the last tile. A scan over the E group ends: E is small, and it keeps the host out."""
        tile_base = pid_m * 0
        prev_end = pid_m * 0
        expert = pid_m * 0 - 1
        row_start = pid_m * 0
        row_end = pid_m * 0
        for e in tl.static_range(E):
            end = tl.load(ends_ptr + e)
            n_tiles = tl.cdiv(end - prev_end, BLOCK_M)
            hit = (pid_m >= tile_base) & (pid_m < tile_base + n_tiles)
            expert = tl.where(hit, e, expert)
            row_start = tl.where(hit, prev_end + (pid_m - tile_base) * BLOCK_M, row_start)
            row_end = tl.where(hit, end, row_end)
            tile_base += n_tiles
            prev_end = end
        return expert, row_start, row_end

    @triton.jit
    def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, order_ptr, ends_ptr, ws_ptr, h_ptr, act_ptr, dws_ptr,
                         N_OUT, K, stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_hm, stride_actm,
                         stride_dws, up_offset,
                         TOP_K: tl.constexpr, E: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr,
                         EPILOGUE: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """C[p, n] = sum_k A[row(p), k] * B[e(p), k, n] over one expert's tile of sorted rows.

        row(p) = order[p] // TOP_K when GATHER_A (token rows), else p. Output row order[p] when SCATTER_C.
        EPILOGUE 0: store C. 1 (SwiGLU forward): a second accumulator over B's up rows (up_offset
        further), store h = [gate | up] and act = silu(gate) * up * ws[p]. 2 (SwiGLU backward): C is
        d(act); read gate, up from h, store dh = [d gate | d up] into c and this column tile's part of
        the routing weight's gradient sum(d(act) * silu(gate) * up) into dws[pid_n, p]."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        expert, row_start, row_end = _expert_tile(ends_ptr, pid_m, E, BLOCK_M)
        if expert < 0:
            return
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        if GATHER_A or SCATTER_C:
            slots = tl.load(order_ptr + rows, mask=row_ok, other=0)
        if GATHER_A:
            a_rows = (slots // TOP_K).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N_OUT
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, UPCAST)
            if EPILOGUE == 1:
                if EVEN_K:
                    b_up = tl.load(b_ptrs + up_offset, mask=col_ok[None, :], other=0.0)
                else:
                    b_up = tl.load(b_ptrs + up_offset, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc_up = _mma(a, b_up, acc_up, PRECISION, UPCAST)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk

        r64 = rows.to(tl.int64)[:, None]
        mask = row_ok[:, None] & col_ok[None, :]
        if EPILOGUE == 1:
            w = tl.load(ws_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            # rounded to the stored dtype first: the backward recomputes from the stored h
            gate = acc.to(h_ptr.dtype.element_ty)
            up = acc_up.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + r64 * stride_hm + cols[None, :], gate, mask=mask)
            tl.store(h_ptr + r64 * stride_hm + N_OUT + cols[None, :], up, mask=mask)
            g = gate.to(tl.float32)
            act = g * tl.sigmoid(g) * up.to(tl.float32) * w
            tl.store(act_ptr + r64 * stride_actm + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)
        elif EPILOGUE == 2:
            w = tl.load(ws_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            g = tl.load(h_ptr + r64 * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            u = tl.load(h_ptr + r64 * stride_hm + N_OUT + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            tl.store(dws_ptr + pid_n * stride_dws + rows, tl.sum(acc * silu * u, axis=1), mask=row_ok)
            d_act = acc * w
            tl.store(c_ptr + r64 * stride_cm + cols[None, :],
                     (d_act * u * sig * (1.0 + g * (1.0 - sig))).to(c_ptr.dtype.element_ty), mask=mask)
            tl.store(c_ptr + r64 * stride_cm + N_OUT + cols[None, :], (d_act * silu).to(c_ptr.dtype.element_ty),
                     mask=mask)
        else:
            if SCATTER_C:
                c_rows = slots.to(tl.int64)[:, None]
            else:
                c_rows = r64
            tl.store(c_ptr + c_rows * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _moe_wgrad_kernel(g_ptr, x_ptr, dw_ptr, order_ptr, ends_ptr, N_OUT, K_IN, stride_gm, stride_xm,
                          stride_dwe, stride_dwn, TOP_K: tl.constexpr, GATHER_G: tl.constexpr,
                          GATHER_X: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """dW[e, n, c] = sum over expert e's sorted rows p of G[row_g(p), n] * X[row_x(p), c], with
        row(p) = order[p] // TOP_K where gathered, else p. An expert without rows gets zeros."""
        pid_c = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.program_id(2)
        begin = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(ends_ptr + e)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok = n < N_OUT
        c_ok = c < K_IN
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(begin, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = rows < end
            if GATHER_G or GATHER_X:
                tokens = tl.load(order_ptr + rows, mask=ok, other=0) // TOP_K
            if GATHER_G:
                g_rows = tokens.to(tl.int64)
            else:
                g_rows = rows.to(tl.int64)
            if GATHER_X:
                x_rows = tokens.to(tl.int64)
            else:
                x_rows = rows.to(tl.int64)
            g = tl.load(g_ptr + g_rows[:, None] * stride_gm + n[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
            x = tl.load(x_ptr + x_rows[:, None] * stride_xm + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            acc = _mma(tl.trans(g), x, acc, PRECISION, UPCAST)
        tl.store(dw_ptr + e.to(tl.int64) * stride_dwe + n[:, None] * stride_dwn + c[None, :],
                 acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & c_ok[None, :])

    # ------------------------------------------------------------------------------ launch settings

    def _gemm_blocks(n_out: int, k: int, dual: bool) -> dict:
        """Block sizes and launch settings for _moe_gemm_kernel. Fixed rather than autotuned: autotuning
        would time configs on the first call of each shape (and rerun kernels that write partial sums)."""
        if _INTERPRET:
            return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
        block_n = 64 if dual or n_out % 128 else 128
        return {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}

    def _wgrad_blocks(n_out: int, k_in: int) -> dict:
        if _INTERPRET:
            return {"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16}
        return {"BLOCK_N": 128 if n_out % 128 == 0 else 64, "BLOCK_K": 128 if k_in % 128 == 0 else 64,
                "BLOCK_R": 64, "num_warps": 8, "num_stages": 3}

    def _precision(t: torch.Tensor) -> str:
        # fp32 operands (CPU tests) exactly; bf16/fp16 operands ignore it
        return "ieee" if t.dtype == torch.float32 else "tf32"

    def _max_row_tiles(rows: int, experts: int, block_m: int) -> int:
        # every expert may end in a partial tile
        return triton.cdiv(rows, block_m) + experts

    def _check(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(f"fused MoE: {what}")

    def _launch_gemm(a, b, c, order, ends, *, n_out, k, stride_be, stride_bk, stride_bn, top_k, gather_a,
                     scatter_c, epilogue=0, ws=None, h=None, act=None, dws=None, up_offset=0, blocks=None):
        rows = order.numel()
        E = ends.numel()
        if rows == 0 or n_out == 0:
            return
        blocks = blocks or _gemm_blocks(n_out, k, epilogue == 1)
        bk = blocks["BLOCK_K"]
        grid = (triton.cdiv(n_out, blocks["BLOCK_N"]), _max_row_tiles(rows, E, blocks["BLOCK_M"]))
        dummy = c
        _moe_gemm_kernel[grid](
            a, b, c, order, ends, ws if ws is not None else dummy, h if h is not None else dummy,
            act if act is not None else dummy, dws if dws is not None else dummy,
            n_out, k, a.stride(0), stride_be, stride_bk, stride_bn, c.stride(0),
            h.stride(0) if h is not None else 0, act.stride(0) if act is not None else 0,
            dws.stride(0) if dws is not None else 0, up_offset,
            TOP_K=top_k, E=E, GATHER_A=gather_a, SCATTER_C=scatter_c, EPILOGUE=epilogue, EVEN_K=k % bk == 0,
            PRECISION=_precision(a), UPCAST=_INTERPRET, **blocks)

    def _launch_wgrad(g, x, dw, order, ends, top_k, gather_g, gather_x, blocks=None):
        E, n_out, k_in = dw.shape
        if n_out == 0 or k_in == 0:
            return
        blocks = blocks or _wgrad_blocks(n_out, k_in)
        grid = (triton.cdiv(k_in, blocks["BLOCK_K"]), triton.cdiv(n_out, blocks["BLOCK_N"]), E)
        _moe_wgrad_kernel[grid](g, x, dw, order, ends, n_out, k_in, g.stride(0), x.stride(0), dw.stride(0),
                                dw.stride(1), TOP_K=top_k, GATHER_G=gather_g, GATHER_X=gather_x,
                                PRECISION=_precision(g), UPCAST=_INTERPRET, **blocks)

    # ------------------------------------------------------------------------------ custom ops

    @torch.library.custom_op("curate::moe_up_swiglu", mutates_args=())
    def _up_swiglu(x: torch.Tensor, w1: torch.Tensor, ws: torch.Tensor, order: torch.Tensor, ends: torch.Tensor,
                   top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N*k, 2I] = x[token(p)] @ w1[e]^T and act [N*k, I] = silu(gate) * up * ws, in expert order."""
        x, w1 = x.contiguous(), w1.contiguous()
        E, two_i, H = w1.shape
        _check(x.shape[1] == H and two_i % 2 == 0 and ws.numel() == order.numel(),
               f"shapes x {tuple(x.shape)}, w1 {tuple(w1.shape)}, ws {tuple(ws.shape)} do not agree")
        I, rows = two_i // 2, order.numel()
        h = x.new_empty(rows, two_i)
        act = x.new_empty(rows, I)
        _launch_gemm(x, w1, h, order, ends, n_out=I, k=H, stride_be=w1.stride(0), stride_bk=w1.stride(2),
                     stride_bn=w1.stride(1), top_k=top_k, gather_a=True, scatter_c=False, epilogue=1,
                     ws=ws.contiguous(), h=h, act=act, up_offset=I * w1.stride(1))
        return h, act

    @_up_swiglu.register_fake
    def _(x, w1, ws, order, ends, top_k):
        rows, two_i = order.numel(), w1.shape[1]
        return x.new_empty(rows, two_i), x.new_empty(rows, two_i // 2)

    @torch.library.custom_op("curate::moe_down_scatter", mutates_args=())
    def _down_scatter(a: torch.Tensor, w: torch.Tensor, order: torch.Tensor, ends: torch.Tensor,
                      w_out_in: bool) -> torch.Tensor:
        """y[order[p]] = a[p] @ w[e]^T (w [E, out, in], w_out_in) or a[p] @ w[e] (w [E, in, out]): the
        expert-ordered rows' products stored in (token, slot) order."""
        a, w = a.contiguous(), w.contiguous()
        n_out, k_in = (w.shape[1], w.shape[2]) if w_out_in else (w.shape[2], w.shape[1])
        _check(a.shape == (order.numel(), k_in), f"shapes a {tuple(a.shape)}, w {tuple(w.shape)} do not agree")
        y = a.new_empty(order.numel(), n_out)
        sk, sn = (w.stride(2), w.stride(1)) if w_out_in else (w.stride(1), w.stride(2))
        _launch_gemm(a, w, y, order, ends, n_out=n_out, k=k_in, stride_be=w.stride(0), stride_bk=sk, stride_bn=sn,
                     top_k=1, gather_a=False, scatter_c=True)
        return y

    @_down_scatter.register_fake
    def _(a, w, order, ends, w_out_in):
        return a.new_empty(order.numel(), w.shape[1] if w_out_in else w.shape[2])

    @torch.library.custom_op("curate::moe_swiglu_backward_gemm", mutates_args=())
    def _swiglu_backward_gemm(grad: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, ws: torch.Tensor,
                              order: torch.Tensor, ends: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """d(act) = grad[token(p)] @ w2[e], then the SwiGLU backward in the epilogue: dh [N*k, 2I] and the
        routing weights' gradient [N*k] (fp32)."""
        grad, w2, h = grad.contiguous(), w2.contiguous(), h.contiguous()
        E, H, I = w2.shape
        rows = order.numel()
        _check(grad.shape[1] == H and h.shape == (rows, 2 * I),
               f"shapes grad {tuple(grad.shape)}, w2 {tuple(w2.shape)}, h {tuple(h.shape)} do not agree")
        blocks = _gemm_blocks(I, H, False)
        # one partial sum per column tile, summed below: no atomics, the same result every run
        dws = torch.zeros(triton.cdiv(I, blocks["BLOCK_N"]), rows, device=grad.device, dtype=torch.float32)
        dh = torch.empty_like(h)
        _launch_gemm(grad, w2, dh, order, ends, n_out=I, k=H, stride_be=w2.stride(0), stride_bk=w2.stride(1),
                     stride_bn=w2.stride(2), top_k=top_k, gather_a=True, scatter_c=False, epilogue=2,
                     ws=ws.contiguous(), h=h, dws=dws, blocks=blocks)
        return dh, dws.sum(0)

    @_swiglu_backward_gemm.register_fake
    def _(grad, w2, h, ws, order, ends, top_k):
        return torch.empty_like(h), h.new_empty(order.numel(), dtype=torch.float32)

    @torch.library.custom_op("curate::moe_weight_grad", mutates_args=())
    def _weight_grad(g: torch.Tensor, x: torch.Tensor, order: torch.Tensor, ends: torch.Tensor, top_k: int,
                     gather_g: bool, gather_x: bool) -> torch.Tensor:
        """dW [E, n_out, k_in]: dW[e] = sum over expert e's rows p of outer(g[row_g(p)], x[row_x(p)])."""
        g, x = g.contiguous(), x.contiguous()
        dw = g.new_empty(ends.numel(), g.shape[1], x.shape[1])
        _launch_wgrad(g, x, dw, order, ends, top_k, gather_g, gather_x)
        return dw

    @_weight_grad.register_fake
    def _(g, x, order, ends, top_k, gather_g, gather_x):
        return g.new_empty(ends.numel(), g.shape[1], x.shape[1])
