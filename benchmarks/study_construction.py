"""The LLaMA-MoE expert-construction comparison in miniature, on a real pretrained LLaMA.

SmolLM2-135M (LLaMA architecture, FFN 1536) is converted into 8 experts of 192 neurons, top-2, by each
construction method (with the paper's rescale, and IndependentRandom once without it), and each MoE is
continually pre-trained for the same token budget on the tokenized real RedPajama sample with the
same seed and static Sheared-LLaMA weights. A last run compares the dynamic sheared-paper rule on the
IndependentRandom MoE. Per-domain held-out loss is measured before and after, against the dense
model's loss on the same sequences.

Run on the GPU, a few runs per call (each writes OUT/<run>.json):

    python benchmarks/study_construction.py run --gguf SmolLM2.gguf --tokens TOKDIR --out OUT \
        --runs random clustering --tokens-per-run 8e6
Then, here, build the table and the loss-curve PNG from the JSON files:

    python benchmarks/study_construction.py report benchmarks/results/study
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_e2e import dense_losses  # noqa: E402  (the dense model's loss on the trainer's eval sequences)

# name -> (method, scale, sampler kind, label). scale None = experts / top-k (the paper's rescale)
RUNS = {
    "random": ("independent-random", None, "static", "IndependentRandom"),
    "clustering": ("independent-clustering", None, "static", "IndependentClustering"),
    "sharing-inner": ("sharing-inner", None, "static", "SharingInner"),
    "sharing-inter": ("sharing-inter", None, "static", "SharingInter"),
    "random-noscale": ("independent-random", 1.0, "static", "IndependentRandom, no rescale"),
    "random-dynamic": ("independent-random", None, "dynamic", "IndependentRandom, dynamic sheared-paper"),
}


def curate(*args) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})


def run_one(name: str, args, work: Path, dense: dict[str, float]) -> dict:
    import torch

    from trainer.config import write_train_config

    method, scale, kind, label = RUNS[name]
    # everything the converted model depends on is in its name, so a cached one is never the wrong one
    moe = work / (f"moe-{method}-{'noscale' if scale else 'scale'}-{args.experts}x{args.top_k}-{args.gate}"
                  f"-s{args.seed}")
    if not (moe / "config.json").exists():
        # a small random gate, as the paper's released checkpoints start from: a zero gate would send
        # every token to the same k experts until training breaks the tie
        flags = ["--experts", args.experts, "--top-k", args.top_k, "--method", method, "--gate", args.gate,
                 "--gate-init", "random", "--seed", args.seed]
        if scale is not None:
            flags += ["--scale", scale]
        if method.startswith("sharing"):
            flags += ["--calib-data", args.tokens]
        curate("convert", "--dense", args.gguf, "--out", moe, *flags)
    global_batch = args.seq_len * args.micro_batch * args.accum
    steps = max(1, int(args.tokens_per_run // global_batch))
    every = max(global_batch, int(args.eval_every_tokens // global_batch) * global_batch)
    sampler = {"kind": kind, "preset": "sheared", "reweight_every_tokens": every}
    if kind == "dynamic":
        sampler.update(rule="sheared-paper", reference_losses=str(work / "dense_reference.json"))
    cfg = write_train_config(
        work / f"train-{name}.yaml", model={"path": str(moe)},
        data={"tokens": str(args.tokens), "seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
              "global_batch_tokens": global_batch},
        sampler=sampler,
        optim={"lr": args.lr, "warmup_steps": max(1, steps // 10)},
        train={"max_steps": steps, "seed": args.seed, "log_every": 5, "eval_batches": args.eval_batches,
               "eval_every_tokens": every, "compile": args.compile, "checkpoint_every": None,
               "keep_checkpoints": 1})
    run = work / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    curate("train", "--config", cfg, "--out", run)
    wall = time.time() - t0
    met = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [json.loads(x) for x in (run / "domain_weights.jsonl").read_text().splitlines() if x.strip()]
    steady = met[len(met) // 4:] or met
    result = {
        "run": name, "label": label, "method": method, "scale": scale or args.experts / args.top_k,
        "sampler": kind, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "experts": args.experts, "top_k": args.top_k, "gate": args.gate,
        "steps": steps, "global_batch_tokens": global_batch, "tokens": met[-1]["tokens"], "seq_len": args.seq_len,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
        "max_mem_gb": max((m.get("max_mem_gb") or 0) for m in met) or None,
        "train_wall_s": round(wall, 1), "dense": dense,
        "eval_history": [{"tokens": e["tokens"], "eval_loss": e["eval_loss"], "weights": e["weights"]} for e in evals],
        "train_loss": [[m["tokens"], m["loss"]] for m in met],
    }
    if name == "random" and args.routing:
        ckpts = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        if ckpts:
            curate("routing", ckpts[-1], "--tokens", args.tokens, "--out", args.out, "--seq-len", args.seq_len)
    return result


def cmd_run(args) -> int:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = work / "dense_reference.json"
    if not ref.exists():
        dense = dense_losses(Path(args.gguf), Path(args.tokens), args.seq_len, args.micro_batch, args.eval_batches)
        ref.write_text(json.dumps(dense))
    dense = json.loads(ref.read_text())
    for name in args.runs:
        result = run_one(name, args, work, dense)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        first, last = result["eval_history"][0]["eval_loss"], result["eval_history"][-1]["eval_loss"]
        print(f"== {name}: {result['tokens']:,} tokens at {result['tokens_per_s']:,.0f} tokens/s; mean held-out "
              f"loss {mean(first):.3f} -> {mean(last):.3f} (dense {mean(dense):.3f})", flush=True)
    return 0


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def cmd_report(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(args.folder)
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.stem in RUNS]
    results.sort(key=lambda r: list(RUNS).index(r["run"]))
    if not results:
        print(f"no run results in {folder}", file=sys.stderr)
        return 1
    domains = list(results[0]["dense"])
    lines = ["| run | sampler | tokens | tokens/s | held-out loss after conversion | after training | dense | "
             + " | ".join(domains) + " |", "|---" * (7 + len(domains)) + "|"]
    for r in results:
        first, last = r["eval_history"][0]["eval_loss"], r["eval_history"][-1]["eval_loss"]
        per = " | ".join(f"{first.get(d, float('nan')):.2f} → {last.get(d, float('nan')):.2f}" for d in domains)
        lines.append(f"| {r['label']} | {r['sampler']} | {r['tokens'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | "
                     f"{mean(first):.3f} | **{mean(last):.3f}** | {mean(r['dense']):.3f} | {per} |")
    dense_line = "| dense SmolLM2-135M (reference) | | | | | | " + f"{mean(results[0]['dense']):.3f} | " + \
        " | ".join(f"{results[0]['dense'][d]:.2f}" for d in domains) + " |"
    lines.append(dense_line)
    table = "\n".join(lines)
    (folder / "table.md").write_text(
        f"Date {results[0]['date']}, {results[0]['device']}, torch {results[0]['torch']}; "
        f"{results[0]['experts']} experts top-{results[0]['top_k']}, {results[0]['gate']} gate, "
        f"seq {results[0]['seq_len']}, global batch {results[0]['global_batch_tokens']} tokens. "
        "Per-domain cells: held-out loss after conversion → after training.\n\n" + table + "\n")
    print(table)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in results:
        xs = [e["tokens"] / 1e6 for e in r["eval_history"]]
        axes[0].plot(xs, [mean(e["eval_loss"]) for e in r["eval_history"]], marker="o", ms=3, label=r["label"])
        tl = r["train_loss"]
        axes[1].plot([t / 1e6 for t, _ in tl], [loss for _, loss in tl], lw=1, label=r["label"])
    for ax in axes:
        ax.axhline(mean(results[0]["dense"]), color="k", ls="--", lw=1, label="dense SmolLM2-135M")
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean held-out loss over domains")
    axes[0].set_title("held-out loss (dashed: the dense model)")
    axes[1].set_ylabel("training loss")
    axes[1].set_title("training loss")
    axes[1].set_ylim(top=min(12, max(loss for r in results for _, loss in r["train_loss"])))
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M → LLaMA-MoE 8×192 top-2: expert construction methods")
    fig.tight_layout()
    fig.savefig(folder / "study_curves.png", dpi=110)
    print(f"wrote {folder / 'table.md'} and {folder / 'study_curves.png'}")
    return 0


def study_main(argv, doc: str, runs: dict, work: str, run_arguments, cmd_run, cmd_report) -> int:
    """`run` (the arguments both SmolLM2 studies share, then the study's own from `run_arguments(parser)`)
    and `report FOLDER`: the command line of this study and of study_moe_health.py."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--gguf", required=True, help="the dense model: a .gguf file or a Hugging Face directory")
    r.add_argument("--tokens", required=True, help="`curate tokenize` output made with the GGUF's tokenizer")
    r.add_argument("--out", required=True, help="where the result files go")
    r.add_argument("--work", default=work)
    r.add_argument("--runs", nargs="+", default=list(runs), choices=list(runs))
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--micro-batch", type=int, default=32)
    r.add_argument("--accum", type=int, default=4)
    r.add_argument("--eval-batches", type=int, default=8)
    r.add_argument("--lr", type=float, default=3e-4)
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    run_arguments(r)
    sub.add_parser("report").add_argument("folder")
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_report(args)


def _run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--experts", type=int, default=8)
    r.add_argument("--top-k", type=int, default=2)
    r.add_argument("--gate", default="noisy-mlp")
    r.add_argument("--tokens-per-run", type=float, default=8e6)
    r.add_argument("--eval-every-tokens", type=float, default=1e6)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--routing", action=argparse.BooleanOptionalAction, default=True)


def main(argv=None) -> int:
    return study_main(argv, __doc__, RUNS, "/tmp/study", _run_arguments, cmd_run, cmd_report)


if __name__ == "__main__":
    sys.exit(main())
