"""The MoE layer: expert paths against a per-token reference, gates, noise, balance losses, load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.model import LlamaMoE, ModelConfig, rope_cos_sin
from trainer.moe import Experts, MoEConfig, MoELayer, Router, _grouped_mm, cv_squared

H, E, I = 16, 5, 8


def make_layer(gate="linear", top_k=2, seed=0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(num_experts=E, top_k=top_k, expert_size=I, gate=gate, **kw), H)
    torch.nn.init.normal_(layer.experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(layer.experts.down_proj, std=0.3)
    layer.router.gate.reset("random")
    with torch.no_grad():
        for p in layer.router.gate.parameters():
            p.mul_(50)  # decisive routing, so experts get very different loads
    return layer


def naive_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the definition: scale * sum_j softmax(top-k logits)_j * expert_j(x)."""
    ex, cfg = layer.experts, layer.cfg
    logits = layer.router.gate(x).float()
    rows = []
    for t in range(x.shape[0]):
        vals, idx = logits[t].topk(cfg.top_k)
        w = torch.softmax(vals, -1)
        out = 0
        for j in range(cfg.top_k):
            e = int(idx[j])
            g, u = (ex.gate_up_proj[e] @ x[t]).chunk(2)
            out = out + w[j] * (ex.down_proj[e] @ (F.silu(g) * u))
        rows.append(cfg.scale * out)
    return torch.stack(rows)


def run_layer(layer, x, impl):
    layer.impl = impl
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, aux = layer(x.view(1, -1, H))
    y = y.view(-1, H)
    (y.square().sum() + aux).backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    return y.detach(), grads


def test_loop_path_matches_per_token_reference_values_and_gradients():
    layer = make_layer().eval()
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(1))
    w0 = layer.router.gate.weight[0].detach()
    x += 2.0 * w0 / w0.norm()  # tokens lean towards expert 0
    y_loop, g_loop = run_layer(layer, x, "loop")
    counts = torch.bincount(layer.router.gate(x).topk(2).indices.flatten(), minlength=E)
    assert counts.max() > 2 * counts.float().mean()  # really uneven loads (an idle expert is fine too)

    xr = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    ref = naive_moe(layer, xr)
    (ref.square().sum() + layer(xr.view(1, -1, H))[1]).backward()
    g_ref = [xr.grad] + [p.grad for p in layer.parameters()]
    assert torch.allclose(y_loop, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_loop, g_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in g_loop)  # gradients reach x, the gate and every weight


@pytest.mark.skipif(_grouped_mm is None, reason="torch without grouped_mm")
def test_grouped_path_matches_loop_values_and_gradients():
    layer = make_layer().eval()
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(2))
    y_loop, g_loop = run_layer(layer, x, "loop")
    try:
        y_grp, g_grp = run_layer(layer, x, "grouped")
    except (RuntimeError, NotImplementedError) as e:  # CPU kernels of grouped_mm came with torch 2.9
        pytest.skip(f"grouped_mm has no CPU fp32 kernel here: {e}")
    assert torch.allclose(y_grp, y_loop, atol=1e-5)
    for a, b in zip(g_grp, g_loop):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.skipif(_grouped_mm is None, reason="torch without grouped_mm")
@pytest.mark.parametrize("gate", ["linear", "noisy-mlp"])
def test_grouped_block_traces_as_one_graph(gate):
    """No graph break in a training block on the grouped path: in particular no .item()/.tolist(),
    which are what would force a host sync on the GPU."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_size=16, gate=gate))
    model = LlamaMoE(cfg).to(torch.bfloat16).train()
    model.set_expert_impl("grouped")
    cos, sin = rope_cos_sin(cfg, 8, torch.device("cpu"))
    explained = torch._dynamo.explain(model.layers[0])(torch.randn(2, 8, 32, dtype=torch.bfloat16), cos, sin)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_auto_picks_the_exact_loop_on_cpu():
    ex = Experts(4, 16, 8)
    assert not ex._use_grouped(torch.zeros(2, 16), "auto")


def test_linear_gate_routes_like_mixtral():
    """Softmax over the k selected logits = Mixtral's softmax-topk-renormalise."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    router = Router(MoEConfig(num_experts=6, top_k=2, expert_size=4, gate="linear"), 16)
    router.gate.reset("random")
    mixtral = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=6, num_experts_per_tok=2))
    mixtral.weight.data.copy_(router.gate.weight.data)
    x = torch.randn(50, 16)
    r = router(x)
    _, scores, idx = mixtral(x)
    assert torch.equal(r.indices, idx)
    assert torch.allclose(r.weights, scores, atol=1e-6)


