"""How fast are our MoE experts? Training throughput side by side, in one run.

Variants (bf16 autocast on CUDA, fp32 weights, fused AdamW, blocks compiled unless --no-compile):
  dense-matched   our LLaMA with a dense FFN of top_k * expert_size neurons: the same FLOPs per token
  dense-full      our LLaMA with the original FFN (experts * expert_size neurons)
  moe-fused       our LLaMA-MoE, experts through trainer/fused_moe.py: the token permutation inside
                  Triton expert GEMMs (gather on load, scatter on store), forward and backward
  moe-grouped     our LLaMA-MoE, experts through torch.nn.functional.grouped_mm
  moe-grouped-torch   the same without trainer/kernels.py's Triton kernel (the activation's backward
                  as inductor compiles it)
  moe-loop        the same model, one expert at a time (what LLaMA-MoE does; it syncs once per layer)
  hf-grouped      transformers' MixtralForCausalLM with experts_implementation="grouped_mm" (stock, eager)
  hf-eager        the same with transformers' per-expert loop (slow; not run unless asked)

It times one MoE layer alone (forward + backward) and the whole model (forward, backward, optimizer
step), and reports tokens/s, MFU and peak memory, plus the ratios the targets are stated in. With
--rounds R the models are timed R times each, interleaved (A B C A B C ...), so drift on the machine
shows as spread rather than as a difference between variants. Before timing it checks on the device
that the grouped and fused paths agree with the loop (fresh random inputs, gradients included, an idle
expert) and never sync with the host.

  PYTHONPATH=$PWD python benchmarks/moe_speed.py --out moe_speed.json                 # random, d=1024
  PYTHONPATH=$PWD python benchmarks/moe_speed.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
      --experts 8 --top-k 2 --batch 16 --seq 2048 --out smol.json                       # real weights
  PYTHONPATH=$PWD python benchmarks/moe_speed.py --preset smollm2 --batch 64 --seq 512 \
      --out smol.json                                                                   # SmolLM2's shape, random
  python benchmarks/moe_speed.py --smoke --out /tmp/smoke.json                          # CPU, seconds

Needs only torch and transformers (and gguf for --gguf) besides this repository.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainer.model import LlamaMoE, ModelConfig  # noqa: E402
from trainer.moe import MLP, MoEConfig, MoELayer  # noqa: E402

ALL_VARIANTS = ("dense-matched", "dense-full", "moe-fused", "moe-grouped", "moe-grouped-torch", "moe-loop", "hf-grouped",
                "hf-eager")
DEFAULT_VARIANTS = ("dense-matched", "dense-full", "moe-fused", "moe-grouped", "moe-loop", "hf-grouped")
MOE_LAYER_KINDS = ("moe-fused", "moe-grouped", "moe-grouped-torch", "moe-loop")
# SmolLM2-135M's shape (random weights): what `--gguf SmolLM2-135M...` times, without carrying the file
PRESETS = {"smollm2": {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152, "experts": 8,
                       "top_k": 2, "expert_size": 192, "tie_embeddings": True}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--gguf", help="a LLaMA .gguf (e.g. SmolLM2-135M): real weights, converted by independent-random")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a random-weight model of a known shape (overrides the size options)")
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-size", type=int, default=256, help="random config only (GGUF: FFN / experts)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--tokens", help="a `curate tokenize` output: train on the micro-batches `curate train`'s stream "
                                    "draws from it (static Sheared weights) instead of uniform random tokens")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=1, help="time every model this many times, interleaved")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list from {','.join(ALL_VARIANTS)}")
    p.add_argument("--no-compile", action="store_true", help="run our models eagerly")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for every variant's blocks, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--no-layer", action="store_true", help="skip the single-layer timing")
    p.add_argument("--layer-variants", default=None, help="comma list of variants timed as one layer (default: --variants)")
    p.add_argument("--profile", action="store_true", help="also profile moe-grouped and print the top kernels")
    p.add_argument("--profile-variants", default="moe-grouped",
                   help="comma list of variants --profile profiles (a whole step, optimizer included)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: 989 on H100 SXM, 756 PCIe)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (overriding the size options), 1+1 steps: a correctness run for CI")
    a = p.parse_args(argv)
    for key, value in PRESETS.get(a.preset, {}).items():
        setattr(a, key, value)
    if a.smoke:
        a.hidden, a.layers, a.heads, a.experts, a.top_k, a.expert_size = 64, 2, 4, 4, 2, 32
        a.vocab = 256 if a.tokens is None else a.vocab
        a.batch, a.seq, a.steps, a.warmup, a.no_compile = 2, 32, 1, 1, True
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    a.layer_variants = a.variants if a.layer_variants is None else [v.strip() for v in a.layer_variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in ALL_VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {ALL_VARIANTS}")
    return a


# ------------------------------------------------------------------------------------------- models

def build_models(a, device) -> tuple[dict, dict, ModelConfig]:
    """CPU fp32 builders for every variant: name -> () -> (module, ModelConfig, is_hf)."""
    if a.gguf:
        from trainer.checkpoint_io import load_model
        from trainer.construct import ConvertConfig, build_moe

        dense, dcfg = load_model(a.gguf)
        moe, mcfg = build_moe(copy.deepcopy(dense), ConvertConfig(
            experts=a.experts, top_k=a.top_k, method="independent-random", gate="linear", gate_init="random"),
            log=lambda s: print("  " + s))
        source = f"{a.gguf} (real weights; MoE by independent-random, linear gate)"
    else:
        dcfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.experts * a.expert_size,
                           num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, max_seq_len=a.seq,
                           rope_theta=10000.0, tie_embeddings=a.tie_embeddings)
        dense = None
        mcfg = ModelConfig(**{**dcfg.to_dict(), "moe": MoEConfig(
            num_experts=a.experts, top_k=a.top_k, expert_size=a.expert_size, gate="linear")})
        moe = None
        source = f"random weights{f' ({a.preset} shape)' if a.preset else ''}"
    mcfg.max_seq_len = dcfg.max_seq_len = max(dcfg.max_seq_len, a.seq)
    m = mcfg.moe
    matched = ModelConfig(**{**dcfg.to_dict(), "intermediate_size": m.top_k * m.expert_size, "moe": None})

    grouped = grouped_impl(a, device)

    def ours(cfg, model=None, impl="auto", triton_kernels=None):
        def make():
            mod = copy.deepcopy(model) if model is not None else LlamaMoE(cfg)
            mod.set_expert_impl(impl)
            for layer in mod.moe_layers().values():
                layer.experts.triton_kernels = triton_kernels
            return mod, cfg, False
        return make

    def hf(impl):
        def make():
            from trainer.export import to_mixtral
            src = moe if moe is not None else LlamaMoE(mcfg)
            model = to_mixtral(src, mcfg)
            set_hf_experts(model, impl)
            return model, mcfg, True
        return make

    builders = {
        "dense-matched": ours(matched),
        "dense-full": ours(dcfg, dense),
        "moe-fused": ours(mcfg, moe, "fused"),
        "moe-grouped": ours(mcfg, moe, grouped),
        "moe-loop": ours(mcfg, moe, "loop"),
        "moe-grouped-torch": ours(mcfg, moe, grouped, False),
        "hf-grouped": hf("grouped_mm"),
        "hf-eager": hf("eager"),
    }
    info = {"source": source, "dense_config": dcfg.to_dict(), "moe_config": {**mcfg.to_dict(), "moe": {
        k: v for k, v in m.to_dict().items() if k != "partition"}}, "matched_dense_ffn": matched.intermediate_size}
    return builders, info, mcfg


def grouped_impl(a, device) -> str:
    """The expert path the moe-grouped variants force: grouped_mm on CUDA (and in the CPU smoke run)."""
    return "grouped" if device.type == "cuda" or a.smoke else "auto"


def set_hf_experts(model, impl: str) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:  # older transformers: the config attribute is read at forward time
        model.config._experts_implementation = impl


# ------------------------------------------------------------------------------------------- timing

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def training_batches(a, vocab_size: int, count: int = 8) -> list[torch.Tensor]:
    """The micro-batches every model trains on, cycled: uniform random tokens (two batches), or with
    --tokens the first `count` that `curate train` would draw. Real text routes unevenly (frequent
    tokens pick the same experts) where random tokens spread evenly, and that changes the expert GEMMs."""
    if not a.tokens:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (a.batch, a.seq + 1), generator=gen) for _ in range(2)]
    from samplers.config import SamplerConfig
    from samplers.packed import PackedTokens
    from samplers.stream import DomainStream

    tokens = PackedTokens(a.tokens)
    if tokens.vocab_size > vocab_size:
        raise SystemExit(f"--tokens {a.tokens}: its tokenizer has {tokens.vocab_size} ids, the model {vocab_size}")
    stream = DomainStream(tokens, SamplerConfig.from_dict({"kind": "static", "preset": "sheared"}),
                          seq_len=a.seq)
    try:
        return [torch.as_tensor(stream.next_batch(a.batch)[0]) for _ in range(count)]
    finally:
        stream.close()


class TrainingRun:
    """One model's training loop, kept alive so that several models can be timed in turns."""

    def __init__(self, model, cfg: ModelConfig, is_hf: bool, a, device):
        self.model, self.cfg, self.is_hf, self.a, self.device = model.to(device).train(), cfg, is_hf, a, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        self.batches = [b.to(device) for b in training_batches(a, cfg.vocab_size)]
        self.i = 0
        # parameters, their gradients and AdamW's two moments: what this model holds whatever runs beside it
        self.static_bytes = 4 * sum(p.numel() * p.element_size() for p in model.parameters())

    def step(self) -> torch.Tensor:
        seq = self.batches[self.i % len(self.batches)]
        self.i += 1
        with autocast(self.device):
            if self.is_hf:
                loss = self.model(input_ids=seq[:, :-1], labels=seq[:, :-1]).loss
            else:
                out = self.model(seq[:, :-1], labels=seq[:, 1:], skip_logits=True)
                loss = out.loss + out.aux_loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def time(self, steps: int) -> dict:
        a, device = self.a, self.device
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        losses = [self.step() for _ in range(steps)]
        sync(device)
        dt = time.perf_counter() - t0
        r = {"tokens_per_s": a.batch * a.seq * steps / dt, "step_ms": 1000 * dt / steps,
             "final_loss": float(losses[-1]), "flops_per_token": self.cfg.flops_per_token(a.seq)}
        if device.type == "cuda":
            # this model's own peak, as if it ran alone: activations on top of its static state
            r["peak_gib"] = (torch.cuda.max_memory_allocated() - before + self.static_bytes) / 2**30
        return r


