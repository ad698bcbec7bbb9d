"""Training runs under the root: every directory holding a `metrics.jsonl`, wherever `curate train` ran
(also under torchrun), and their JSONL records, re-read only when the file changed."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from common.errors import CurateError
from pipeline.service.paths import confine

RECORD_FILES = {"weights": "domain_weights.jsonl", "metrics": "metrics.jsonl", "routing": "routing.jsonl"}
# never holds a run, and may hold very many files
_SKIP_DIRS = {".curate", "checkpoints", "tensorboard", "kept", "rejected", "shards", "eval", "__pycache__",
              ".git", "node_modules"}


class RunIndex:
    """Discovery (cached for `ttl` seconds: pages poll it) and per-file record caches."""

    def __init__(self, root: Path, ttl: float = 2.0):
        self.root, self.ttl = root, ttl
        self._lock = threading.Lock()
        self._found: tuple[float, list[str]] = (0.0, [])
        self._records: dict[Path, tuple[tuple[int, int], list[dict]]] = {}

    def names(self) -> list[str]:
        with self._lock:
            at, names = self._found
            if time.monotonic() - at < self.ttl:
                return names
        found = []
        for d, dirs, files in os.walk(self.root):
            dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
            if "metrics.jsonl" in files:
                found.append(Path(d).relative_to(self.root).as_posix())
        with self._lock:
            self._found = (time.monotonic(), found)
        return found

    def summaries(self) -> list[dict]:
        out = []
        for name in self.names():
            metrics = self.records(name, "metrics")
            last = metrics[-1] if metrics else {}
            out.append({"name": name, "step": last.get("step"), "tokens": last.get("tokens"),
                        "loss": last.get("loss")})
        return out

    def run_dir(self, name: str) -> Path:
        d = confine(self.root, name, "run") if name != "." else self.root
        if not (d / "metrics.jsonl").is_file():
            raise KeyError(name)
        return d

    def records(self, name: str, which: str) -> list[dict]:
        if which not in RECORD_FILES:
            raise CurateError(f"unknown record kind {which!r}")
        path = self.run_dir(name) / RECORD_FILES[which]
        try:
            st = path.stat()
        except FileNotFoundError:
            return []              # routing.jsonl is optional
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._records.get(path)
            if hit is not None and hit[0] == key:
                return hit[1]
        recs = _read_jsonl(path)
        with self._lock:
            self._records[path] = (key, recs)
        return recs


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:     # only the line being written may be partial
                raise
    return out
