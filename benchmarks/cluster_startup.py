"""Where a local Dask cluster's start-up goes: N worker processes, variants side by side.

    python benchmarks/cluster_startup.py --workers 16 [--repeat 2] [--out OUT.json]

Each variant starts a LocalCluster the way `pipeline.cluster.WorkerPool` does (loopback, one
thread per worker, no worker dashboards, the same Dask settings), then times:
  ready      LocalCluster() returns: scheduler up, every worker process connected
  imported   every worker has imported what a filter task needs (filters, fastText, pyarrow)
  close      client and cluster closed
Variants: the scheduler's dashboard on/off, TLS with a throw-away certificate on/off, and how
worker processes are made (multiprocessing "spawn", Dask's default; "forkserver", which forks
every worker from one server that imported distributed and its optional packages once; "fork", every
worker a copy of this process, which has imported the stage's modules first).
Every variant runs in a fresh interpreter, --repeat times, interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "product (dashboard, TLS, spawn)": dict(dashboard=True, tls=True, method="spawn"),
    "no dashboard": dict(dashboard=False, tls=True, method="spawn"),
    "no TLS": dict(dashboard=True, tls=False, method="spawn"),
    "forkserver": dict(dashboard=True, tls=True, method="forkserver"),
    "forkserver, no dashboard": dict(dashboard=False, tls=True, method="forkserver"),
    "fork, stage modules imported first": dict(dashboard=True, tls=True, method="fork"),
}


def _import_stage_modules() -> float:
    t = time.perf_counter()
    import fasttext  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import filters.config  # noqa: F401
    import pipeline.stages  # noqa: F401
    return time.perf_counter() - t


def child(n: int, dashboard: bool, tls: bool, method: str) -> dict:
    t0 = time.perf_counter()
    import logging

    import dask
    import distributed
    from distributed.security import Security

    from pipeline.cluster import LOOPBACK, _local_cluster_config, _worker_class

    if method == "fork":     # workers are copies of this process: what it imported, they have
        _import_stage_modules()
    out = {"import_s": time.perf_counter() - t0}
    cfg = {**_local_cluster_config(), "distributed.worker.multiprocessing-method": method}
    t = time.perf_counter()
    with dask.config.set(cfg):
        where = {"host": LOOPBACK, **({"security": Security.temporary()} if tls else {})}
        cluster = distributed.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, **where, worker_class=_worker_class(True),
            dashboard_address=f"{LOOPBACK}:0", scheduler_kwargs={"dashboard": dashboard},
            worker_dashboard_address=f"{LOOPBACK}:0", silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
    out["ready_s"] = time.perf_counter() - t
    workers = list(client.scheduler_info()["workers"])
    futs = [client.submit(_import_stage_modules, workers=[w], pure=False, allow_other_workers=False) for w in workers]
    out["worker_import_s_max"] = max(client.gather(futs))
    out["imported_s"] = time.perf_counter() - t
    t = time.perf_counter()
    client.close()
    cluster.close()
    out["close_s"] = time.perf_counter() - t
    out["workers"] = len(workers)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.workers, **VARIANTS[a.child])))
        return 0
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for r in range(a.repeat):
        for name in a.variants:
            t = time.perf_counter()
            res = subprocess.run([sys.executable, __file__, "--workers", str(a.workers), "--child", name],
                                 capture_output=True, text=True, env=env, cwd=ROOT)
            if res.returncode:
                print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            row = {"variant": name, "round": r, **json.loads(res.stdout.strip().splitlines()[-1]),
                   "process_s": time.perf_counter() - t}
            rows.append(row)
            print(f"{name:34s} round {r}: ready {row['ready_s']:.2f} s, stage imports done {row['imported_s']:.2f} s, "
                  f"close {row['close_s']:.2f} s, whole process {row['process_s']:.2f} s", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"workers": a.workers, "cpus": os.cpu_count(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