def time_training(runs: dict[str, TrainingRun], a) -> dict:
    """Warm every model up, then time each `a.rounds` times in turns; the median round is reported."""
    out: dict[str, dict] = {}
    for name, run in runs.items():
        try:
            for _ in range(a.warmup):
                run.step()
        except torch.OutOfMemoryError as e:
            out[name] = {"error": f"out of memory: {str(e)[:200]}"}
    timed = [n for n in runs if n not in out]
    rounds: dict[str, list[dict]] = {n: [] for n in timed}
    for _ in range(a.rounds):
        for name in timed:
            rounds[name].append(runs[name].time(a.steps))
    for name in timed:
        by_speed = sorted(rounds[name], key=lambda r: r["tokens_per_s"])
        out[name] = {**by_speed[len(by_speed) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds[name]]}
    return out


def time_layer(kind: str, mcfg: ModelConfig, a, device) -> dict:
    """One FFN layer alone, forward + backward on [batch, seq, hidden]."""
    m, H = mcfg.moe, mcfg.hidden_size
    torch.manual_seed(0)
    if kind == "dense-matched":
        layer = MLP(H, m.top_k * m.expert_size)
    elif kind in MOE_LAYER_KINDS:
        layer = MoELayer(m, H)
        layer.router.gate.reset("random")
        layer.impl = {"moe-loop": "loop", "moe-fused": "fused"}.get(kind, grouped_impl(a, device))
        layer.experts.triton_kernels = False if kind == "moe-grouped-torch" else None
        torch.nn.init.normal_(layer.experts.gate_up_proj, std=0.02)
        torch.nn.init.normal_(layer.experts.down_proj, std=0.02)
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        from trainer.export import mixtral_config
        hcfg = mixtral_config(mcfg)
        hcfg._experts_implementation = "grouped_mm" if kind == "hf-grouped" else "eager"
        layer = MixtralSparseMoeBlock(hcfg)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02)
    layer.to(device).train()
    run = layer
    if not a.no_compile and kind in ("dense-matched", "moe-fused", "moe-grouped", "moe-grouped-torch"):
        run = torch.compile(layer, mode=a.compile_mode)
    x = torch.randn(a.batch, a.seq, H, device=device, requires_grad=True)
    t0 = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sync(device)
            t0 = time.perf_counter()
        with autocast(device):
            y = run(x)
            y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()
    sync(device)
    dt = time.perf_counter() - t0
    r = {"tokens_per_s": a.batch * a.seq * a.steps / dt, "ms": 1000 * dt / a.steps}
    if device.type == "cuda":
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return r


