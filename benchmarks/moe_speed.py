"""How fast are our MoE experts? Training throughput side by side, in one run.

Variants (bf16 autocast on CUDA, fp32 weights, fused AdamW, blocks compiled unless --no-compile):
  dense-matched   our LLaMA with a dense FFN of top_k * expert_size neurons: the same FLOPs per token
  dense-full      our LLaMA with the original FFN (experts * expert_size neurons)
  moe-grouped     our LLaMA-MoE, experts through torch.nn.functional.grouped_mm
  moe-grouped-torch   the same without trainer/kernels.py's Triton kernel (the activation's backward
                  as inductor compiles it)
  moe-loop        the same model, one expert at a time (what LLaMA-MoE does; it syncs once per layer)
  hf-grouped      transformers' MixtralForCausalLM with experts_implementation="grouped_mm" (stock, eager)
  hf-eager        the same with transformers' per-expert loop (slow; not run unless asked)

It times one MoE layer alone (forward + backward) and the whole model (forward, backward, optimizer
step), and reports tokens/s, MFU and peak memory, plus the ratios the targets are stated in. Before
timing it checks on the device that the grouped path agrees with the loop and never syncs with the host.

  PYTHONPATH=$PWD python benchmarks/moe_speed.py --out moe_speed.json                 # random, d=1024
  PYTHONPATH=$PWD python benchmarks/moe_speed.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
      --experts 8 --top-k 2 --batch 16 --seq 2048 --out smol.json                       # real weights
  python benchmarks/moe_speed.py --smoke --out /tmp/smoke.json                          # CPU, seconds

Needs only torch and transformers (and gguf for --gguf) besides this repository.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainer.model import LlamaMoE, ModelConfig  # noqa: E402
from trainer.moe import MLP, MoEConfig, MoELayer  # noqa: E402

ALL_VARIANTS = ("dense-matched", "dense-full", "moe-grouped", "moe-grouped-torch", "moe-loop", "hf-grouped", "hf-eager")
DEFAULT_VARIANTS = ("dense-matched", "dense-full", "moe-grouped", "moe-loop", "hf-grouped")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--gguf", help="a LLaMA .gguf (e.g. SmolLM2-135M): real weights, converted by independent-random")
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
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list from {','.join(ALL_VARIANTS)}")
    p.add_argument("--no-compile", action="store_true", help="run our models eagerly")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for every variant's blocks, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--no-layer", action="store_true", help="skip the single-layer timing")
    p.add_argument("--profile", action="store_true", help="also profile moe-grouped and print the top kernels")
    p.add_argument("--profile-variants", default="moe-grouped",
                   help="comma list of variants --profile profiles (a whole step, optimizer included)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: 989 on H100 SXM, 756 PCIe)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (overriding the size options), 1+1 steps: a correctness run for CI")
    a = p.parse_args(argv)
    if a.smoke:
        a.hidden, a.layers, a.heads, a.vocab, a.experts, a.top_k, a.expert_size = 64, 2, 4, 256, 4, 2, 32
        a.batch, a.seq, a.steps, a.warmup, a.no_compile = 2, 32, 1, 1, True
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in ALL_VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {ALL_VARIANTS}")
    return a


# ------------------------------------------------------------------------------------------- models

def build_models(a, device) -> tuple[dict, dict, ModelConfig]:
    """CPU fp32 builders for every variant: name -> () -> (module, ModelConfig, is_hf)."""
    if a.gguf:
        from trainer.checkpoint_io import load_model
        from trainer.construct import ConvertSettings, build_moe

        dense, dcfg = load_model(a.gguf)
        moe, mcfg = build_moe(copy.deepcopy(dense), ConvertSettings(
            experts=a.experts, top_k=a.top_k, method="independent-random", gate="linear", gate_init="random"),
            log=lambda s: print("  " + s))
        source = f"{a.gguf} (real weights; MoE by independent-random, linear gate)"
    else:
        dcfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.experts * a.expert_size,
                           num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, max_seq_len=a.seq,
                           rope_theta=10000.0, tie_embeddings=False)
        dense = None
        mcfg = ModelConfig(**{**dcfg.to_dict(), "moe": MoEConfig(
            num_experts=a.experts, top_k=a.top_k, expert_size=a.expert_size, gate="linear")})
        moe = None
        source = "random weights"
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


def time_training(model, cfg: ModelConfig, is_hf: bool, a, device) -> dict:
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=gen).to(device) for _ in range(2)]
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sync(device)
            t0 = time.perf_counter()
        seq = batches[i % 2]
        with autocast(device):
            if is_hf:
                loss = model(input_ids=seq[:, :-1], labels=seq[:, :-1]).loss
            else:
                out = model(seq[:, :-1], labels=seq[:, 1:], skip_logits=True)
                loss = out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync(device)
    dt = time.perf_counter() - t0
    tokens_per_s = a.batch * a.seq * a.steps / dt
    r = {"tokens_per_s": tokens_per_s, "step_ms": 1000 * dt / a.steps,
         "final_loss": float(losses[-1]), "flops_per_token": cfg.flops_per_token(a.seq)}
    if device.type == "cuda":
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del opt
    return r


def time_layer(kind: str, mcfg: ModelConfig, a, device) -> dict:
    """One FFN layer alone, forward + backward on [batch, seq, hidden]."""
    m, H = mcfg.moe, mcfg.hidden_size
    torch.manual_seed(0)
    if kind == "dense-matched":
        layer = MLP(H, m.top_k * m.expert_size)
    elif kind in ("moe-grouped", "moe-grouped-torch", "moe-loop"):
        layer = MoELayer(m, H)
        layer.router.gate.reset("random")
        layer.impl = "loop" if kind == "moe-loop" else grouped_impl(a, device)
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
    if not a.no_compile and kind in ("dense-matched", "moe-grouped", "moe-grouped-torch"):
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

def check_grouped(mcfg: ModelConfig, device) -> dict:
    """On this device: grouped path vs the exact loop (forward and gradients), and no host sync."""
    m, H = mcfg.moe, mcfg.hidden_size
    torch.manual_seed(1)
    layer = MoELayer(m, H).to(device)
    layer.router.gate.reset("random")
    for p in (layer.experts.gate_up_proj, layer.experts.down_proj):
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 256, H, device=device)
    results = {}
    # (impl, triton_kernels): the exact loop, the grouped path, and the grouped path without the Triton kernel
    for name, impl, triton_kernels in (("loop", "loop", None), ("grouped", "grouped", None),
                                       ("grouped-torch", "grouped", False)):
        layer.impl, layer.experts.triton_kernels = impl, triton_kernels
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with autocast(device):
            y, aux = layer(xi)
        (y.float().square().mean() + aux).backward()
        results[name] = (y.float().detach(), xi.grad.float(), layer.experts.gate_up_proj.grad.float())
    layer.experts.triton_kernels = None

    def rel(a, b):
        r = [((g - l).abs().max() / l.abs().max().clamp_min(1e-12)).item() for g, l in zip(results[a], results[b])]
        return {"output": r[0], "grad_input": r[1], "grad_gate_up": r[2]}
    out = {"grouped_vs_loop_rel_max": rel("grouped", "loop"),
           "triton_vs_torch_kernels_rel_max": rel("grouped", "grouped-torch")}
    if device.type == "cuda":
        layer.impl = "grouped"
        xi = x.clone().requires_grad_()
        sync(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with autocast(device):
                y, aux = layer(xi)
            (y.float().square().mean() + aux).backward()
            out["host_sync_free"] = True
        except RuntimeError as e:
            out["host_sync_free"] = f"no: {e}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out


# Kernel name patterns -> what the kernel does, checked in order (compiled Triton kernels first: their
# names list the ops they fused, which would otherwise match the later patterns).
KERNEL_CATEGORIES = (
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


def profile_moe(make, a, device) -> dict:
    """Profile two whole steps (optimizer included): the top ops, and every GPU kernel's time per
    step summed by what it does (KERNEL_CATEGORIES), which is what the dense-vs-MoE comparison reads."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, cfg, _ = make()
    model.to(device).train()
    if not a.no_compile:
        for block in model.layers:
            block.compile(mode=a.compile_mode)
    seq = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        with autocast(device):
            out = model(seq[:, :-1], labels=seq[:, 1:], skip_logits=True)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
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
    diff = "dense_matched" in profiled and "moe_grouped" in profiled
    print(f"\nGPU ms per step by kernel category\n{'category':42s}" + "".join(f"{n:>15s}" for n in profiled)
          + (f"{'moe - dense':>13s}" if diff else ""))
    for c in cats + ["total"]:
        extra = f"{ms(profiled['moe_grouped'], c) - ms(profiled['dense_matched'], c):>+13.2f}" if diff else ""
        print(f"{c:42s}" + "".join(f"{ms(v, c):>15.2f}" for v in profiled.values()) + extra)


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
    a = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {device_info(device)}")
    builders, info, mcfg = build_models(a, device)
    peak = peak_flops(a, device)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device_info(device), "args": vars(a), **info,
               "checks": check_grouped(mcfg, device), "layer": {}, "model": {}}
    print(f"checks: {results['checks']}")

    if not a.no_layer:
        for kind in ("dense-matched", "moe-grouped", "moe-grouped-torch", "moe-loop", "hf-grouped"):
            if kind in a.variants or kind == "dense-matched":
                results["layer"][kind] = time_layer(kind, mcfg, a, device)
                print(f"layer {kind:14s} {results['layer'][kind]['tokens_per_s']:>12,.0f} tokens/s")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    for name in a.variants:
        model, cfg, is_hf = builders[name]()
        if not is_hf and not a.no_compile:  # moe-loop too: its per-layer sync splits the graph, the rest compiles
            for block in model.layers:
                block.compile(mode=a.compile_mode)
        try:
            r = time_training(model, cfg, is_hf, a, device)
        except torch.OutOfMemoryError as e:
            r = {"error": f"out of memory: {str(e)[:200]}"}
        if peak and "tokens_per_s" in r:
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        results["model"][name] = r
        print(f"model {name:14s} " + (f"{r['tokens_per_s']:>12,.0f} tokens/s" if "tokens_per_s" in r else r["error"]))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if a.profile:
        for name in a.profile_variants.split(","):
            print(f"\n---- profile: {name}")
            results[f"profile_{name.replace('-', '_')}"] = profile_moe(builders[name], a, device)

    results["ratios"] = ratios(results)
    print_profile_comparison(results)
    print_table(results)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {a.out}")
    return 0


def ratios(results: dict) -> dict:
    out = {}
    for level in ("layer", "model"):
        r = {k: v["tokens_per_s"] for k, v in results[level].items() if "tokens_per_s" in v}
        if "moe-grouped" not in r:
            continue
        for ref in ("dense-matched", "moe-loop", "hf-grouped", "hf-eager", "dense-full", "moe-grouped-torch"):
            if ref in r:
                out[f"{level}: moe-grouped / {ref}"] = r["moe-grouped"] / r[ref]
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
