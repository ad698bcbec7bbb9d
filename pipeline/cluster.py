"""Dask distributed client: a LocalCluster by default, an existing scheduler when given."""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from common.errors import CurateError


def _local_cluster_config() -> dict:
    """Dask settings for the workers we start ourselves (taken by each Nanny when created).

    A task here is a long CPU-bound run of C calls (fastText, KenLM, Parquet) on one thread, and
    on a busy or pinned core every wake-up of the worker's event loop is taken from it. Measured on
    `curate filter` with the ads model on one pinned core, these together cost about 10%:
    - Dask's default MALLOC_TRIM_THRESHOLD_ for workers also fixes glibc's mmap threshold at
      128 KiB, so every document-sized buffer is a fresh mmap with its page faults (about 5%).
      The writer already returns Arrow's memory after each row group, and peak RSS stays flat
      without it (tests/test_pipeline_memory.py);
    - the statistical profiler samples every 10 ms; every 100 ms still fills the dashboard;
    - the event-loop tick (20 ms), memory monitor (100 ms) and system monitor (500 ms) wake-ups.
    """
    import dask

    env = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
           if k != "MALLOC_TRIM_THRESHOLD_"}
    return {"distributed.nanny.pre-spawn-environ": env,
            "distributed.worker.profile.interval": "100ms",
            "distributed.admin.tick.interval": "500ms",
            "distributed.worker.memory.monitor-interval": "500ms",
            "distributed.admin.system-monitor.interval": "2s"}


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None,
                quiet: bool = False) -> Iterator["distributed.Client"]:
    """Yield a connected `distributed.Client`.

    `scheduler` (e.g. tcp://host:8786) attaches to a running cluster; otherwise a LocalCluster
    of `workers` processes with one thread each is started (scorers such as fastText and KenLM
    hold the GIL, so processes, not threads, give the parallelism). One local worker (the default)
    is a thread of this process instead, as datatrove's local executor runs one task: with nothing
    to parallelise, a worker process would only add a second interpreter start, a second copy of
    every model and a round trip per shard (about 1 s of a 13 s run on one core).
    """
    import dask
    import distributed

    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except OSError as e:
            raise CurateError(f"cannot reach the Dask scheduler at {scheduler}: {e}. "
                              "Start one with `dask scheduler` and workers with `dask worker ADDRESS`.") from e
        cluster = None
    else:
        n = 1 if workers is None else workers
        if n < 1:
            raise CurateError(f"--workers must be at least 1, got {n}")
        with dask.config.set(_local_cluster_config()):
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=n > 1,
                                               dashboard_address=":0", silence_logs=logging.ERROR)
        try:
            client = distributed.Client(cluster)
        except BaseException:
            cluster.close()          # otherwise its worker processes outlive us
            raise
    try:
        if not quiet:
            nw = len(client.scheduler_info().get("workers", {}))
            link = client.dashboard_link or "(no dashboard)"
            print(f"dask: {nw} worker(s), dashboard {link}", file=sys.stderr)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
