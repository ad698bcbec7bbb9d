"""Dask distributed client: a LocalCluster by default, an existing scheduler when given."""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from filters.errors import CurateError


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None,
                quiet: bool = False) -> Iterator["distributed.Client"]:
    """Yield a connected `distributed.Client`.

    `scheduler` (e.g. tcp://host:8786) attaches to a running cluster; otherwise a LocalCluster
    of `workers` processes with one thread each is started (scorers such as fastText and KenLM
    hold the GIL or their own threads, so processes, not threads, give the parallelism).
    """
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
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
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
