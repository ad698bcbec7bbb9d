"""The mixture-of-experts feed-forward layer of LLaMA-MoE: gates, balance losses, stacked experts.

One MoE layer replaces one dense SwiGLU FFN. For every token the gate scores the experts, the k best
are kept, their scores go through a softmax over those k (Mixtral's rule), and the output is

    y = scale * sum_{i in top-k} p_i * expert_i(x)        (+ shared(x) for sharing-inter)

where `scale` is the paper's rescale (experts / top-k by default): an expert holds 1/E of the dense
FFN's neurons, so without it the converted model starts with FFN outputs k/E times too small.

Experts are stored as stacked tensors (`gate_up_proj` [E, 2*I, H], `down_proj` [E, H, I], the layout
of transformers' Mixtral), so computing them is two grouped GEMMs over the tokens sorted by expert:
`torch.nn.functional.grouped_mm` in bf16 on CUDA, and an exact per-expert loop elsewhere. Routing is
dropless: every token reaches all of its k experts, whatever the load.

Nothing on the grouped path reads a GPU value back to the host (no .item(), .tolist(), nonzero), so a
layer never stalls the CPU and the whole block compiles into one graph.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.config import build
from common.errors import CurateError
from trainer import fused_moe
from trainer.kernels import swiglu_weighted, triton_runs_on

GATES = ("noisy-linear", "linear", "noisy-mlp")
# "fitted": random, then fitted to the dense model's expert outputs by `curate convert` (construct.fit_routers)
GATE_INITS = ("random", "zero", "fitted")
# "split": the dense FFN's neurons as they are; "fitted": down projections refit so the routed mixture
# reproduces the dense FFN on calibration tokens (construct.fit_experts)
EXPERT_INITS = ("split", "fitted")
# "bias": no auxiliary loss; a per-expert bias on the selection logits follows the load (DeepSeek-V3)
BALANCE_LOSSES = ("cv2", "switch", "bias", None)
EXPERT_IMPLS = ("auto", "fused", "grouped", "loop")

# torch >= 2.10 has the public name; 2.8/2.9 only the private op with the same arguments.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class MoEConfig:
    """How each FFN is split and routed. Saved inside the model config, so a converted model and every
    training checkpoint carry the method, the seed and the exact neuron partition they came from."""

    num_experts: int
    top_k: int
    expert_size: int                      # intermediate neurons per routed expert
    scale: float | None = None            # None: num_experts / top_k (the paper's rescale)
    gate: str = "linear"                  # "noisy-linear", "linear" (Mixtral) or "noisy-mlp" (LLaMA-MoE)
    gate_init: str = "random"             # "random": nn.Linear's init (LLaMA-MoE); "zero": all logits 0
    expert_init: str = "split"            # "split" or "fitted" (down projections refit by `curate convert`)
    balance_loss: str | None = "cv2"      # "cv2": CV^2(importance) + CV^2(load); "switch"; "bias"; None
    balance_coef: float = 0.01
    # "bias": step of the per-expert selection bias per optimizer step. DeepSeek-V3's 1e-3 is for scores in
    # [0, 1] over a long run; our logits are unnormalised and runs short, so a larger step.
    bias_rate: float = 1e-2
    noise_epsilon: float = 0.01           # noisy-mlp: noise std = softplus(W_noise x) + noise_epsilon
    shared_intermediate_size: int = 0     # sharing-inter: neurons of the always-on shared part
    method: str | None = None             # construction method, recorded by `curate convert`
    seed: int | None = None
    calibration: str | None = None        # what the importance scores were computed on (sharing-*)
    # {"experts": [layer][expert][neuron index]], "shared": [layer][neuron index] | None}: indices into
    # the dense FFN's intermediate neurons. Large, so kept out of repr.
    partition: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> CurateError:
            return CurateError(f"moe config: {key} {why} (got {getattr(self, key)!r})")

        for key in ("num_experts", "top_k", "expert_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(key, "must be a positive integer")
        if self.top_k > self.num_experts:
            raise bad("top_k", f"cannot exceed num_experts={self.num_experts}")
        if self.scale is None:
            self.scale = self.num_experts / self.top_k
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or self.scale <= 0:
            raise bad("scale", "must be a positive number")
        self.scale = float(self.scale)
        if self.gate not in GATES:
            raise bad("gate", f"must be one of {', '.join(GATES)}")
        if self.gate_init not in GATE_INITS:
            raise bad("gate_init", f"must be one of {', '.join(GATE_INITS)}")
        if self.expert_init not in EXPERT_INITS:
            raise bad("expert_init", f"must be one of {', '.join(EXPERT_INITS)}")
        if self.balance_loss in ("none", "None"):
            self.balance_loss = None
        if self.balance_loss not in BALANCE_LOSSES:
            raise bad("balance_loss", "must be cv2, switch, bias or none")
        if not isinstance(self.bias_rate, (int, float)) or self.bias_rate < 0:
            raise bad("bias_rate", "must be a non-negative number")
        if not isinstance(self.balance_coef, (int, float)) or self.balance_coef < 0:
            raise bad("balance_coef", "must be a non-negative number")
        if not isinstance(self.noise_epsilon, (int, float)) or self.noise_epsilon < 0:
            raise bad("noise_epsilon", "must be a non-negative number")
        v = self.shared_intermediate_size
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad("shared_intermediate_size", "must be a non-negative integer")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "moe config") -> "MoEConfig":
        try:
            return build(cls, raw, "moe")
        except CurateError as e:
            raise CurateError(f"{where}: {e}") from None


class MLP(nn.Module):
    """LLaMA's SwiGLU feed-forward block (the names match Hugging Face's LlamaMLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------- gates

