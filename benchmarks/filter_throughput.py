"""Filter throughput: `curate filter` on 1 and 2 Dask workers next to the I/O floor.

The real RedPajama sample (../shared/data/redpajama-sample) is replicated to about --target-mb of
text as SlimPajama shards, then measured three ways on the same shards:

  I/O floor     decompress + split lines + parse JSON only (pipeline.readers), 1 and 2 processes
  filter, 1 w   run_filter on a LocalCluster with 1 worker process
  filter, 2 w   the same with 2 worker processes

`--config FILTERS.yaml` measures a real chain (e.g. the demo's ads + KenLM filters); without it
the chain is the length filter only, i.e. the pipeline's own overhead (parse, batch, Parquet).

    .venv/bin/python benchmarks/filter_throughput.py [--config FILTERS.yaml] [--target-mb 100]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.domains import load_dataset_manifest  # noqa: E402
from pipeline.filter import run_filter  # noqa: E402
from pipeline.readers import discover_shards, read_shard  # noqa: E402

REAL_SAMPLE = ROOT.parent / "shared" / "data" / "redpajama-sample"


def replicate(src: Path, dst: Path, target_bytes: int) -> tuple[int, int]:
    """Copy the sample's shards (renamed) until the uncompressed text reaches target_bytes."""
    shards = sorted(src.rglob("*.jsonl.zst"))
    raw = [zstandard.ZstdDecompressor().stream_reader(p.open("rb")).read() for p in shards]
    per_round = sum(len(r) for r in raw)
    rounds = max(1, -(-target_bytes // per_round))
    cctx = zstandard.ZstdCompressor(level=3)
    blobs = [cctx.compress(r) for r in raw]
    for k in range(rounds):
        for p, blob in zip(shards, blobs):
            (dst / f"{p.name.removesuffix('.jsonl.zst')}_r{k:03d}.jsonl.zst").write_bytes(blob)
    return rounds * len(shards), rounds * per_round


def _read_all(url_and_id: tuple[str, str]) -> tuple[int, int]:
    ds = load_dataset_manifest()
    [shard] = discover_shards([url_and_id[0]], ds)
    n = b = 0
    for rec in read_shard(shard, ds):
        n, b = n + 1, b + rec.nbytes + 1
    return n, b


def io_floor(corpus: Path, procs: int) -> tuple[float, int, int]:
    urls = [(str(p), p.stem) for p in sorted(corpus.glob("*.jsonl.zst"))]
    t = time.perf_counter()
    if procs == 1:
        res = [_read_all(u) for u in urls]
    else:
        with ProcessPoolExecutor(procs) as ex:
            res = list(ex.map(_read_all, urls))
    return time.perf_counter() - t, sum(r[0] for r in res), sum(r[1] for r in res)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    except OSError:
        lscpu = [platform.processor()]
    load = os.getloadavg()
    return "\n".join(["```", *lscpu, f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", "```"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=REAL_SAMPLE, help="SlimPajama shards to replicate")
    ap.add_argument("--config", help="filter config YAML (default: length filter only)")
    ap.add_argument("--target-mb", type=float, default=100, help="uncompressed JSONL to process, in MB")
    ap.add_argument("--workers", default="1,2", help="worker counts to measure (default: 1,2)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline.md")
    ap.add_argument("--note", default="", help="a line added to the results (e.g. 'machine shared with 4 other jobs')")
    args = ap.parse_args()
    if not args.source.is_dir():
        print(f"{args.source} not found: pass --source with SlimPajama shards", file=sys.stderr)
        return 2

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mach = machine()
    work = Path(tempfile.mkdtemp(prefix="filter-bench-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        n_shards, total = replicate(args.source, corpus, int(args.target_mb * 1e6))
        mb = total / 1e6
        print(f"corpus: {n_shards} shards, {mb:.1f} MB of JSONL", file=sys.stderr)
        rows = []
        for procs in (1, 2):
            secs, docs, nbytes = io_floor(corpus, procs)
            assert nbytes == total, (nbytes, total)
            rows.append((f"I/O floor (decompress + parse), {procs} process{'es' if procs > 1 else ''}",
                         docs, secs, None))
            print(rows[-1], file=sys.stderr)
        for w in [int(x) for x in args.workers.split(",")]:
            out = work / f"out{w}"
            t = time.perf_counter()
            m = run_filter([str(corpus)], out, config=args.config, workers=w, progress=False)
            wall = time.perf_counter() - t
            assert m["totals"]["docs_in"] == docs and not m["failed"]
            rows.append((f"curate filter, {w} worker{'s' if w > 1 else ''}", m["totals"]["docs_in"],
                         m["process_s"], wall))
            print(rows[-1], file=sys.stderr)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    chain = f"`{args.config}`" if args.config else "length filter only (pipeline overhead: parse, batch, score, Parquet)"
    floor1 = rows[0][1] / rows[0][2]
    lines = [
        "# Filter throughput (`benchmarks/filter_throughput.py`)", "",
        f"Date: {started}. Corpus: {args.source} replicated to {n_shards} shards, {mb:.1f} MB of JSONL "
        f"({rows[0][1]} documents). Filter chain: {chain}.", "",
        mach, "",
        *([args.note, ""] if args.note else []),
        "| run | documents | seconds | docs/s | MB/s | vs 1-process I/O floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, docs, secs, wall in rows:
        extra = f" (wall {wall:.1f} s incl. cluster start)" if wall else ""
        lines.append(f"| {name} | {docs} | {secs:.2f}{extra} | {docs / secs:,.0f} | {mb / secs:.1f} | "
                     f"{docs / secs / floor1:.2f}x |")
    lines += ["", "Filter seconds are from the first task submitted to the last result (workers already "
                  "started); MB are uncompressed JSONL bytes read."]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
