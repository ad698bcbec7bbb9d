"""A real `curate serve` process for the service tests: started on a free loopback port, read until it
prints `serving http://...`, stopped by the test."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import VENV_BIN, free_port

TOKEN = "test-token-0123456789"


class Served:
    def __init__(self, root: Path, *extra: str, token: str = TOKEN):
        self.root, self.token = root, token
        self.port = free_port()
        exe = VENV_BIN / "curate"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
        env = {**os.environ, "CURATE_TOKEN": token, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        self.log = open(root.parent / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd + ["serve", "--root", str(root), "--port", str(self.port), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.monotonic() + 60
        while True:
            text = Path(self.log.name).read_text()
            if f"serving http://127.0.0.1:{self.port}" in text:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"curate serve did not start:\n{text}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def request(self, method: str, path: str, body: object = None, token: str | None = "default",
                raw: bytes | None = None, headers: dict | None = None) -> tuple[int, object]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        tok = self.token if token == "default" else token
        if tok is not None:
            hdrs["Authorization"] = f"Bearer {tok}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode(errors="replace")

    def wait_job(self, job_id: str, until=lambda j: j["status"] in ("done", "failed", "cancelled"),
                 timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, job = self.request("GET", f"/api/jobs/{job_id}")
            assert status == 200, job
            if until(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']}: {job}"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()
        return self.proc.returncode
