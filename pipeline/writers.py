"""Streaming, atomic Parquet output of one shard.

    out = ShardOutput(out_dir, shard_id, scores=("ad_score", "perplexity", ...))
    out.add_batch(records, scores, reasons)   # any number of times; row groups are flushed as they fill
    paths = out.commit()                  # rename temporaries into place, drop stale files

Kept documents go to `kept/<domain>/<shard-id>.parquet` (one file per domain the shard has),
rejected ones to `rejected/<shard-id>.parquet` with a `reason`. Each file is written under a
temporary name in its final directory and renamed with os.replace, so a reader (or a resumed run)
never sees a half-written file. Temporary names end in `.tmp` and start with a dot.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.files import TMP_SUFFIX, is_temporary, temporary_path

#: score columns every output has, whether or not the chain fills them (null when not scored)
REQUIRED_SCORES = ("ad_score", "perplexity")
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


def remove_temporaries(root: Path) -> int:
    """Delete temporary files left by an interrupted run; returns how many."""
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
        return self.out_dir / "kept" / domain / f"{self.shard_id}.parquet"

    def rejected_path(self) -> Path:
        return self.out_dir / "rejected" / f"{self.shard_id}.parquet"

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
        columns = [pa.array([r.id for r in recs], pa.string()), pa.array(texts, pa.string()),
                   pa.array([r.domain for r in recs], pa.string()), pa.array([r.source for r in recs], pa.string()),
                   pa.array([r.line for r in recs], pa.int64())]
        for c in self.scores:
            v = scores.get(c)
            # from_pandas: NaN (not scored) becomes null, as readers of the output expect
            columns.append(pa.nulls(len(rows), pa.float64()) if v is None
                           else pa.array(np.asarray(v, dtype=np.float64)[rows], from_pandas=True))
        if reasons is not None:
            columns.append(pa.array([reasons[i] for i in rows], pa.string()))
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
