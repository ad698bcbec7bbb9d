"""Dask distributed client: a LocalCluster by default, an existing scheduler when given.

A local cluster opens nothing to the network: scheduler, workers, nannies and dashboard listen on
127.0.0.1, and its processes talk TLS with a certificate made for the run, so no other local process
can attach as a client. A remote scheduler is reached over TCP, or over TLS (`tls://host:port`) with Dask's own
security: certificates from Dask's config (`distributed.comm.tls.*`) or from --tls-ca-file,
--tls-cert and --tls-key.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import CurateError

if TYPE_CHECKING:
    import distributed


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
    Tokenizers' thread pool is held to one thread per worker process too.

    On Linux the worker processes are forked from this one (`fork_workers`) rather than spawned.
    """
    import dask

    env = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
           if k != "MALLOC_TRIM_THRESHOLD_"}
    # one core per worker: tokenizers would otherwise start a thread pool per worker process,
    # over-subscribing the cores --workers asked for (one pool serves filter and tokenize alike)
    env.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return {"distributed.nanny.pre-spawn-environ": env,
            **({"distributed.worker.multiprocessing-method": "fork"} if fork_workers() else {}),
            "distributed.worker.profile.interval": "100ms",
            "distributed.admin.tick.interval": "500ms",
            "distributed.worker.memory.monitor-interval": "500ms",
            "distributed.admin.system-monitor.interval": "2s"}


def fork_workers() -> bool:
    """Whether local worker processes are forked from the driver: on Linux, yes. A forked worker
    starts as a copy of a process that has already imported distributed and the stages' modules (the
    16 workers of a 16-core box were ready after 0.7 s instead of 2.5 s: benchmarks/cluster_startup.py),
    and it shares the driver's memory pages until it writes them: a model the driver loaded before
    the fork (`WorkerPool(preload=...)`) is one copy in RAM and in the CPU's cache for every worker
    (fastText predict ran 16% faster per process at 16 processes: benchmarks/predict_scaling.py).
    Not on macOS, where a forked child of a process that used the system's frameworks may crash."""
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


LOOPBACK = "127.0.0.1"
# what `--scheduler` takes: PROTOCOL://HOST:PORT (or HOST:PORT, meaning tcp://); HOST may be [IPv6]
SCHEDULER_ADDRESS = re.compile(r"(?:(tcp|tls|ws|wss|ucx)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})")


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca-file", help="CA certificate that signed the scheduler's and workers' certificates "
                                         "(for --scheduler tls://...; default: Dask's config)")
    p.add_argument("--tls-cert", help="this client's certificate (PEM) for --scheduler tls://...")
    p.add_argument("--tls-key", help="this client's private key (PEM), when not inside --tls-cert")


def tls_options(args: argparse.Namespace) -> dict | None:
    """The TLS files given on the command line, or None to use Dask's config."""
    given = {"ca_file": args.tls_ca_file, "cert": args.tls_cert, "key": args.tls_key}
    return {k: v for k, v in given.items() if v} or None


def check_scheduler_address(address: str) -> str:
    m = SCHEDULER_ADDRESS.fullmatch(address)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise CurateError(f"--scheduler {address!r} is not a scheduler address: give PROTOCOL://HOST:PORT, "
                          "e.g. tcp://10.0.0.5:8786 or tls://scheduler.example:8786")
    return address if m.group(1) else f"tcp://{address}"


def _security(address: str, tls: dict | None):
    """Dask Security for a remote scheduler: the files given, else whatever Dask's config says."""
    from distributed.security import Security

    if tls is None:
        security = Security()       # reads distributed.comm.tls.* from Dask's config
        if address.startswith("tls://") and not (security.tls_ca_file and security.tls_client_cert):
            raise CurateError(f"--scheduler {address} uses TLS: give --tls-ca-file and --tls-cert (and --tls-key), "
                              "or set distributed.comm.tls.ca-file and distributed.comm.tls.client.cert in Dask's config")
        return security
    if not address.startswith("tls://"):
        raise CurateError(f"--tls-* options need a tls:// scheduler address, not {address}")
    for name, path in tls.items():
        if not Path(path).is_file():
            raise CurateError(f"--tls-{name.replace('_', '-')} {path} does not exist")
    if "ca_file" not in tls or "cert" not in tls:
        raise CurateError("--scheduler tls://... needs --tls-ca-file and --tls-cert (and --tls-key unless the "
                          "certificate file holds the key)")
    return Security(tls_ca_file=tls["ca_file"], tls_client_cert=tls["cert"], tls_client_key=tls.get("key"),
                    require_encryption=True)


def _worker_class(processes: bool):
    """Dask's Nanny (a worker process) or Worker (a thread here), without the per-worker dashboard:
    LocalCluster turns that on whenever it is given the worker HTTP address (which keeps the health
    and metrics server on loopback), and its plotting imports cost every worker about 1.5 s of CPU at
    start-up, on the path to its first task. The scheduler's dashboard is not affected."""
    import distributed

    base = distributed.Nanny if processes else distributed.Worker

    class WithoutDashboard(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "dashboard": False})

    WithoutDashboard.__name__ = WithoutDashboard.__qualname__ = f"{base.__name__}WithoutDashboard"
    return WithoutDashboard