def _init_linear(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): what LLaMA-MoE's gate networks start
    from. Random logits of this size spread the tokens over the experts from the first step."""
    bound = 1.0 / weight.shape[1] ** 0.5
    weight.uniform_(-bound, bound, generator=generator)
    if weight.shape[0] <= weight.shape[1]:
        # orthogonal rows of the same norm: no two experts start out preferring the same directions
        q, _ = torch.linalg.qr(weight.T.float())
        weight.copy_((q.T * weight.norm(dim=1, keepdim=True)).to(weight.dtype))


class LinearGate(nn.Module):
    """logits = W x: exactly Mixtral's router, so a model with this gate exports to Mixtral."""

    noisy = False

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def reset(self, init: str, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            if init == "zero":
                self.weight.zero_()
            else:
                _init_linear(self.weight, generator)


class NoisyLinearGate(LinearGate):
    """Shazeer et al.'s noisy top-k gate: logits = W x, plus training-only noise of std
    softplus(W_noise x) + eps. Outside training it is the linear gate, so it exports to Mixtral's router
    (the noise weights are dropped). The noise weights start at zero (std softplus(0) + eps ~ 0.70)."""

    noisy = True

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts)
        self.noise = nn.Linear(hidden_size, num_experts, bias=False)

    def reset(self, init: str, generator: torch.Generator | None = None) -> None:
        super().reset(init, generator)
        with torch.no_grad():
            self.noise.weight.zero_()


class NoisyMLPGate(nn.Module):
    """LLaMA-MoE's gate: logits = W2 tanh(W1 x), plus training-only noise of std softplus(W_noise x) + eps.

    The noise weights start at zero (std = softplus(0) + eps ~ 0.70), so early routing explores; the
    model learns how much noise each token gets.
    """

    noisy = True

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, num_experts, bias=False), nn.Tanh(),
                                 nn.Linear(num_experts, num_experts, bias=False))
        self.noise = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def reset(self, init: str, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            _init_linear(self.net[0].weight, generator)
            if init == "zero":
                # Only the output layer is zeroed: logits start at 0 (uniform routing) while W1 stays
                # random, otherwise neither layer would ever receive a gradient.
                self.net[2].weight.zero_()
            else:
                _init_linear(self.net[2].weight, generator)
            self.noise.weight.zero_()


GATE_CLASSES = {"linear": LinearGate, "noisy-linear": NoisyLinearGate, "noisy-mlp": NoisyMLPGate}


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance / mean^2): zero when x is uniform."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + eps)