# ------------------------------------------------------------------------------------------- checks

def _fused_runs(device) -> bool:
    from trainer import fused_moe
    from trainer.kernels import triton_runs_on
    return fused_moe.available() and triton_runs_on(torch.empty(0, device=device))


def check_grouped(mcfg: ModelConfig, device) -> dict:
    """On this device, fresh random inputs (the seed is recorded): the grouped and fused paths against the
    exact loop, forward and gradients (input, gate, both expert weights), through a whole layer; the fused
    path also on skewed loads with an idle expert; and no host sync on either path."""
    m, H = mcfg.moe, mcfg.hidden_size
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    layer = MoELayer(m, H).to(device)
    layer.router.gate.reset("random")
    for p in (layer.experts.gate_up_proj, layer.experts.down_proj):
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 256, H, device=device)
    fused = _fused_runs(device)
    results = {}
    # (impl, triton_kernels): the exact loop, the grouped path, the grouped path without the Triton
    # kernel, the fused path
    paths = [("loop", "loop", None), ("grouped", "grouped", None), ("grouped-torch", "grouped", False)]
    paths += [("fused", "fused", None)] if fused else []
    for name, impl, triton_kernels in paths:
        layer.impl, layer.experts.triton_kernels = impl, triton_kernels
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with autocast(device):
            y, aux = layer(xi)
        (y.float().square().mean() + aux).backward()
        results[name] = (y.float().detach(), xi.grad.float(), layer.router.gate.weight.grad.float(),
                         layer.experts.gate_up_proj.grad.float(), layer.experts.down_proj.grad.float())
    layer.experts.triton_kernels = None

    def rel(a, b, norm=False):
        # largest difference over the largest reference value (what earlier runs recorded), or relative norm error
        r = [(((g - l).norm() / l.norm()) if norm else ((g - l).abs().max() / l.abs().max())).item()
             for g, l in zip(results[a], results[b])]
        return dict(zip(("output", "grad_input", "grad_gate", "grad_gate_up", "grad_down"), r))
    out = {"seed": seed, "grouped_vs_loop_rel_max": rel("grouped", "loop"),
           "triton_vs_torch_kernels_rel_max": rel("grouped", "grouped-torch"),
           "grouped_vs_loop_rel_norm": rel("grouped", "loop", norm=True)}
    if fused:
        out["fused_vs_loop_rel_max"] = rel("fused", "loop")
        out["fused_vs_loop_rel_norm"] = rel("fused", "loop", norm=True)
        out["fused_vs_grouped_rel_norm"] = rel("fused", "grouped", norm=True)
        out["fused_skewed_loads"] = check_fused_skewed(m, H, device, seed)
    if device.type == "cuda":
        for impl in ("grouped",) + (("fused",) if fused else ()):
            layer.impl = impl
            xi = x.clone().requires_grad_()
            sync(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                with autocast(device):
                    y, aux = layer(xi)
                (y.float().square().mean() + aux).backward()
                out[f"host_sync_free_{impl}"] = True
            except RuntimeError as e:
                out[f"host_sync_free_{impl}"] = f"no: {e}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
    return out


def check_fused_skewed(m: MoEConfig, H: int, device, seed: int) -> dict:
    """The experts alone on loads no router gives at init: one expert takes most pairs, one gets none.
    bf16 fused and grouped paths against the fp32 loop on the same bf16-representable inputs."""
    from trainer.moe import Experts

    gen = torch.Generator().manual_seed(seed)
    E, k, N = m.num_experts, m.top_k, 1000
    ex = Experts(E, H, m.expert_size)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).bfloat16())
    ex.to(device)
    idle = 1 + seed % (E - 1)
    popularity = torch.rand(E, generator=gen) + 0.1
    popularity[0], popularity[idle] = 4 * E, 0
    indices = torch.multinomial(popularity.expand(N, E), k, replacement=False, generator=gen).to(device)
    weights = torch.rand(N, k, generator=gen).to(device)
    x = torch.randn(N, H, generator=gen).bfloat16().to(device)
    grad = torch.randn(N, H, generator=gen).to(device)
    got = {}
    for impl in ("loop", "grouped", "fused"):
        dt = torch.float32 if impl == "loop" else torch.bfloat16
        ex.zero_grad(set_to_none=True)
        ex.to(dt)
        xi, wi = x.to(dt).clone().requires_grad_(), weights.clone().requires_grad_()
        y = ex(xi, indices, wi, impl)
        (y.float() * grad).sum().backward()
        got[impl] = [t.detach().double() for t in (y, xi.grad, wi.grad, ex.gate_up_proj.grad, ex.down_proj.grad)]
    ex.float()
    names = ("output", "grad_input", "grad_routing_weights", "grad_gate_up", "grad_down")
    rel = lambda a: {n: ((f - l).norm() / l.norm()).item() for n, f, l in zip(names, got[a], got["loop"])}  # noqa: E731
    return {"loads": torch.bincount(indices.flatten(), minlength=E).tolist(), "fused_vs_loop_rel": rel("fused"),
            "grouped_vs_loop_rel": rel("grouped"),
            "idle_expert_grad_max": max(got["fused"][3][idle].abs().max().item(), got["fused"][4][idle].abs().max().item())}