class WorkerPool:
    """The Dask workers of a run, started in the background and reusable by several stages.

        pool = WorkerPool(workers=16)        # returns at once; the cluster starts in a thread
        ...                                   # the driver discovers shards and hashes models meanwhile
        client = pool.client()                # waits for the cluster (raises what its start raised)
        run_filter(..., pool=pool); tokenize_dir(..., pool=pool)     # the same workers for both
        pool.close()

    `scheduler` (e.g. tcp://host:8786) attaches to a running cluster; otherwise a LocalCluster of
    `workers` processes with one thread each is started (scorers such as fastText and KenLM hold the
    GIL, so processes, not threads, give the parallelism). One local worker (the default) is a thread
    of this process instead, as datatrove's local executor runs one task: with nothing to
    parallelise, a worker process would only add a second interpreter start, a second copy of every
    model and a round trip per shard (about 1 s of a 13 s run on one core).

    `preload`, for a local cluster whose workers are forked (`fork_workers`): a function run here
    first, in the calling thread, whose results the workers inherit (the filter stage loads its
    models with it). It is not run otherwise: spawned or remote workers load their own.

    `dashboard`: None (the default) serves one for a cluster of worker processes and shows a remote
    scheduler's; for the single in-process worker it is off unless asked for (True): there is one
    thread to watch, and importing the dashboard's plotting library costs about 1.5 s of CPU, a
    tenth of filtering 200 MB on one core.
    """

    def __init__(self, workers: int | None = None, scheduler: str | None = None, *, quiet: bool = False,
                 dashboard: bool | None = None, tls: dict | None = None,
                 preload: Callable[[], None] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        # argument errors are raised here, at once, not when the client is first needed
        if scheduler:
            self._address = check_scheduler_address(scheduler)
            self._security = _security(self._address, tls)
        else:
            n = 1 if workers is None else workers
            if n < 1:
                raise CurateError(f"--workers must be at least 1, got {n}")
            if tls:
                raise CurateError("--tls-* options are for --scheduler tls://...; a local cluster stays on 127.0.0.1")
        self.workers, self.scheduler, self.quiet = workers, scheduler, quiet
        self._auto_dashboard = dashboard is None
        self.dashboard = dashboard if dashboard is not None else bool(scheduler) or (workers or 1) > 1
        self._cluster = None
        self._client: "distributed.Client | None" = None
        self.forks = not scheduler and (workers or 1) > 1 and fork_workers()
        if self.forks and preload is not None:
            preload()
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="curate-pool")
        self._started = self._starter.submit(self._start)

    def _start(self) -> "distributed.Client":
        import dask
        import distributed
        from distributed.security import Security

        if self.scheduler:
            try:
                client = distributed.Client(self._address, timeout="30s", security=self._security)
            except (OSError, ValueError) as e:
                raise CurateError(f"cannot reach the Dask scheduler at {self.scheduler}: {e}. "
                                  "Start one with `dask scheduler` and workers with `dask worker ADDRESS`.") from e
        else:
            n = self.workers or 1
            with dask.config.set(_local_cluster_config()):
                # scheduler, workers and nannies listen on loopback only, as does the dashboard (one worker
                # is a thread talking to the scheduler in-process: no port at all)
                # TLS with a throw-away certificate of this run: a process of another local user that
                # finds the port cannot join as a client (a client can run code on the workers)
                where = {"host": LOOPBACK, "security": Security.temporary()} if n > 1 else {}
                self._cluster = distributed.LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=n > 1, **where,
                    worker_class=_worker_class(processes=n > 1),
                    # Dask's HTTP servers (health, metrics) run even without the dashboard, on
                    # 0.0.0.0 unless told otherwise
                    dashboard_address=f"{LOOPBACK}:0", scheduler_kwargs={"dashboard": self.dashboard},
                    worker_dashboard_address=f"{LOOPBACK}:0", silence_logs=logging.ERROR)
            try:
                client = distributed.Client(self._cluster)
            except BaseException:
                self._cluster.close()          # otherwise its worker processes outlive us
                raise
        if not self.quiet:
            nw = len(client.scheduler_info().get("workers", {}))
            link = (client.dashboard_link if self.dashboard
                    else "off (one in-process worker)" if self._auto_dashboard else "off (--no-dashboard)")
            print(f"dask: {nw} worker(s), dashboard {link}", file=sys.stderr)
        return client

    def client(self) -> "distributed.Client":
        """The connected client, once the cluster has started."""
        if self._client is None:
            self._client = self._started.result()
        return self._client

    def close(self) -> None:
        try:
            client = self._started.result()
        except BaseException:       # it never started: nothing to close
            client = None
        finally:
            self._starter.shutdown()
        if client is not None:
            client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def pool_client(pool: WorkerPool | None, **start) -> Iterator["distributed.Client"]:
    """The client of `pool` (left running for the caller), or of a pool started here for this
    stage alone with `start`'s arguments (closed at the end)."""
    if pool is not None:
        yield pool.client()
        return
    with WorkerPool(**start) as own:
        yield own.client()


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None, quiet: bool = False,
                dashboard: bool | None = None, tls: dict | None = None) -> Iterator["distributed.Client"]:
    """A connected `distributed.Client` of a WorkerPool started for the `with` block."""
    with WorkerPool(workers, scheduler, quiet=quiet, dashboard=dashboard, tls=tls) as pool:
        yield pool.client()