@dataclass
class Routing:
    indices: torch.Tensor   # [N, k] expert of each (token, slot), best first
    weights: torch.Tensor   # [N, k] softmax over the k selected logits (fp32), before `scale`
    counts: torch.Tensor    # [E] routed (token, slot) pairs per expert (fp32)
    aux_loss: torch.Tensor  # scalar, already multiplied by balance_coef


class Router(nn.Module):
    """Top-k selection and the balance loss, for either gate."""

    def __init__(self, cfg: MoEConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.gate = GATE_CLASSES[cfg.gate](hidden_size, cfg.num_experts)
        if cfg.balance_loss == "bias":
            # Auxiliary-loss-free balancing (DeepSeek-V3): added to the logits only to choose the top k;
            # the weights come from the unbiased logits. Updated by `update_bias` after each optimizer step
            # from the load counted in `step_counts` (training forwards since the last update).
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        else:
            self.expert_bias = None
        self.step_counts: torch.Tensor | None = None    # a plain attribute, like MoELayer.last_counts

    def gate_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(clean logits, logits used for routing, noise std or None), all fp32 [N, E]. Noise only for
        the noisy gates in training mode; in eval the routing is deterministic."""
        # Routing decisions in fp32: bf16 logits tie often enough to change which experts win.
        clean = self.gate(x).float()
        if not (self.training and self.gate.noisy):
            return clean, clean, None
        noise_std = F.softplus(self.gate.noise(x).float()) + self.cfg.noise_epsilon
        return clean, clean + torch.randn_like(clean) * noise_std, noise_std

    def forward(self, x: torch.Tensor) -> Routing:
        cfg, E, k = self.cfg, self.cfg.num_experts, self.cfg.top_k
        clean, logits, noise_std = self.gate_logits(x)
        noisy = noise_std is not None
        smooth_load = noisy and cfg.balance_loss == "cv2" and k < E
        # The k best of E by sorting all E: on CUDA one small in-register sort per row, where topk ran a
        # selection kernel and then a sort of its result (1.4 ms less per step of the d=1024 benchmark on
        # an H200). The stable sort also settles ties the same way on every device: lower index first.
        if self.expert_bias is not None:
            indices = (logits + self.expert_bias).sort(dim=-1, descending=True, stable=True)[1][:, :k]
            weights = torch.softmax(logits.gather(1, indices), dim=-1)
        else:
            sorted_vals, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
            kk = k + 1 if smooth_load else k
            top_vals, top_idx = sorted_vals[:, :kk], sorted_idx[:, :kk]
            indices = top_idx[:, :k]
            weights = torch.softmax(top_vals[:, :k], dim=-1)
        # a comparison-and-sum rather than scatter_add: thousands of atomics on E addresses contend
        counts = (indices.reshape(-1, 1) == torch.arange(E, device=x.device)).sum(0).float()
        if self.expert_bias is not None and self.training:
            c = counts.detach()
            self.step_counts = c if self.step_counts is None else self.step_counts + c

        if cfg.balance_loss in (None, "bias") or cfg.balance_coef == 0:
            aux = logits.new_zeros(())
        elif cfg.balance_loss == "switch":
            # Switch Transformer: E * sum_i f_i * P_i, f_i = fraction of routed slots that went to expert
            # i (no gradient), P_i = mean router probability of expert i (carries the gradient).
            f = counts / indices.numel()
            p = torch.softmax(logits, dim=-1).mean(0)
            aux = cfg.balance_coef * E * (f * p).sum()
        else:
            # importance: each expert's summed gate weight (0 where it was not selected)
            importance = torch.zeros_like(logits).scatter(1, indices, weights).sum(0)
            if smooth_load:
                load = _smooth_load(clean, logits, noise_std, top_vals, k)
            else:
                load = counts  # without noise the load has no gradient; its CV^2 is still reported
            aux = cfg.balance_coef * (cv_squared(importance) + cv_squared(load))
        return Routing(indices, weights, counts, aux)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None) -> None:
        """One balancing step: bias += rate * sign(mean load - load), from `counts` (the step's load,
        already summed over ranks by the caller) or this rank's `step_counts`; then the count restarts."""
        c = self.step_counts if counts is None else counts
        if self.expert_bias is None or c is None:
            return
        # no `if c.sum() > 0` guard: it would wait on the GPU every step, and zero counts move nothing anyway
        self.expert_bias += self.cfg.bias_rate * torch.sign(c.mean() - c)
        self.step_counts = None


def _smooth_load(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor,
                 top_vals: torch.Tensor, k: int) -> torch.Tensor:
    """Differentiable expected load (Shazeer et al. 2017, the noisy top-k gate): for each token and
    expert, the probability that the expert would be in the top k under fresh noise, summed over
    tokens. The threshold is the k-th best noisy logit of the other experts: the (k+1)-th value for an
    expert currently in the top k, the k-th for one outside it."""
    threshold_if_in = top_vals[:, k:k + 1]
    threshold_if_out = top_vals[:, k - 1:k]
    is_in = noisy > threshold_if_in
    prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_std)
    prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(0)