# Kernel name patterns -> what the kernel does, checked in order (compiled Triton kernels first: their
# names list the ops they fused, which would otherwise match the later patterns).
KERNEL_CATEGORIES = (
    ("fused expert GEMMs (trainer/fused_moe.py)", ("_moe_gemm_kernel", "_moe_wgrad_kernel"), ()),
    ("permutation gathers (compiled)", ("triton_",), ("index_select", "gather")),
    ("norms, activations, rope (compiled)", ("triton_",), ()),
    ("expert grouped GEMMs", ("cutlass",), ()),
    ("expert activation backward (trainer/kernels.py)", ("_swiglu_weighted",), ()),
    ("GEMMs", ("nvjet", "gemm", "Gemm", "splitK", "xmma"), ()),
    ("attention", ("sdpa", "flash", "fmha", "cudnn"), ()),
    ("loss (log-softmax over the vocabulary)", ("SoftMax", "softmax", "nll"), ()),
    ("optimizer (fused AdamW)", ("multi_tensor_apply", "adam"), ()),
    ("sort, top-k, searchsorted", ("sort", "Sort", "radix", "Radix", "topk", "TopK", "bitonic", "searchsorted"), ()),
    ("casts and copies", ("copy", "Copy", "cast"), ()),
    ("scatter, index, fill, reductions", ("scatter", "index", "fill", "Fill", "memset", "Memset", "reduce", "Reduce"), ()),
)


