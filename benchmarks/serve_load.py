"""`curate serve` under load: 50 concurrent clients poll job status and run curves for 60 s while two
filter jobs run; every response must be 200; latency percentiles are reported; and the two jobs' outputs
must equal a `curate filter` run of the same inputs without the service or the load.

The root is built once (reused when present): `curate demo` (its trained filter models and a training
run, whose curves the clients poll) and a larger `curate sample` corpus for the jobs.

    python benchmarks/serve_load.py --root /tmp/serve-load [--clients 50 --seconds 60] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
from queue import Empty
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "serve-load-token"
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "CURATE_TOKEN": TOKEN}


def curate(*args) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], check=True, env=ENV, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def prepare(root: Path, docs_per_domain: int, shards: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "demo" / "run" / "metrics.jsonl").exists():
        curate("demo", "--out", root / "demo")
    if not (root / "raw").exists():
        curate("sample", root / "raw", "--docs-per-domain", docs_per_domain, "--shards", shards, "--seed", 1)


def kept_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    ids = []
    for p in sorted((out / "kept").glob("*/*.parquet")):
        ids += pq.read_table(p, columns=["id"]).column("id").to_pylist()
    return sorted(ids)


def client_process(port: int, paths: list[str], threads: int, seconds: float, queue) -> None:
    """`threads` clients with a keep-alive connection each, polling `paths` round robin."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        end = time.monotonic() + seconds
        i = k
        while time.monotonic() < end:
            path = paths[i % len(paths)]
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
                r = conn.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append((status, time.perf_counter() - t0))
        with lock:
            results.extend(mine)

    ts = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    queue.put(results)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(port: int, method: str, path: str, body: dict | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    r = conn.getresponse()
    out = json.loads(r.read())
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {out}")
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--processes", type=int, default=5, help="client processes (the clients are threads in them)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--docs-per-domain", type=int, default=4000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args()
    root = a.root.resolve()
    prepare(root, a.docs_per_domain, a.shards)
    config = root / "demo" / "filters.yaml"

    # the reference: the same filter without the service or the load (one worker, as each job has)
    ref = root / "reference"
    if not (ref / "manifest.json").exists():
        curate("filter", root / "raw" / "train", "--out", ref, "--config", config, "--workers", "1", "--no-progress")
    for name in ("load-a", "load-b"):
        subprocess.run(["rm", "-rf", str(root / "curated" / name)], check=True)

    port = free_port()
    log = open(root / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--root", str(root), "--port", str(port),
                              "--workers", "1", "--concurrency", "2"], cwd=ROOT, env=ENV, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while f"serving http://127.0.0.1:{port}" not in (root / "serve.log").read_text():
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "serve.log").read_text())
            time.sleep(0.1)
        jobs = [api(port, "POST", "/api/jobs", {"kind": "filter", "inputs": ["raw/train"], "out": f"curated/{n}",
                                                "config": "demo/filters.yaml"})["id"] for n in ("load-a", "load-b")]
        run = "demo/run"
        paths = [f"/api/jobs/{jobs[0]}", f"/api/runs/{run}/weights", f"/api/jobs/{jobs[1]}",
                 f"/api/runs/{run}/metrics", "/api/jobs", f"/api/runs/{run}/routing", "/api/runs"]
        queue = multiprocessing.Queue()
        per = [a.clients // a.processes + (1 if i < a.clients % a.processes else 0) for i in range(a.processes)]
        t0 = time.monotonic()
        procs = [multiprocessing.Process(target=client_process, args=(port, paths, n, a.seconds, queue))
                 for n in per if n]
        for p in procs:
            p.start()
        # the jobs' states while the load runs; results are taken as they come (a child cannot exit
        # before its queue is drained)
        running_during = set()
        states_end = None
        results = []
        collected = 0
        while collected < len(procs):
            try:
                results += queue.get(timeout=0.5)
                collected += 1
            except Empty:
                pass
            states = [api(port, "GET", f"/api/jobs/{j}")["status"] for j in jobs]
            if all(s == "running" for s in states):
                running_during.add(round(time.monotonic() - t0))
            if states_end is None and all(s in ("done", "failed") for s in states):
                states_end = time.monotonic() - t0
        for p in procs:
            p.join()
        finals = []
        for j in jobs:
            while (job := api(port, "GET", f"/api/jobs/{j}"))["status"] in ("queued", "running"):
                time.sleep(0.5)
            finals.append(job)
    finally:
        serve.terminate()
        serve.wait(60)
        log.close()

    lat = [t for s, t in results if s == 200]
    errors = [s for s, _ in results if s != 200]
    ref_manifest = json.loads((ref / "manifest.json").read_text())
    ref_ids = kept_ids(ref)
    same = [f["status"] == "done" and f["totals"] == ref_manifest["totals"]
            and kept_ids(root / f["out"]) == ref_ids for f in finals]
    both_running_s = len(running_during)
    figures = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
        "clients": a.clients, "seconds": a.seconds, "requests": len(results), "errors": len(errors),
        "requests_per_s": round(len(results) / a.seconds, 1),
        "latency_ms": {"p50": round(1000 * percentile(lat, 0.50), 1), "p90": round(1000 * percentile(lat, 0.90), 1),
                       "p99": round(1000 * percentile(lat, 0.99), 1), "max": round(1000 * max(lat), 1)},
        "jobs": [{"id": f["id"], "status": f["status"], "docs_in": f["totals"]["docs_in"] if f["totals"] else None,
                  "equal_to_reference": ok} for f, ok in zip(finals, same)],
        "both_jobs_running_s": both_running_s,
        "jobs_finished_at_s": None if states_end is None else round(states_end, 1),
        "reference_wall_s": ref_manifest["wall_s"],
    }
    print(json.dumps(figures, indent=2))
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if not errors and all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
