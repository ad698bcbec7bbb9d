"""Runs queued jobs, `concurrency` at a time, each as a `curate filter|tokenize` child process.

A child process per job keeps a crashing filter from taking the service down and makes cancelling a
matter of signalling one process group. The child is the command itself (same code, same checks), on
the service's cluster setting. Each child gets its own session (so its Dask workers can be stopped with
it) and dies with the service (PR_SET_PDEATHSIG); its process group is kept in the store, so a service
restarted after SIGKILL first stops any survivor, then re-queues the jobs that were running: `curate
filter` skips the shards already done with the same config hash.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from pipeline.service.jobs import command
from pipeline.service.store import JobStore

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGKILL when the service dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass   # not Linux: the restart check below still stops a survivor


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_group(pgid: int) -> bool:
    """The recorded process group still belongs to a `curate` job. While its leader lives, its command line
    says so (its pid may have been reused otherwise); once the leader is gone, the kernel hands out no pid
    equal to a live group's id, so the members left are the job's own (its Dask worker processes)."""
    try:
        return b"pipeline.cli" in Path(f"/proc/{pgid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class Runner:
    def __init__(self, root: Path, store: JobStore, workers: int | None, scheduler: str | None,
                 concurrency: int = 1):
        self.root, self.store = root, store
        self.workers, self.scheduler = workers, scheduler
        self.concurrency = max(1, concurrency)
        self.logs = root / ".curate" / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []
        self._loop: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def recover(self) -> list[str]:
        """After a restart: stop children a killed service left behind, re-queue its running jobs
        (ahead of the queue: they keep their place in it), and return their ids."""
        resumed = []
        for job in self.store.with_status("running"):
            pgid = job["pgid"]
            if pgid and _group_alive(pgid) and _is_our_group(pgid):
                os.killpg(pgid, signal.SIGKILL)
            if job["cancel_requested"]:
                self.store.update(job["id"], status="cancelled", finished=time.time(), pgid=None)
            else:
                self.store.update(job["id"], status="queued", pgid=None)
                resumed.append(job["id"])
        return resumed

    def start(self) -> None:
        self._loop = threading.Thread(target=self._run_loop, name="curate-runner", daemon=True)
        self._loop.start()
        self.kick()

    def kick(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: stop the running children (their jobs go back to the queue, to resume at the next
        start), and wait for them."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        for t in self._threads:
            t.join(timeout=5)
        if self._loop is not None:
            self._loop.join(timeout=5)

    # ------------------------------------------------------------------ jobs
    def cancel(self, job_id: str) -> None:
        """Called after the store flagged a running job: stop its child (the job thread records it)."""
        with self._lock:
            p = self._procs.get(job_id)
        if p is not None:
            _signal_group(p, signal.SIGTERM)

    def _run_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            while not self._stopping.is_set():
                with self._lock:
                    free = self.concurrency - len(self._procs)
                if free <= 0:
                    break
                job = self.store.claim_next()
                if job is None:
                    break
                self._launch(job)

    def _launch(self, job: dict) -> None:
        log = self.logs / f"{job['id']}.log"
        cmd = command(job["spec"], self.workers, self.scheduler)
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as fh:
            fh.write(f"$ {' '.join(cmd[2:])}\n".encode())
            fh.flush()
            p = subprocess.Popen(cmd, cwd=self.root, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True, preexec_fn=_die_with_parent)
        with self._lock:
            self._procs[job["id"]] = p
        self.store.update(job["id"], pgid=p.pid)
        t = threading.Thread(target=self._watch, args=(job["id"], p, log), name=f"job-{job['id']}", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _watch(self, job_id: str, p: subprocess.Popen, log: Path) -> None:
        rc = p.wait()
        with self._lock:
            self._procs.pop(job_id, None)
        job = self.store.get(job_id)
        if job["cancel_requested"] and rc != 0:
            self.store.update(job_id, status="cancelled", finished=time.time(), pgid=None)
        elif self._stopping.is_set() and rc != 0:
            self.store.update(job_id, status="queued", pgid=None)      # resumed at the next start
        elif rc == 0:
            # also when a cancel came too late: the job completed and its outputs are whole
            self.store.update(job_id, status="done", finished=time.time(), pgid=None)
        else:
            tail = _log_tail(log)
            self.store.update(job_id, status="failed", finished=time.time(), pgid=None,
                              error=f"exit code {rc}: {tail}" if tail else f"exit code {rc}")
        self.kick()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass   # already gone
