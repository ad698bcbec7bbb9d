"""Streaming, atomic Parquet output of one shard.

    out = ShardOutput(out_dir, shard_id, scores=("ad_score", "perplexity", ...))
    out.add_batch(records, scores, reasons)   # any number of times; row groups are flushed as they fill
    paths = out.commit()                  # rename temporaries into place, drop stale files

Kept documents go to `kept/<domain>/<shard-id>.parquet` (one file per domain the shard has),
rejected ones to `rejected/<shard-id>.parquet` with a `reason`. Each file is written under a
temporary name in its final directory and renamed with os.replace, so a reader (or a resumed run)
never sees a half-written file. Temporary names are common.files.temporary_path's
(`.<name>.curate-<hex>.tmp`); the start-up clean-up removes those and nothing else. Every output path
is checked to lie under the output directory before anything is written.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import CurateError
from common.files import TMP_SUFFIX, is_temporary, temporary_path
from pipeline import arrow_columns
from filters.config import REQUIRED_SCORES    # score columns every output has, filled or not

ROW_GROUP_ROWS = 4096
# Text buffered across all files of a shard before the largest buffer is flushed as a row group.
# One budget for the shard (not one per file) keeps memory flat however many domains it mixes.
SHARD_BUFFER_BYTES = 8 << 20


def score_columns(chain_columns: Sequence[str]) -> tuple[str, ...]:
    """Required score columns first, then the chain's others, in chain order."""
    return tuple(dict.fromkeys([*REQUIRED_SCORES, *chain_columns]))


def output_schema(scores: Sequence[str], rejected: bool) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("text", pa.string()),
              pa.field("domain", pa.string()), pa.field("source", pa.string()),
              pa.field("line", pa.int64(), nullable=False)]
    fields += [pa.field(c, pa.float64()) for c in scores]
    if rejected:
        fields.append(pa.field("reason", pa.string(), nullable=False))
    return pa.schema(fields)


def inside(root: Path, path: Path) -> Path:
    """`path`, refused unless it lies under `root` (a name from a config or an input must not escape)."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise CurateError(f"refusing to write {path}: it lies outside the output directory {root}")
    return path


def remove_temporaries(root: Path) -> int:
    """Delete the temporary files (ours only, see common.files.is_temporary) left by an interrupted run;
    returns how many."""
    n = 0
    if root.is_dir():
        for p in root.rglob(f".*{TMP_SUFFIX}"):
            if p.is_file() and is_temporary(p.name):
                p.unlink()
                n += 1
    return n


class ParquetSink:
    """One Parquet file written in row groups as rows arrive, under a temporary name."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(path)
        # Dictionary-encode and keep min/max statistics only where they pay: a dictionary or
        # min/max over long unique texts costs time and saves nothing.
        small = [f.name for f in schema if f.name != "text"]
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd",
                                       use_dictionary=[c for c in ("domain", "source", "reason") if c in schema.names],
                                       write_statistics=small)
        self._buf: list[pa.RecordBatch] = []
        self._buf_rows = 0
        self.buffered_bytes = 0

    def append(self, batch: pa.RecordBatch, text_bytes: int) -> None:
        """Rows as one Arrow batch in this file's schema; `text_bytes` counts toward the buffer."""
        self._buf.append(batch)
        self._buf_rows += batch.num_rows
        self.buffered_bytes += text_bytes
        if self._buf_rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            # one row group per flush (ROW_GROUP_ROWS plus at most one batch)
            table = pa.Table.from_batches(self._buf, schema=self.schema)
            self.writer.write_table(table, row_group_size=table.num_rows)
            self._buf.clear()
            self._buf_rows = 0
            self.buffered_bytes = 0
            # Arrow's allocator (mimalloc) otherwise keeps the freed row-group buffers and RSS
            # creeps up over a long shard; returning them keeps a worker's footprint flat
            pa.default_memory_pool().release_unused()

    def commit(self) -> Path:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