# --------------------------------------------------------------------------------------------- experts

class _PermuteTokens(torch.autograd.Function):
    """out[p] = x[order[p] // k]: token rows in expert order, each token once per selected slot.

    The backward sums each token's k slot gradients through the inverse permutation (a gather and a
    reduction) instead of the default index_add, whose atomics serialise on repeated rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        n = inverse.numel() // ctx.k
        return grad.index_select(0, inverse).view(n, ctx.k, -1).sum(1), None, None, None


class _UnpermuteSum(torch.autograd.Function):
    """out[t] = sum_j ys[inverse[t*k + j]]: each token's k expert rows gathered back and summed.

    The exact mirror of _PermuteTokens: one gather-and-reduce pass forward (no scatter into a [N*k, H]
    buffer), and the backward is the permutation's gather. The routing weights are already applied
    (see Experts.forward), so nothing here needs the [N, k, H] product kept for backward."""

    @staticmethod
    def forward(ctx, ys: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return ys.index_select(0, inverse).view(inverse.numel() // k, k, -1).sum(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order // ctx.k), None, None, None


class _GroupedLinear(torch.autograd.Function):
    """y = x @ w[e].T for the rows of each expert e (w: [E, out, in], bf16), through grouped_mm.

    The weight gradient is computed as grad.T @ x, which comes out in w's own [E, out, in] layout;
    autograd's default (x.T @ grad, then transposed) hands AccumulateGrad a transposed tensor that it
    copies once more per weight and step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return _grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _grouped_mm(grad, w, offs=offs) if ctx.needs_input_grad[0] else None
        grad_w = _grouped_mm(grad.t(), x, offs=offs) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


