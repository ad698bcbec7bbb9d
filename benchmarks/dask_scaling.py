"""`curate filter` throughput against the number of Dask workers, on one machine's cores.

The corpus is a set of SlimPajama shards (by default the real RedPajama sample) replicated to many
shards, so that every worker has several tasks. Each worker count runs the whole `curate filter`
process into a fresh output directory; the figure reported is documents and MB of text per second of
wall time (cluster start and model loading included, as a user experiences it), and the speed-up
against one worker.

    python benchmarks/dask_scaling.py --shards DIR --config filters.yaml --workers 1 2 4 8 16 --copies 16 --out OUT
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def replicate(src: Path, dest: Path, copies: int) -> list[Path]:
    """`copies` copies of every *.jsonl.zst under src, flat in dest."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.rglob("*.jsonl.zst")):
        base = f.name.replace(".jsonl.zst", "")
        for r in range(copies):
            target = dest / f"{base}_r{r:03d}.jsonl.zst"
            if not target.exists():
                shutil.copyfile(f, target)
            out.append(target)
    return out


def run_filter(corpus: Path, out: Path, config: Path | None, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "filter", str(corpus), "--out", str(out),
           "--workers", str(workers), "--no-progress"]
    if config:
        cmd += ["--config", str(config)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=str(ROOT.parent / "shared" / "data" / "redpajama-sample"))
    p.add_argument("--config", default=None, help="filter config (default: the length rule only)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--work", default="/tmp/dask-scaling")
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)

    work = Path(args.work)
    corpus = work / "corpus"
    files = replicate(Path(args.shards), corpus, args.copies)
    config = Path(args.config).resolve() if args.config else None
    rows = []
    for n in args.workers:
        wall = run_filter(corpus, work / f"out-{n}", config, n)
        m = json.loads((work / f"out-{n}" / "manifest.json").read_text())
        t = m["totals"]
        # uncompressed JSONL bytes read, from the shard manifests
        text_mb = sum(json.loads(f.read_text()).get("bytes_read", 0)
                      for f in (work / f"out-{n}" / "shards").glob("*.json")) / 1e6
        # process_s: first task submitted to last result, i.e. without starting the cluster
        rows.append({"workers": n, "wall_s": round(wall, 2), "process_s": m["process_s"], "docs_in": t["docs_in"],
                     "kept": t["kept"], "docs_per_s": t["docs_in"] / wall, "mb_per_s": (text_mb / wall) if text_mb else None,
                     "process_docs_per_s": t["docs_in"] / m["process_s"]})
        print(f"{n:3d} workers: {wall:7.2f} s  {t['docs_in'] / wall:9,.0f} docs/s", flush=True)
    base = rows[0]["docs_per_s"] / rows[0]["workers"]
    for r in rows:
        r["speedup_vs_1"] = r["docs_per_s"] / base
        r["process_speedup_vs_1"] = r["process_docs_per_s"] / rows[0]["process_docs_per_s"] * rows[0]["workers"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
              "cpus": os.cpu_count(), "shards": len(files), "config": str(config) if config else "length only",
              "rows": rows}
    print("\n| workers | wall s | docs/s | MB/s | speed-up | tasks only: s | speed-up |\n|---|---|---|---|---|---|---|")
    for r in rows:
        mb = f"{r['mb_per_s']:.1f}" if r["mb_per_s"] else "n/a"
        print(f"| {r['workers']} | {r['wall_s']} | {r['docs_per_s']:,.0f} | {mb} | {r['speedup_vs_1']:.2f}× | "
              f"{r['process_s']:.2f} | {r['process_speedup_vs_1']:.2f}× |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