class ShardOutput:
    """All output files of one shard: kept per domain, rejected."""

    def __init__(self, out_dir: Path, shard_id: str, scores: Sequence[str]) -> None:
        self.out_dir, self.shard_id, self.scores = Path(out_dir), shard_id, tuple(scores)
        self.kept_schema = output_schema(self.scores, rejected=False)
        self.rejected_schema = output_schema(self.scores, rejected=True)
        self.kept: dict[str, ParquetSink] = {}
        self.rejected: ParquetSink | None = None
        self._buffered = 0

    def kept_path(self, domain: str) -> Path:
        return inside(self.out_dir, self.out_dir / "kept" / domain / f"{self.shard_id}.parquet")

    def rejected_path(self) -> Path:
        return inside(self.out_dir, self.out_dir / "rejected" / f"{self.shard_id}.parquet")

    def add_batch(self, records: Sequence, scores: Mapping[str, np.ndarray], reasons: Sequence[str | None]) -> None:
        """Records (readers.Record) with their score columns (float64 per record, NaN = not
        scored, written as null) and reasons (None = kept). Rows are grouped by output file and
        each group becomes one Arrow batch, column by column: no per-row dicts."""
        kept: dict[str, list[int]] = {}
        rejected: list[int] = []
        for i, (rec, reason) in enumerate(zip(records, reasons)):
            if reason is None:
                kept.setdefault(rec.domain, []).append(i)
            else:
                rejected.append(i)
        for domain, rows in kept.items():
            sink = self.kept.get(domain)
            if sink is None:
                sink = self.kept[domain] = ParquetSink(self.kept_path(domain), self.kept_schema)
            self._append(sink, records, scores, rows, None)
        if rejected:
            if self.rejected is None:
                self.rejected = ParquetSink(self.rejected_path(), self.rejected_schema)
            self._append(self.rejected, records, scores, rejected, reasons)

    def _append(self, sink: ParquetSink, records: Sequence, scores: Mapping[str, np.ndarray], rows: list[int],
                reasons: Sequence[str | None] | None) -> None:
        recs = [records[i] for i in rows]
        texts = [r.text for r in recs]
        # arrow_columns, not pa.array: its first call imports pandas (0.27 s a process)
        columns = [arrow_columns.strings([r.id for r in recs]), arrow_columns.strings(texts),
                   arrow_columns.strings([r.domain for r in recs]), arrow_columns.strings([r.source for r in recs]),
                   arrow_columns.int64s([r.line for r in recs])]
        for c in self.scores:
            v = scores.get(c)
            # NaN (not scored) becomes null, as readers of the output expect
            columns.append(pa.nulls(len(rows), pa.float64()) if v is None
                           else arrow_columns.floats(np.asarray(v, dtype=np.float64)[rows]))
        if reasons is not None:
            columns.append(arrow_columns.strings([reasons[i] for i in rows]))
        nbytes = sum(map(len, texts))
        before = sink.buffered_bytes
        sink.append(pa.RecordBatch.from_arrays(columns, schema=sink.schema), nbytes)
        self._buffered += sink.buffered_bytes - before
        if self._buffered > SHARD_BUFFER_BYTES:
            largest = max(self._sinks(), key=lambda s: s.buffered_bytes)
            self._buffered -= largest.buffered_bytes
            largest.flush()

    def _sinks(self) -> list[ParquetSink]:
        return [*self.kept.values(), *([self.rejected] if self.rejected else [])]

    def commit(self) -> list[str]:
        """Move every file into place and delete this shard's files from an earlier run that this
        run did not produce (say a domain whose documents are now all rejected). Returns the
        written paths relative to the output directory."""
        written = {s.commit() for s in self._sinks()}
        remove_shard_outputs(self.out_dir, self.shard_id, keep=written)
        return sorted(str(p.relative_to(self.out_dir)) for p in written)

    def abort(self) -> None:
        for s in self._sinks():
            s.abort()


def remove_shard_outputs(out_dir: Path, shard_id: str, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete a shard's final output files (except `keep`); returns what was deleted."""
    out_dir = Path(out_dir)
    candidates = list((out_dir / "kept").glob(f"*/{shard_id}.parquet")) + [out_dir / "rejected" / f"{shard_id}.parquet"]
    removed = []
    for p in candidates:
        if p.exists() and p not in keep:
            p.unlink()
            removed.append(p)
    return removed


LOCK_NAME = ".curate.lock"


class OutputLock:
    """`--out/.curate.lock`: one run at a time writes into an output directory.

    The file names the holder (host, pid). A second run refuses while the holder lives; a lock left by
    a killed run on this host (its pid is gone) is taken over. A lock from another host cannot be
    checked from here, so it is refused with a message saying how to clear it.
    """

    def __init__(self, out_dir: Path, command: str) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.command = command
        self.held = False

    def acquire(self) -> "OutputLock":
        import psutil

        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
              "command": self.command}
        for _ in range(2):          # a second try only after removing a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise CurateError(
                        f"{self.path.parent} is in use by another run ({holder.get('command', 'curate')}, pid "
                        f"{holder.get('pid')} on {holder.get('host')}); wait for it to finish or use another "
                        f"--out. If that run is gone, delete {self.path}") from None
                print(f"warning: taking over the lock of a run that is no longer running ({self.path})",
                      file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:        # read-only, not ours, a full disk
                raise CurateError(f"--out {self.path.parent} is not writable: {e.strerror}") from e
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as e:
                self.path.unlink(missing_ok=True)
                raise CurateError(f"--out {self.path.parent} is not writable: {e.strerror}") from e
            self.held = True
            return self
        raise CurateError(f"another run took the lock {self.path} at the same moment; try again")

    def _holder(self) -> dict | None:
        """The lock's holder, or None when the file is empty or damaged (its writer died mid-write)."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}       # released meanwhile: the retry takes it
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _stale(holder: dict) -> bool:
        if not holder:
            return True
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        import psutil

        try:
            p = psutil.Process(holder["pid"])
            # a killed run whose parent died too stays a zombie until init reaps it; a pid that was
            # handed to a later process started after the lock was taken
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
            started = holder.get("started")
            return isinstance(started, (int, float)) and abs(p.create_time() - started) > 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:         # alive, another user's
            return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
