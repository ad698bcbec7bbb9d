"""`curate demo`: the whole chain on the embedded sample, as the commands a user would type.

sample -> train the ad / fluency classifiers and the KenLM model -> filter (per-domain calibrated)
-> tokenize (a small BPE trained on the kept text) -> convert a small random LLaMA into an MoE
-> train with a dynamic domain sampler -> curves.

Every stage is a real `curate` sub-command run in-process, printed before it runs, so the demo
doubles as a worked example. Re-running reuses finished stages: the classifier and LM files are
kept when present, and `filter` / `tokenize` skip shards they have already done.
"""
from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

from common.errors import CurateError
from common.files import write_atomic

# Small enough for 2 CPU cores in a few minutes, large enough that the loss falls clearly and
# the dynamic sampler re-weights several times.
DEMO_MODEL = {
    "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 512, "num_layers": 2,
    "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 256,
}
DEMO_STEPS = 60


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes for filter/tokenize")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the trained models")


def _curate(*args, stdout_to: Path | None = None) -> None:
    """Run one `curate` sub-command in-process (through the CLI, so the demo imports no stage
    itself); stop the demo if it fails. `stdout_to`: write what it prints there (`> FILE`)."""
    from pipeline.cli import main

    argv = [str(a) for a in args]
    print(f"\n$ curate {shlex.join(argv)}" + (f" > {shlex.quote(str(stdout_to))}" if stdout_to else ""), flush=True)
    t0 = time.perf_counter()
    if stdout_to is None:
        rc = main(argv)
    else:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            rc = main(argv)
        if rc == 0:
            write_atomic(stdout_to, captured.getvalue().encode())
    if rc != 0:
        raise CurateError(f"demo stage `curate {argv[0]}` failed (exit {rc}); see the messages above")
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


def _write_yaml(path: Path, data: dict) -> None:
    write_atomic(path, yaml.safe_dump(data, sort_keys=False).encode())


def filter_config() -> dict:
    """The demo's filter config: paths are relative to the YAML file (DIR/filters.yaml).

    Every model is calibrated per domain on the data being filtered (drop_fraction), never given
    a fixed threshold: a threshold fitted to the demo's synthetic sample would remove nearly all of
    real text (its models have only seen the sample), while a drop fraction removes about that
    share of every domain of whatever the config is pointed at."""
    return {
        # per domain, about the share of advertisements web crawls carry (and the sample plants)
        "ads": {"model": "models/ads.bin", "drop_fraction": {
            "CommonCrawl": 0.2, "C4": 0.2, "StackExchange": 0.05, "Wikipedia": 0.03, "Books": 0.03,
            "GitHub": 0.02, "ArXiv": 0.02}},
        "disfluency": {
            "kenlm": "models/lm.bin",
            # the fluency classifier takes the least fluent 10% of each domain, then the KenLM cut
            # the 5% highest-perplexity of what is left (cc_net's per-domain percentile idea)
            "fluency_model": "models/fluency.bin",
            "fluency_drop_fraction": 0.10,
            "drop_fraction": 0.05,
        },
    }


def run(args) -> int:
    out = Path(args.out).resolve()
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    sample = out / "sample"
    if not (sample / "sample.json").exists():
        _curate("sample", sample, "--seed", args.seed)
    for task, labels in (("ads", "ads.jsonl"), ("fluency", "fluency.jsonl")):
        if not (models / f"{task}.bin").exists():
            # the bucket count is chosen from the data: a small model every Dask worker loads fast
            _curate("train-classifier", "--task", task, "--data", sample / "labels" / labels,
                    "--out", models / f"{task}.bin")
    if not (models / "lm.bin").exists():
        _curate("train-lm", "--text", sample / "lm.txt", "--order", 4, "--out", models / "lm.bin")

    _write_yaml(out / "filters.yaml", filter_config())
    _curate("filter", sample / "train", "--out", out / "filtered", "--config", out / "filters.yaml",
            "--workers", args.workers)
    _curate("manifest", out / "filtered")

    _curate("tokenize", out / "filtered", "--tokenizer", f"train:{DEMO_MODEL['vocab_size']}",
            "--out", out / "tokens", "--workers", args.workers)

    _write_yaml(out / "dense.yaml", DEMO_MODEL)
    if not (out / "moe" / "config.json").exists():
        _curate("convert", "--dense", out / "dense.yaml", "--out", out / "moe", "--experts", 4,
                "--top-k", 2, "--method", "independent-random", "--gate", "linear", "--gate-init", "random")

    # the trainer's CPU-sized demo run on the converted MoE (the `demo` preset: dynamic uniform weights
    # with the sheared-code rule, references measured on the starting model, several re-weightings)
    _curate("train", "--print-config", "--preset", "demo", "--set", f"model.path={out / 'moe'}",
            "--set", f"data.tokens={out / 'tokens'}", "--set", f"train.max_steps={args.steps}",
            stdout_to=out / "train.yaml")
    run_dir = out / "run"
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        _curate("train", "--config", out / "train.yaml", "--out", run_dir, "--resume")
    else:
        _curate("train", "--config", out / "train.yaml", "--out", run_dir)
    _curate("curves", run_dir, "--out", out / "curves.png")

    _print_summary(out, time.perf_counter() - t_start)
    return 0


def _print_summary(out: Path, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    fm = json.loads((out / "filtered" / "manifest.json").read_text())
    tm = json.loads((out / "tokens" / "manifest.json").read_text())
    totals = fm["totals"]
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    weights = [json.loads(x) for x in (out / "run" / "domain_weights.jsonl").read_text().splitlines() if x.strip()]

    table = Table(title="curate demo: what happened", show_lines=False)
    for col in ("domain", "docs in", "kept", "ads", "disfluency", "other", "train tokens", "weight start", "weight end"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    by_dom = totals.get("by_domain", {})
    tok_dom = tm.get("domains", {})
    w0, w1 = weights[0]["weights"], weights[-1]["weights"]
    for dom in sorted(set(by_dom) | set(w0)):
        d = by_dom.get(dom, {})
        removed = d.get("removed", {})
        disfluency = sum(v for k, v in removed.items() if k.startswith("disfluency"))
        other = sum(v for k, v in removed.items() if k != "ads" and not k.startswith("disfluency")) \
            + d.get("malformed", 0)
        t = tok_dom.get(dom, {})
        table.add_row(dom, str(d.get("docs_in", 0)), str(d.get("kept", 0)), str(removed.get("ads", 0)),
                      str(disfluency), str(other), f"{t.get('train_tokens', 0):,}",
                      f"{w0.get(dom, 0):.3f}", f"{w1.get(dom, 0):.3f}")
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    k = max(1, len(metrics) // 5)
    first = sum(m["loss"] for m in metrics[:k]) / k
    last = sum(m["loss"] for m in metrics[-k:]) / k
    console.print(f"training loss {first:.3f} -> {last:.3f} (mean of the first and of the last {k} logged steps) "
                  f"over {metrics[-1]['step']} steps; "
                  f"{len(weights)} domain-weight records; curves: {out / 'curves.png'}")
    console.print(f"demo finished in {seconds:.0f} s; outputs in {out}")