def kernel_category(name: str) -> str:
    for category, patterns, also in KERNEL_CATEGORIES:
        if any(p in name for p in patterns) and (not also or any(p in name for p in also)):
            return category
    return "other"


def profile_moe(run: TrainingRun, a, device) -> dict:
    """Profile two whole steps (optimizer included) of an already warm model: the top ops, and every GPU
    kernel's time per step summed by what it does (KERNEL_CATEGORIES), which is what the dense-vs-MoE
    comparison reads."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            run.step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)
    print(table)
    events = prof.key_averages()
    # GPU-side events, less the profiler's own ranges ("Optimizer.step#AdamW.step" spans the optimizer's
    # kernels, which are counted themselves)
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA and not e.key.startswith(("Optimizer.", "ProfilerStep"))),
                     key=lambda e: getattr(e, key), reverse=True)
    categories: dict[str, float] = {}
    for e in kernels:
        cat = kernel_category(e.key)
        categories[cat] = categories.get(cat, 0.0) + getattr(e, key) / 2 / 1000
    return {"ms_per_step_by_category": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "kernels": [{"name": e.key, "category": kernel_category(e.key), "calls_per_step": e.count / 2,
                         "ms_per_step": getattr(e, key) / 2 / 1000} for e in kernels]}


def print_profile_comparison(results: dict) -> None:
    """GPU time per step by category for every profiled variant side by side, and MoE minus dense."""
    profiled = {k[len("profile_"):]: v["ms_per_step_by_category"] for k, v in results.items() if k.startswith("profile_")}
    if not profiled:
        return

    def ms(variant: dict, category: str) -> float:
        return sum(variant.values()) if category == "total" else variant.get(category, 0.0)

    cats = sorted({c for v in profiled.values() for c in v}, key=lambda c: -max(ms(v, c) for v in profiled.values()))
    moes = [n for n in ("moe_grouped", "moe_fused") if n in profiled] if "dense_matched" in profiled else []
    print(f"\nGPU ms per step by kernel category\n{'category':44s}" + "".join(f"{n:>15s}" for n in profiled)
          + "".join(f"{n[4:] + ' - dense':>17s}" for n in moes))
    for c in cats + ["total"]:
        extra = "".join(f"{ms(profiled[n], c) - ms(profiled['dense_matched'], c):>+17.2f}" for n in moes)
        print(f"{c:44s}" + "".join(f"{ms(v, c):>15.2f}" for v in profiled.values()) + extra)


# ---------------------------------------------------------------------------------------------- main

def device_info(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def peak_flops(a, device) -> float | None:
    from trainer.metrics import peak_flops as known_peak     # the trainer's table: comparable MFU

    return a.peak_tflops * 1e12 if a.peak_tflops else known_peak(device)


def main(argv=None) -> int:
    started = time.perf_counter()
    a = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {device_info(device)}")
    if not _fused_runs(device):
        # the fused kernels need triton on CUDA (or its interpreter): time what runs here
        dropped = "moe-fused" in a.variants + a.layer_variants
        a.variants = [v for v in a.variants if v != "moe-fused"]
        a.layer_variants = [v for v in a.layer_variants if v != "moe-fused"]
        if dropped:
            print("moe-fused skipped: triton does not run on this device (set TRITON_INTERPRET=1 to check it on CPU)")
    builders, info, mcfg = build_models(a, device)
    peak = peak_flops(a, device)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device_info(device), "args": vars(a), **info,
               "checks": check_grouped(mcfg, device), "layer": {}, "model": {}}
    print(f"checks: {results['checks']}")
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every phase: a run stopped at its time limit keeps what it measured
        results["elapsed_s"] = time.perf_counter() - started
        out_path.write_text(json.dumps(results, indent=1, default=str))
    save()

    if not a.no_layer:
        for kind in ("dense-matched", "moe-fused", "moe-grouped", "moe-grouped-torch", "moe-loop", "hf-grouped"):
            if kind in a.layer_variants or kind == "dense-matched":
                results["layer"][kind] = time_layer(kind, mcfg, a, device)
                print(f"[{time.perf_counter() - started:.0f}s] layer {kind:14s} {results['layer'][kind]['tokens_per_s']:>12,.0f} tokens/s")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    runs = {}
    for name in a.variants:
        model, cfg, is_hf = builders[name]()
        if not is_hf and not a.no_compile:  # moe-loop too: its per-layer sync splits the graph, the rest compiles
            for block in model.layers:
                block.compile(mode=a.compile_mode)
        runs[name] = TrainingRun(model, cfg, is_hf, a, device)
    for name, r in time_training(runs, a).items():
        if peak and "tokens_per_s" in r:
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        results["model"][name] = r
        spread = " ".join(f"{t:,.0f}" for t in r.get("rounds_tokens_per_s", []))
        print(f"[{time.perf_counter() - started:.0f}s] model {name:14s} " + (
            f"{r['tokens_per_s']:>12,.0f} tokens/s (rounds: {spread})" if "tokens_per_s" in r else r["error"]))
    save()

    if a.profile:
        for name in a.profile_variants.split(","):
            print(f"\n---- profile: {name}")
            results[f"profile_{name.replace('-', '_')}"] = profile_moe(runs[name], a, device)
            save()

    results["ratios"] = ratios(results)
    print_profile_comparison(results)
    print_table(results)
    save()
    print(f"[{time.perf_counter() - started:.0f}s] wrote {a.out}")
    return 0


def ratios(results: dict) -> dict:
    out = {}
    for level in ("layer", "model"):
        r = {k: v["tokens_per_s"] for k, v in results[level].items() if "tokens_per_s" in v}
        for moe in ("moe-fused", "moe-grouped"):
            if moe not in r:
                continue
            for ref in ("dense-matched", "moe-grouped", "moe-loop", "hf-grouped", "hf-eager", "dense-full", "moe-grouped-torch"):
                if ref in r and ref != moe:
                    out[f"{level}: {moe} / {ref}"] = r[moe] / r[ref]
    return out


def print_table(results: dict) -> None:
    print(f"\n{'level':6s} {'variant':14s} {'tokens/s':>12s} {'MFU':>6s} {'peak GiB':>9s}")
    for level in ("layer", "model"):
        for name, r in results[level].items():
            if "tokens_per_s" not in r:
                print(f"{level:6s} {name:14s} {r.get('error', '')}")
                continue
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            mem = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
            print(f"{level:6s} {name:14s} {r['tokens_per_s']:>12,.0f} {mfu:>6s} {mem:>9s}")
    for k, v in results["ratios"].items():
        print(f"{k}: {v:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
