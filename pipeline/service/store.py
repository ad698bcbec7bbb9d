"""The job queue and history, in SQLite at ROOT/.curate/jobs.sqlite3.

One connection per call (the web server's threads and the runner's threads share nothing but the file);
WAL mode so readers never wait on the runner's writes. A job row holds its spec (what the client asked,
validated), its status and the process group of the child running it (so a restarted service can stop a
child its killed predecessor left behind).
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

STATUSES = ("queued", "running", "done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    pgid INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
)
"""


class JobStore:
    def __init__(self, path: Path):
        self.path = path
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def add(self, kind: str, spec: dict) -> str:
        job_id = uuid.uuid4().hex[:12]
        with self._db() as db:
            db.execute("INSERT INTO jobs (id, kind, status, spec, created) VALUES (?, ?, 'queued', ?, ?)",
                       (job_id, kind, json.dumps(spec), time.time()))
        return job_id

    def get(self, job_id: str) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _row(row)

    def all(self) -> list[dict]:
        """Newest first."""
        with self._db() as db:
            return [_row(r) for r in db.execute("SELECT * FROM jobs ORDER BY seq DESC")]

    def with_status(self, status: str) -> list[dict]:
        """Oldest first: the queue order."""
        with self._db() as db:
            return [_row(r) for r in db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,))]

    def claim_next(self) -> dict | None:
        """The oldest queued job, marked running (atomically: two runner threads never get the same one)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, error = NULL "
                       "WHERE id = ?", (time.time(), row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"])

    def update(self, job_id: str, **fields) -> None:
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']!r}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once; flag a running one (the runner stops it). Returns the status after."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            status = row["status"]
            if status == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
                status = "cancelled"
            elif status == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            db.execute("COMMIT")
        return status


def _row(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["spec"] = json.loads(d["spec"])
    return d