class Experts(nn.Module):
    """E SwiGLU experts as two stacked weight tensors (transformers' Mixtral layout)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_size = num_experts, hidden_size, expert_size
        # rows [0, I) of gate_up_proj[e] are the gate projection, rows [I, 2I) the up projection
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        # None: trainer/kernels.py's Triton kernel wherever Triton runs; False: plain torch (benchmarks compare)
        self.triton_kernels: bool | None = None

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """x [N, H]; indices, weights [N, k] -> sum_j weights[:, j] * expert_{indices[:, j]}(x)."""
        N, k = indices.shape
        # Sort the N*k (token, slot) pairs by expert; a stable sort keeps token order inside a group.
        # int32 keys: half the radix passes of int64.
        expert_sorted, order = torch.sort(indices.reshape(-1).to(torch.int32), stable=True)
        # ends[e] = end of expert e's rows. A binary search in the sorted ids: no atomics, no host sync
        # (bincount would read its max back to the host).
        experts = torch.arange(self.num_experts, device=x.device, dtype=expert_sorted.dtype)
        ends = torch.searchsorted(expert_sorted, experts, right=True)
        if self._use_fused(x, impl):
            # the permutation happens inside the expert GEMMs' loads and stores (trainer/fused_moe.py)
            dt = self._compute_dtype(x)
            ws = weights.reshape(-1).index_select(0, order)
            return fused_moe.fused_experts(x.to(dt), self.gate_up_proj.to(dt), self.down_proj.to(dt), ws,
                                           order, ends, k)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        grouped = self._use_grouped(x, impl)
        if grouped:
            x = x.to(self._compute_dtype(x))  # permute in the GEMM dtype: half the bytes moved under autocast
        xs = _PermuteTokens.apply(x, order, inverse, k)
        # Each sorted row's routing weight, applied to the down projection's input rather than its output:
        # the projection is linear, so the result is the same, and the [N*k, I] activation is a quarter of
        # the [N*k, H] output here, so the multiply fuses into the SwiGLU pass instead of a pass of its own.
        ws = weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        ys = self._grouped(xs, ws, ends) if grouped else self._loop(xs, ws, ends)
        return _UnpermuteSum.apply(ys, order, inverse, k)

    def _use_fused(self, x: torch.Tensor, impl: str) -> bool:
        # Only when asked: "auto" keeps grouped_mm, whose CUTLASS GEMMs outrun the fused Triton kernels by
        # more than the permutation passes cost (H200: benchmarks/results/moe_speed_fused.md).
        if impl != "fused":
            return False
        if not (fused_moe.available() and triton_runs_on(x)):
            raise RuntimeError("expert impl 'fused' needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
        return True

    def _use_grouped(self, x: torch.Tensor, impl: str) -> bool:
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        if impl != "auto":
            if impl == "grouped" and _grouped_mm is None:
                raise RuntimeError("this torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm")
            return impl == "grouped"
        # grouped_mm on CUDA wants bf16 and 16-byte aligned rows (multiples of 8 bf16 values).
        return (_grouped_mm is not None and x.is_cuda and self._compute_dtype(x) == torch.bfloat16
                and self.hidden_size % 8 == 0 and self.expert_size % 8 == 0)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # grouped_mm is not an autocast op: under autocast, cast to the autocast dtype ourselves.
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _grouped(self, xs: torch.Tensor, ws: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        dt = self._compute_dtype(xs)
        offs = ends.to(torch.int32)
        h = _GroupedLinear.apply(xs, self.gate_up_proj.to(dt), offs)     # xs: already in dt (forward)
        act = swiglu_weighted(h, ws, dt, self.triton_kernels)
        return _GroupedLinear.apply(act, self.down_proj.to(dt), offs)

    def _loop(self, xs: torch.Tensor, ws: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The exact reference path: one expert at a time on its slice of the sorted tokens (what
        LLaMA-MoE does). Reads the group sizes to the host, so it is for CPU and for comparison."""
        outs = []
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        sizes = counts.tolist()
        for e, (chunk, w) in enumerate(zip(torch.split(xs, sizes), torch.split(ws, sizes))):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, self.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear((F.silu(gate) * up * w).to(chunk.dtype), self.down_proj[e]))
        return torch.cat(outs) if outs else xs.new_zeros(0, self.hidden_size)


class MoELayer(nn.Module):
    """Router + experts (+ the always-on shared part for sharing-inter). Input and output [B, T, H]."""

    def __init__(self, cfg: MoEConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg, hidden_size)
        self.experts = Experts(cfg.num_experts, hidden_size, cfg.expert_size)
        self.shared = MLP(hidden_size, cfg.shared_intermediate_size) if cfg.shared_intermediate_size else None
        self.impl = "auto"            # "grouped" / "loop" force a path (tests, benchmarks)
        self.last_counts: torch.Tensor | None = None   # [E] routed (token, slot) pairs per expert, last forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        r = self.router(flat)
        y = self.experts(flat, r.indices, r.weights * self.cfg.scale, self.impl)
        if self.shared is not None:
            y = y + self.shared(flat)
        # Kept as device tensors: reading them is the caller's choice (and its sync).
        self.last_counts = r.counts.detach()
        return y.view(B, T, H), r.aux_loss
