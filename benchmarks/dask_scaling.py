"""`curate filter` throughput against the number of Dask workers, on one machine's cores.

The corpus is a set of SlimPajama shards (by default the real RedPajama sample, 4 shards of 0.4-1.1 MB
compressed) replicated, as hard links under new names, until it holds at least --text-mb MB of document
text: many small shards, so every worker has many tasks. Each worker count runs the whole
`curate filter` process into a fresh output directory and is timed whole (interpreter start, cluster
start, model loading, writing the manifest and stats, shutting the cluster down). From its manifest:
`process_s`, first task submitted to the last result ("task time"), and the start-up timeline
(`timings`: workers ready, models loaded, first task submitted, results in, finished).

One worker (an in-process thread, the default) runs on the first --baseline-mb MB of the corpus
only, since on the full corpus it would take minutes; its rates are per second, so the speed-ups are
rate ratios:
  task speed-up     docs/s over task time at N workers / the same at 1 worker
  whole speed-up    docs/s over whole-process wall at N workers / the same at 1 worker (the smaller
                    baseline run amortises its start-up over less work, which favours N)
  whole vs task-1   docs/s over whole-process wall at N workers / docs/s over task time at 1 worker
                    (a bound that charges the baseline nothing for start-up)

    python benchmarks/dask_scaling.py --config filters.yaml --text-mb 2048 --baseline-mb 256 --workers 1 8 16 --out OUT.json
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def text_mb_of(shards: list[Path]) -> float:
    """MB of document text (UTF-8) in the shards."""
    import zstandard

    n = 0
    for f in shards:
        with f.open("rb") as fh:
            for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh)):
                n += len(json.loads(line)["text"].encode())
    return n / 1e6


def replicate(src: list[Path], dest: Path, copies: int) -> list[Path]:
    """`copies` hard links (or copies, across file systems) of every shard, flat in dest, named apart."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for r in range(copies):
        for f in src:
            target = dest / f"{f.name.removesuffix('.jsonl.zst')}_r{r:04d}.jsonl.zst"
            if not target.exists():
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copyfile(f, target)
            out.append(target)
    return out


def run_filter(corpus: Path, out: Path, config: Path | None, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "filter", str(corpus), "--out", str(out),
           "--workers", str(workers), "--no-progress"]
    if config:
        cmd += ["--config", str(config)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    t = m["totals"]
    row = {"workers": workers, "shards": m["shards"]["total"], "wall_s": round(wall, 3), "process_s": m["process_s"],
           "docs_in": t["docs_in"], "kept": t["kept"], "jsonl_mb": m["bytes_read"] / 1e6,
           "docs_per_s": t["docs_in"] / wall, "process_docs_per_s": t["docs_in"] / m["process_s"],
           "timings": m.get("timings")}
    shutil.rmtree(out, ignore_errors=True)
    return row


def lscpu() -> list[str]:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return [platform.processor()]
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L3")
    return [ln.strip() for ln in lines if ln.strip().startswith(keep)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=str(ROOT.parent / "shared" / "data" / "redpajama-sample"),
                   help="SlimPajama shards to replicate (searched recursively for *.jsonl.zst)")
    p.add_argument("--config", default=None, help="filter config (default: the length rule only)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, in order; 1 first")
    p.add_argument("--text-mb", type=float, default=100, help="MB of document text in the corpus, at least")
    p.add_argument("--baseline-mb", type=float, default=None,
                   help="MB of text the 1-worker run filters (default: all of it)")
    p.add_argument("--work", default="/tmp/dask-scaling")
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)

    work = Path(args.work)
    src = sorted(Path(args.shards).rglob("*.jsonl.zst"))
    per_copy = text_mb_of(src)
    copies = math.ceil(args.text_mb / per_copy)
    files = replicate(src, work / "corpus", copies)
    base_copies = copies if args.baseline_mb is None else min(copies, math.ceil(args.baseline_mb / per_copy))
    replicate(src, work / "baseline", base_copies)
    for d, c in (("corpus", copies), ("baseline", base_copies)):
        print(f"{d}: {c * len(src)} shards, {c * per_copy:.0f} MB of text", flush=True)
    config = Path(args.config).resolve() if args.config else None
    rows = []
    for n in args.workers:
        corpus = work / ("baseline" if n == 1 else "corpus")
        row = run_filter(corpus, work / f"out-{n}", config, n)
        row["text_mb"] = (base_copies if n == 1 else copies) * per_copy
        rows.append(row)
        print(f"{n:3d} workers: {row['shards']} shards, {row['text_mb']:.0f} MB text, wall {row['wall_s']:.2f} s, "
              f"tasks {row['process_s']:.2f} s, timings {row['timings']}", flush=True)
    one = next(r for r in rows if r["workers"] == 1)
    for r in rows:
        r["task_speedup"] = r["process_docs_per_s"] / one["process_docs_per_s"]
        r["whole_speedup"] = r["docs_per_s"] / one["docs_per_s"]
        r["whole_vs_task1"] = r["docs_per_s"] / one["process_docs_per_s"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
              "cpus": os.cpu_count(), "lscpu": lscpu(), "python": platform.python_version(),
              "text_mb_per_copy": per_copy, "corpus_shards": len(files), "corpus_text_mb": copies * per_copy,
              "config": str(config) if config else "length only", "rows": rows}
    print("\n".join(result["lscpu"]))
    print("\n| workers | shards | MB text | wall s | tasks s | docs/s (wall) | task speed-up | whole speed-up "
          "| whole vs 1-worker tasks |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['shards']} | {r['text_mb']:.0f} | {r['wall_s']:.2f} | {r['process_s']:.2f} | "
              f"{r['docs_per_s']:,.0f} | {r['task_speedup']:.2f}x | {r['whole_speedup']:.2f}x | {r['whole_vs_task1']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