def test_noisy_gate_noise_only_in_training_with_the_specified_std():
    layer = make_layer(gate="noisy-mlp")
    gate = layer.router.gate
    assert torch.all(gate.noise.weight == 0)  # zero-initialised noise weights
    x = torch.randn(4000, H)
    layer.eval()
    clean, logits, std = layer.router.gate_logits(x)
    assert std is None and torch.equal(clean, logits)
    y1, _ = layer(x[:20].view(1, 20, H))
    y2, _ = layer(x[:20].view(1, 20, H))
    assert torch.equal(y1, y2)  # eval is deterministic
    layer.train()
    clean, logits, std = layer.router.gate_logits(x)
    expected = F.softplus(torch.tensor(0.0)).item() + 0.01  # softplus(W_noise x = 0) + eps
    assert torch.allclose(std, torch.full_like(std, expected))
    assert abs((logits - clean).std().item() - expected) < 0.02
    assert abs((logits - clean).mean().item()) < 0.02


def test_cv2_balance_loss_matches_hand_computation():
    router = Router(MoEConfig(num_experts=4, top_k=2, expert_size=4, gate="linear"), 8)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4, 8) * 10)
    x = torch.zeros(3, 8)
    x[0, 0], x[0, 1] = 1.0, 0.5      # experts 0 and 1
    x[1, 0], x[1, 1] = 1.0, 0.9      # experts 0 and 1
    x[2, 2], x[2, 3] = 1.0, 0.1      # experts 2 and 3
    r = router(x)
    w = [torch.softmax(torch.tensor([10.0, 5.0]), 0), torch.softmax(torch.tensor([10.0, 9.0]), 0),
         torch.softmax(torch.tensor([10.0, 1.0]), 0)]
    importance = torch.stack([w[0][0] + w[1][0], w[0][1] + w[1][1], w[2][0], w[2][1]])
    load = torch.tensor([2.0, 2.0, 1.0, 1.0])

    def cv2(v):  # unbiased variance over squared mean
        return v.var(unbiased=True) / v.mean() ** 2

    assert torch.equal(r.counts, load)
    assert torch.allclose(r.aux_loss, 0.01 * (cv2(importance) + cv2(load)), atol=1e-7)
    assert cv_squared(torch.ones(5)).item() == 0.0


def test_switch_balance_loss_matches_formula_and_is_one_percent_when_uniform():
    cfg = MoEConfig(num_experts=4, top_k=1, expert_size=4, gate="linear", balance_loss="switch")
    router = Router(cfg, 8)
    router.gate.reset("random")
    x = torch.randn(100, 8)
    r = router(x)
    logits = router.gate(x)
    f = torch.bincount(logits.argmax(-1), minlength=4).float() / 100
    p = torch.softmax(logits, -1).mean(0)
    assert torch.allclose(r.aux_loss, 0.01 * 4 * (f * p).sum(), atol=1e-7)
    router.gate.reset("zero")  # equal probabilities: E * sum f_i / E = 1
    assert torch.allclose(router(x).aux_loss, torch.tensor(0.01))


def test_smooth_load_gives_the_noise_weights_a_gradient():
    layer = make_layer(gate="noisy-mlp", top_k=2).train()
    x = torch.randn(1, 200, H)
    _, aux = layer(x)
    aux.backward()
    assert aux.item() > 0
    assert layer.router.gate.noise.weight.grad.abs().sum() > 0   # only through the smooth load
    assert layer.router.gate.net[0].weight.grad.abs().sum() > 0


def tiny_moe_model(**moe_kw) -> LlamaMoE:
    torch.manual_seed(0)
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_size": 8, "gate": "noisy-mlp", **moe_kw})
    return LlamaMoE(ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2, moe=moe))


def test_expert_counts_are_the_routers_choices():
    model = tiny_moe_model().eval()
    x = torch.randint(0, 40, (2, 7))
    out = model(x, labels=x)
    assert out.aux_loss.item() > 0 and sorted(model.expert_load()) == [0, 1, 2]
    layer = model.moe_layers()[1]
    with torch.no_grad():       # the same layer input, routed again by hand
        h = model.embed_tokens(x)
        cos, sin = rope_cos_sin(model.cfg, 7, x.device)
        for block in model.layers[:1]:
            h, _ = block(h, cos, sin)
        h = model.layers[1].self_attn(model.layers[1].input_layernorm(h), cos, sin) + h
        chosen = layer.router(model.layers[1].post_attention_layernorm(h).reshape(-1, 16)).indices
    counts = torch.bincount(chosen.flatten(), minlength=4).float()
    assert torch.equal(layer.last_counts, counts) and counts.sum() == 2 * 7 * 2
    assert torch.allclose(model.expert_load()[1], counts / counts.sum())


