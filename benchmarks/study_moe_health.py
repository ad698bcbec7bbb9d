"""Router health and recovery of a converted SmolLM2-135M: old vs new defaults and the options beside them.

Every run converts the real SmolLM2-135M (8 experts of 192 neurons, top-2) and continually pre-trains it
for the same budget (125 steps x 65,536 tokens = 8.2M, seq 512, lr 3e-4, static Sheared-LLaMA weights)
on the real RedPajama sample tokenized with SmolLM2's own tokenizer. Columns: mean held-out loss over
the domains at step 0 and at the end, experts under 1% of their layer's held-out assignments at the end
(of 240), the busiest expert's share in the worst layer, tokens/s.

On the GPU (each call writes OUT/<name>.json with every run it finished, and a log):

    python benchmarks/study_moe_health.py run --gguf SmolLM2.gguf --tokens TOKDIR --out OUT --name part1 \
        --runs old-defaults new-defaults linear bias
Here, from the JSON files:

    python benchmarks/study_moe_health.py report benchmarks/results/study_moe_health
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from study_construction import mean, study_main  # noqa: E402  (the studies share their loss mean and arguments)

# name -> (label, extra `curate convert` flags, train.distill[, lr instead of --lr]). Flags beyond the required ones
# (--experts 8 --top-k 2 --method M): "CALIB" stands for the token directory. Distillation's teacher is the
# dense model itself.
KD = {"weight": 1.0, "temperature": 1.0}
KD_ONLY = {"weight": 1.0, "temperature": 1.0, "label_weight": 0.0}
# Rounds 1-4 ran before fitted gates and experts were the defaults: their flags spell out the old ones.
OLD = ["--gate-init", "random", "--expert-init", "split"]
RUNS = {
    "old-defaults": ("old defaults: noisy-mlp gate, zero init", ["--gate", "noisy-mlp", "--gate-init", "zero"], None),
    "new-defaults": ("round-1 defaults: noisy-linear, random gate, split experts, cv2", [], None),
    "linear": ("linear gate (no noise)", ["--gate", "linear"], None),
    "noisy-mlp": ("noisy-mlp gate, random init", ["--gate", "noisy-mlp"], None),
    "bias": ("bias balancing instead of cv2", ["--balance-loss", "bias"], None),
    "fitted": ("fitted router", ["--gate-init", "fitted", "--calib-data", "CALIB"], None),
    "distill": ("distillation from the dense model (KL + labels)", [], KD),
    "distill-kl": ("distillation, the KL alone", [], KD_ONLY),
    "fitted-generated": ("fitted router, calibration text sampled from the dense model (no --calib-data)",
                         ["--gate-init", "fitted"], None),
    "fitted-bias": ("fitted router + bias balancing", ["--gate-init", "fitted", "--calib-data", "CALIB",
                                                      "--balance-loss", "bias"], None),
    "sharing-inner-fitted": ("SharingInner + fitted router", ["METHOD=sharing-inner", "--gate-init", "fitted",
                                                             "--calib-data", "CALIB"], None),
    "fitted-distill": ("fitted router + distillation (KL + labels)", ["--gate-init", "fitted", "--calib-data", "CALIB"], KD),
    # round 4: does stronger balancing keep layer 29's experts alive (cv2 at 10x the paper's weight; the bias
    # moving 5x faster), and what does it cost in loss
    "cv2-0.1": ("cv2 balance loss at weight 0.1 (the paper's: 0.01)", ["--balance-coef", "0.1"], None),
    "fitted-cv2-0.1": ("fitted router + cv2 at weight 0.1", ["--gate-init", "fitted", "--calib-data", "CALIB",
                                                           "--balance-coef", "0.1"], None),
    "bias-fast": ("bias balancing, rate 0.05 per step (default 0.01)", ["--balance-loss", "bias", "--bias-rate", "0.05"], None),
    "fitted-bias-fast": ("fitted router + bias balancing, rate 0.05", ["--gate-init", "fitted", "--calib-data", "CALIB",
                                                                      "--balance-loss", "bias", "--bias-rate", "0.05"], None),
    # round 5: experts' down projections refit so the routed mixture reproduces the dense FFN (--expert-init fitted)
    "fitexp": ("fitted router + fitted experts", ["--gate-init", "fitted", "--expert-init", "fitted", "--calib-data", "CALIB"], None),
    "fitexp-cv2-0.1": ("fitted router + fitted experts + cv2 at 0.1", ["--gate-init", "fitted", "--expert-init", "fitted",
                                                                      "--calib-data", "CALIB", "--balance-coef", "0.1"], None),
    "fitexp-generated": ("fitted router + fitted experts, calibration sampled from the dense model (no --calib-data)",
                         ["--gate-init", "fitted", "--expert-init", "fitted"], None),
    "fitexp-generated-cv2-0.1": ("fitted router + fitted experts + cv2 at 0.1, calibration sampled from the dense model",
                                 ["--gate-init", "fitted", "--expert-init", "fitted", "--balance-coef", "0.1"], None),
    "random-fitexp": ("random router + fitted experts", ["--expert-init", "fitted", "--calib-data", "CALIB"], None),
    "sharing-inner-fitexp": ("SharingInner + fitted router + fitted experts", ["METHOD=sharing-inner", "--gate-init", "fitted",
                                                                             "--expert-init", "fitted", "--calib-data", "CALIB"], None),
    "bias-distill-kl": ("bias balancing + distillation, the KL alone", ["--balance-loss", "bias"], KD_ONLY),
    "clustering": ("IndependentClustering", ["METHOD=independent-clustering"], None),
    "sharing-inner": ("SharingInner", ["METHOD=sharing-inner", "--calib-data", "CALIB"], None),
    "sharing-inter": ("SharingInter", ["METHOD=sharing-inter", "--calib-data", "CALIB"], None),
    # 192 always-on neurons + 8 x 168, top-1: 360 active neurons per token against the others' 384
    "sharing-inter-top1": ("SharingInter, 192 shared + top-1 of 8 x 168 (FLOP-matched)",
                           ["METHOD=sharing-inter", "--calib-data", "CALIB", "--top-k", "1", "--shared-size", "192"], None),
    # beyond the protocol's lr: how much of the gap is the short budget at a continual-pretraining lr
    "lr-1e-3": ("round-1 defaults, lr 1e-3", [], None, 1e-3),
    "sharing-inter-lr-1e-3": ("SharingInter, lr 1e-3", ["METHOD=sharing-inter", "--calib-data", "CALIB"], None, 1e-3),
    "sharing-inter-distill-lr-1e-3": ("SharingInter + distillation (KL + labels), lr 1e-3",
                                      ["METHOD=sharing-inter", "--calib-data", "CALIB"], KD, 1e-3),
}
ROUND5 = {"fitexp", "fitexp-cv2-0.1", "fitexp-generated", "fitexp-generated-cv2-0.1", "random-fitexp",
          "sharing-inner-fitexp"}
for _name, (_label, _flags, *_rest) in list(RUNS.items()):
    if _name not in ROUND5:     # rounds 1-4: the old defaults spelled out where a run did not set them
        _flags = _flags + [x for flag, value in zip(OLD[::2], OLD[1::2]) if flag not in _flags for x in (flag, value)]
        RUNS[_name] = (_label, _flags, *_rest)
# round 6: the new defaults (fitted gate and experts; no calibration text given) and what sits beside them
RUNS.update({
    "defaults-v2": ("defaults: required flags only (fitted gate and experts, calibration sampled from the dense model)", [], None),
    "defaults-v2-seed1": ("defaults, conversion seed 1", ["--seed", "1"], None),
    "defaults-v2-linear": ("defaults with the linear gate (no noise)", ["--gate", "linear"], None),
    "defaults-v2-bias": ("defaults with bias balancing instead of cv2", ["--balance-loss", "bias"], None),
    "defaults-v2-distill": ("defaults + distillation from the dense model (KL + labels)", [], KD),
    "sharing-inter-v2": ("SharingInter under the defaults (fitted gate and experts)", ["METHOD=sharing-inter", "--calib-data", "CALIB"], None),
})
DEAD = 0.01


def curate(*args, log) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    log.write(f"$ curate {' '.join(map(str, args))}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}\n")
    log.flush()
    if proc.returncode:
        raise RuntimeError(f"curate {args[0]} failed: {proc.stderr[-1500:]}")


def health(layers: dict[str, list[float]]) -> tuple[int, float, str]:
    """(experts under 1%, busiest expert's share in the worst layer, that layer)."""
    dead = sum(v < DEAD for shares in layers.values() for v in shares)
    worst = max(layers, key=lambda layer: max(layers[layer]))
    return dead, max(layers[worst]), worst


def run_one(name: str, args, work: Path, log) -> dict:
    from trainer.config import write_train_config

    label, flags, distill, *lr = RUNS[name]
    lr = lr[0] if lr else args.lr
    method = "independent-random"
    convert_flags = []
    for f in flags:
        if f.startswith("METHOD="):
            method = f.split("=", 1)[1]
        else:
            convert_flags.append(str(args.tokens) if f == "CALIB" else f)
    moe = work / f"moe-{name}"
    t0 = time.time()
    if not (moe / "config.json").exists():
        curate("convert", "--dense", args.gguf, "--out", moe, "--experts", 8, "--top-k", 2, "--method", method,
               *convert_flags, log=log)
    convert_s = time.time() - t0
    moe_cfg = json.loads((moe / "config.json").read_text())["model"]["moe"]
    active = moe_cfg["expert_size"] * moe_cfg["top_k"] + (moe_cfg.get("shared_intermediate_size") or 0)
    global_batch = args.seq_len * args.micro_batch * args.accum
    steps = args.steps
    every = args.eval_every_steps * global_batch
    train = {"max_steps": steps, "seed": 0, "log_every": 5, "eval_batches": args.eval_batches,
             "eval_every_tokens": every, "compile": args.compile, "checkpoint_every": None, "keep_checkpoints": 1}
    if distill:
        train["distill"] = {"teacher": str(args.gguf), **distill}
    cfg = write_train_config(
        work / f"train-{name}.yaml", model={"path": str(moe)},
        data={"tokens": str(args.tokens), "seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
              "global_batch_tokens": global_batch},
        sampler={"kind": "static", "preset": "sheared", "reweight_every_tokens": every},
        optim={"lr": lr, "warmup_steps": max(1, steps // 10)}, train=train)
    run = work / f"run-{name}"
    read = lambda f: [json.loads(x) for x in (run / f).read_text().splitlines() if x.strip()]  # noqa: E731
    wall = None
    # a call cut off after a run finished training but before its JSON was written: read the run, not redo it
    if not ((run / "metrics.jsonl").exists() and read("metrics.jsonl") and read("metrics.jsonl")[-1]["step"] >= steps):
        t0 = time.time()
        curate("train", "--config", cfg, "--out", run, log=log)
        wall = round(time.time() - t0, 1)
    met, evals, routing = read("metrics.jsonl"), read("domain_weights.jsonl"), read("routing.jsonl")
    steady = met[len(met) // 4:] or met
    dead0, busiest0, worst0 = health(routing[0]["layers"])
    dead, busiest, worst = health(routing[-1]["layers"])
    return {
        "run": name, "label": label, "method": method, "lr": lr, "active_neurons": active, "convert_flags": convert_flags, "distill": distill or None,
        "steps": steps, "tokens": met[-1]["tokens"], "global_batch_tokens": global_batch, "seq_len": args.seq_len,
        "loss_start": mean(evals[0]["eval_loss"]), "loss_end": mean(evals[-1]["eval_loss"]),
        "eval_start": evals[0]["eval_loss"], "eval_end": evals[-1]["eval_loss"],
        "dead_start": dead0, "busiest_start": busiest0, "worst_layer_start": worst0,
        "dead_end": dead, "busiest_end": busiest, "worst_layer_end": worst,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
        "train_wall_s": wall, "convert_s": round(convert_s, 1),
        "eval_history": [{"tokens": e["tokens"], "loss": mean(e["eval_loss"])} for e in evals],
        "routing_start": routing[0]["layers"], "routing_end": routing[-1]["layers"],
        "train_loss": [[m["tokens"], m["loss"]] for m in met],
    }


def cmd_run(args) -> int:
    import torch

    from train_e2e import dense_losses

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{args.name}.log", "a")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "runs": {}, "runs_sharing_the_gpu": args.runs_sharing_gpu}
    result["dense"] = dense_losses(Path(args.gguf), Path(args.tokens), args.seq_len, args.micro_batch,
                                   args.eval_batches)
    for name in args.runs:
        try:
            result["runs"][name] = r = {**run_one(name, args, work, log), "runs_sharing_the_gpu": args.runs_sharing_gpu}
            print(f"== {name}: loss {r['loss_start']:.3f} -> {r['loss_end']:.3f}; under 1%: {r['dead_end']}; "
                  f"busiest {r['busiest_end']:.1%} (layer {r['worst_layer_end']}); {r['tokens_per_s']:,.0f} tok/s; "
                  f"train {r['train_wall_s']}s", flush=True)
        except RuntimeError as e:
            print(f"== {name}: FAILED {e}", flush=True)
            result["runs"][name] = {"run": name, "error": str(e)[-1500:]}
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    return 0


def cmd_report(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder = Path(args.folder)
    parts = [json.loads(p.read_text()) for p in sorted(folder.glob("part*.json"))]
    runs = {n: r for p in parts for n, r in p["runs"].items() if "error" not in r}
    # rows of this script first, in its order; then rows measured with code since changed (their labels say so)
    first = [n for n in ("old-defaults", "new-defaults", *(n for n in RUNS if n.startswith("defaults-v2")), "sharing-inter-v2")
             if n in runs]
    order = first + [n for n in RUNS if n in runs and n not in first] + sorted(n for n in runs if n not in RUNS)
    for n in order:     # the label of today's script where it still has the run (old files carry older wording)
        if n in RUNS:
            runs[n] = {**runs[n], "label": RUNS[n][0]}
    dense = mean(parts[0]["dense"])
    head = parts[0]
    dates = sorted({p["date"][:10] for p in parts})
    first = runs[order[0]]
    lines = [f"{', '.join(dates)}, {head['device']}, torch {head['torch']}. SmolLM2-135M -> 8 experts x 192, top-2 "
             f"unless the row says otherwise, {first['steps']} steps x {first['global_batch_tokens']:,} tokens, seq "
             f"{first['seq_len']}, lr 3e-4 unless the row says otherwise, static Sheared weights. Held-out mean loss "
             f"over the 7 domains (dense model: {dense:.3f}). Routing on the held-out batches without gate noise; "
             "240 experts in all. Active FFN neurons per token: the dense model has 1,536; 384 is FLOP-matched. "
             "tokens/s is per run, with the number of runs sharing the GPU. Rows below SharingInter under the defaults "
             "ran before the fitted gate and experts were the defaults: random gate and split experts unless the row "
             "says otherwise.",
             "", "| run | active neurons | held-out loss, step 0 | at the end | experts under 1% (start -> end) | "
             "busiest expert, worst layer (end) | tokens/s (runs sharing the GPU) |", "|---|---|---|---|---|---|---|"]
    for n in order:
        r = runs[n]
        lines.append(f"| {r['label']} | {r.get('active_neurons', 384)} | {r['loss_start']:.2f} | **{r['loss_end']:.2f}** | "
                     f"{r['dead_start']} -> {r['dead_end']} | {r['busiest_end']:.1%} (layer {r['worst_layer_end']}) | "
                     f"{r['tokens_per_s']:,.0f} ({r.get('runs_sharing_the_gpu', 1)}) |")
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    # held-out loss curves
    fig, ax = plt.subplots(figsize=(9, 5))
    curves = [n for n in ("old-defaults", "new-defaults", "fitted", "lr-1e-3", "defaults-v2", "defaults-v2-distill",
                          "sharing-inner-fitexp", "sharing-inter", "sharing-inter-v2") if n in runs]
    for n in curves:
        h = runs[n]["eval_history"]
        ax.plot([e["tokens"] / 1e6 for e in h], [e["loss"] for e in h], marker="o", ms=3, label=runs[n]["label"])
    ax.axhline(dense, color="k", ls="--", lw=1, label="dense SmolLM2-135M")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("mean held-out loss")
    ax.set_ylim(top=min(15, max(runs[n]["loss_start"] for n in curves) + 0.5))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("recovery after conversion")
    fig.tight_layout()
    fig.savefig(folder / "loss_curves.png", dpi=110)
    plt.close(fig)

    # routing: per layer, every expert's share at the end (old vs new defaults and the best runs)
    shown = [n for n in ("old-defaults", "new-defaults", "fitted-cv2-0.1", "defaults-v2", "sharing-inner-fitexp",
                         "sharing-inter-v2") if n in runs]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 6.2), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, n in zip(axes, shown):
        layers = runs[n]["routing_end"]
        m = np.array([layers[str(layer)] for layer in sorted(map(int, layers))])
        im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=0.5)
        dead, busiest, worst = health(layers)
        ax.set_title(f"{n}\n{dead} under 1%, busiest {busiest:.0%}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(0, m.shape[0], 5))
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="share of the layer's held-out assignments (uniform 12.5%)")
    fig.suptitle("expert load after 8.2M tokens")
    fig.savefig(folder / "routing_end.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {folder / 'table.md'}, loss_curves.png, routing_end.png")
    return 0


def _run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--name", default="part1", help="this call's result file: OUT/NAME.json")
    r.add_argument("--steps", type=int, default=125)
    r.add_argument("--eval-every-steps", type=int, default=25)
    r.add_argument("--runs-sharing-gpu", type=int, default=1,
                   help="how many study processes this call runs on the GPU at once (recorded beside tokens/s)")


def main(argv=None) -> int:
    return study_main(argv, __doc__, RUNS, "/tmp/study-health", _run_arguments, cmd_run, cmd_report)


if __name__ == "__main__":
    sys.exit(main())