def test_training_step_updates_gates_experts_and_shared_part():
    model = tiny_moe_model(gate="linear", shared_intermediate_size=8).train()
    for m in model.moe_layers().values():
        m.router.gate.reset("zero")  # zero gate: it still learns
    x = torch.randint(0, 40, (4, 12))
    out = model(x[:, :-1], labels=x[:, 1:])
    (out.loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_permutation_functions_pass_gradcheck_and_invert_each_other():
    """The hand-written backwards of the token permutation and of the un-permute-and-sum are the exact
    adjoints of their forwards (float64 gradcheck), and permuting then summing gives k * x."""
    from trainer.moe import _PermuteTokens, _UnpermuteSum
    n, k, h = 7, 3, 4
    gen = torch.Generator().manual_seed(5)
    indices = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(n)])
    order = torch.sort(indices.reshape(-1), stable=True).indices
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    x = torch.randn(n, h, dtype=torch.float64, generator=gen, requires_grad=True)
    ys = torch.randn(n * k, h, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _PermuteTokens.apply(t, order, inverse, k), (x,))
    assert torch.autograd.gradcheck(lambda t: _UnpermuteSum.apply(t, order, inverse, k), (ys,))
    round_trip = _UnpermuteSum.apply(_PermuteTokens.apply(x, order, inverse, k), order, inverse, k)
    assert torch.allclose(round_trip, k * x)


@pytest.mark.skipif(_grouped_mm is None, reason="torch without grouped_mm")
def test_grouped_linear_gradients_match_per_expert_matmuls_in_the_weight_layout():
    from trainer.moe import _GroupedLinear
    gen = torch.Generator().manual_seed(6)
    sizes = [5, 0, 9, 2]  # an empty expert too: its weight gradient must be zero
    x = torch.randn(sum(sizes), 16, generator=gen, requires_grad=True)
    w = torch.randn(len(sizes), 24, 16, generator=gen, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    try:
        y = _GroupedLinear.apply(x, w, offs)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"grouped_mm has no CPU fp32 kernel here: {e}")
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.cat([c @ wr[e].T for e, c in enumerate(torch.split(xr, sizes))])
    ref.backward(g)
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    assert torch.allclose(w.grad, wr.grad, atol=1e-5)
    assert w.grad.is_contiguous()  # no transposed copy left for AccumulateGrad
    assert torch.count_nonzero(w.grad[1]) == 0


# The Triton kernel (trainer/kernels.py) runs here under Triton's interpreter, in a fresh process because
# TRITON_INTERPRET must be set before triton is imported. `make test` installs triton for this.
_INTERPRETED_KERNEL_CHECK = r"""
import json, torch
import trainer.kernels as kernels
from trainer.moe import MoEConfig, MoELayer
assert kernels.triton_runs_on(torch.empty(1)), "the interpreter did not take the Triton path"
torch.manual_seed(0)
errors = {}
for M, I, dtype in ((37, 40, torch.float32), (4, 16, torch.float32), (33, 24, torch.bfloat16)):
    h = torch.randn(M, 2 * I).to(dtype).requires_grad_()
    ws = torch.rand(M, 1, requires_grad=True)
    grad = torch.randn(M, I).to(dtype)
    h64, ws64 = h.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    g64, u64 = h64.chunk(2, dim=-1)
    (torch.nn.functional.silu(g64) * u64 * ws64).backward(grad.double())
    kernels.swiglu_weighted(h, ws, dtype, use_triton=True).backward(grad)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    errors[f"{M}x{I} {dtype}"] = [rel(h.grad, h64.grad), rel(ws.grad, ws64.grad)]
# a whole grouped layer, forward and every gradient, Triton against plain torch
layer = MoELayer(MoEConfig(num_experts=4, top_k=2, expert_size=24), 32)
for p in layer.parameters():
    torch.nn.init.normal_(p, std=0.2)
x = torch.randn(1, 30, 32)
out = {}
for use in (None, False):
    layer.impl, layer.experts.triton_kernels = "grouped", use
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y, aux = layer(xi)
    (y.square().sum() + aux).backward()
    out[use] = [y.detach(), xi.grad] + [p.grad for p in layer.parameters()]
errors["layer"] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out[None], out[False]))
print(json.dumps(errors))
"""


@pytest.mark.skipif(_grouped_mm is None, reason="torch without grouped_mm")
def test_triton_swiglu_backward_kernel_matches_float64_under_the_interpreter():
    """d(gate), d(up) and the routing weights' gradient from the one-pass Triton backward agree with
    float64 autograd (fp32 and bf16 inputs, to their rounding), and a grouped layer
    gives the same output and gradients with the kernel as without."""
    pytest.importorskip("triton", reason="`make test` installs triton; the kernel is checked through its interpreter")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNEL_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (dh, dws) in ((k, v) for k, v in errors.items() if k != "layer"):
        if "float32" in name:
            assert dh < 1e-6 and dws < 1e-6, (name, dh, dws)
        else:
            # d(gate), d(up) are written in bf16 (unit roundoff 2^-8); the weights' gradient is summed and
            # returned in fp32, so it stays at fp32 accuracy where the plain-torch path rounds to bf16
            assert dh < 2 ** -7 and dws < 1e-5, (name, dh, dws)
    assert errors["layer"] < 1e-5, errors["layer"]
