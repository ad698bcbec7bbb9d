"""The filter stage's work on a worker: read a shard -> score in batches -> write Parquet.

`FilterStage` is the stage `pipeline.shard_stage.run_shards` runs (its protocol: markers, failures,
retries, grouping); `process_shard` does one shard. The filter chain is built and its models loaded
once per worker (cached on the worker, keyed by `run_hash`: the filter settings and the models'
contents) rather than once per shard, since loading a KenLM or fastText model costs far more than
scoring a shard of a few thousand lines. `load_on_workers` does that loading up front, as the run's
start-up check.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from filters.base import DocumentFilter
from filters.config import FilterConfig, build_filters
from common.errors import CurateError
from pipeline.domains import DatasetManifest
from pipeline.manifest import MALFORMED, Tally, shard_manifest_path
from pipeline.readers import MAX_LINE_BYTES, Record, Shard, ShardReadError, read_shard
from pipeline.shard_stage import ShardTask
from pipeline.writers import ShardOutput, remove_shard_outputs

BATCH_BYTES = 32 << 20     # also cut a batch at this much text, so a batch of books stays bounded


def load_chain(cfg: FilterConfig) -> list[DocumentFilter]:
    chain = build_filters(cfg)
    for f in chain:
        f.load()
    return chain


#: bump when the output of a shard changes for the same inputs and config, so old results are redone
OUTPUT_VERSION = 1


def run_hash(cfg: FilterConfig, models: dict[str, str], dataset: DatasetManifest,
             max_line_bytes: int = MAX_LINE_BYTES) -> str:
    """What decides a shard's output: filter settings, model contents (sha256), how lines are parsed.
    It also keys each worker's loaded chain: a long-lived worker of a remote cluster must not keep
    scoring with a model that was replaced."""
    key = {"version": OUTPUT_VERSION, "filters": cfg.to_dict(), "models": models,
           "dataset": {"text_field": dataset.text_field, "domain_field": dataset.domain_field,
                       "domain_from": dataset.domain_from, "set_names": dataset.set_names}}
    if max_line_bytes != MAX_LINE_BYTES:      # only then, so outputs made with the default keep their hash
        key["max_line_bytes"] = max_line_bytes
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class InheritedChain:
    """A chain the driver loaded before its local worker processes were forked from it
    (`WorkerPool(preload=...)`): each worker takes it for the same run key instead of loading its
    own, and its models stay one copy in memory, the pages shared with the driver and every other
    worker. Class state because a forked process inherits nothing else: its Worker objects are new."""

    key: str | None = None
    chain: list[DocumentFilter] | None = None

    @classmethod
    def load(cls, cfg: FilterConfig, key: str) -> None:
        cls.key, cls.chain = key, load_chain(cfg)


def worker_chain(cfg: FilterConfig, key: str) -> list[DocumentFilter]:
    """The loaded chain of this worker, built on first use for this key (or inherited)."""
    import distributed

    try:
        worker = distributed.get_worker()
    except ValueError:          # called outside a Dask worker (a benchmark, a test): no cache
        return load_chain(cfg)
    cached = getattr(worker, "curate_filter_chain", None)
    if cached is None and InheritedChain.key == key:
        worker.curate_filter_chain = cached = (key, InheritedChain.chain)
    if cached is None or cached[0] != key:
        # one chain per worker: a new config replaces the old one instead of piling up models
        worker.curate_filter_chain = (key, load_chain(cfg))
    return worker.curate_filter_chain[1]


def _load(cfg: FilterConfig, key: str) -> str | None:
    # a user's error (a missing or corrupt model) comes back as its message: raised on the worker
    # it would be logged there with a traceback, as if it were a bug
    try:
        worker_chain(cfg, key)
    except CurateError as e:
        return str(e)
    return None


def load_on_workers(client, cfg: FilterConfig, key: str) -> None:
    """Load the chain's models on every worker of the cluster now (cached for the shards to come).

    This is the run's start-up check: a missing or corrupt model raises here, naming its file, before
    any shard is read, and it is checked where the shards will be scored (a path the driver can
    read but the workers cannot fails too). A task, not `client.run`, so that a large model loads
    in the worker's task thread rather than blocking its event loop."""
    workers = list(client.scheduler_info().get("workers", {}))
    if not workers:         # a cluster whose workers have not joined yet: check on the driver instead
        load_chain(cfg)
        return
    run = uuid.uuid4().hex[:8]        # distinct from another run's check on the same cluster
    futures = [client.submit(_load, cfg, key, workers=[w], allow_other_workers=False, pure=False,
                             key=f"curate-load-{run}-{i}") for i, w in enumerate(workers)]
    for error in client.gather(futures):
        if error is not None:
            raise CurateError(error)


def score_batch(chain: Sequence[DocumentFilter], texts: list[str], domains: list[str],
                columns: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str | None]]:
    """Run the chain over a batch. Each filter sees only the documents still kept; a document
    rejected by a filter gets its reason and the scores computed so far (NaN for the rest)."""
    n = len(texts)
    scores = {c: np.full(n, np.nan) for c in columns}
    reasons: list[str | None] = [None] * n
    alive = np.arange(n)
    for f in chain:
        if alive.size == 0:
            break
        res = f.filter([texts[i] for i in alive], [domains[i] for i in alive])
        keep = np.asarray(res.keep, dtype=bool)
        if keep.shape != alive.shape:
            raise RuntimeError(f"filter {type(f).__name__} returned {keep.size} decisions for {alive.size} documents")
        for c, v in res.scores.items():
            scores.setdefault(c, np.full(n, np.nan))[alive] = v
        why = res.reasons if res.reasons is not None else np.full(keep.size, f.reason, dtype=object)
        for i, r in zip(alive[~keep], why[~keep]):
            reasons[i] = r
        alive = alive[keep]
    return scores, reasons


def process_shard(shard: Shard, cfg: FilterConfig, dataset: DatasetManifest, out_dir: str,
                  run_key: str, columns: Sequence[str], max_line_bytes: int = MAX_LINE_BYTES
                  ) -> tuple[dict, dict[str, np.ndarray]]:
    """Filter one shard; returns its manifest (the shard stage writes it, last) and the values of
    every score column over the documents it scored (for the run's stats.json, without reading the
    outputs back).

    A stream that breaks part-way still gets what was read scored and written, and the shard is
    marked failed with the error. Any other exception removes this attempt's temporary files and
    propagates (Dask retries the task, then the driver records the failure).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    chain = worker_chain(cfg, run_key)
    out = ShardOutput(out_dir, shard.id, columns)
    tally = Tally()
    error, lines, nbytes = None, 0, 0
    batch: list[Record] = []
    malformed: list[Record] = []     # written in batches too: a shard can be all malformed lines
    batch_bytes = 0
    scored: dict[str, list[np.ndarray]] = {c: [] for c in columns}

    def flush() -> None:
        nonlocal batch_bytes
        if batch:
            scores, reasons = score_batch(chain, [r.text for r in batch], [r.domain for r in batch], columns)
            out.add_batch(batch, scores, reasons)
            for rec, reason in zip(batch, reasons):
                tally.count(rec.domain, reason)
            for c, v in scores.items():
                if c in scored:
                    scored[c].append(v[~np.isnan(v)])
        if malformed:
            reasons = [MALFORMED + r.malformed for r in malformed]
            out.add_batch(malformed, {}, reasons)
            for rec, reason in zip(malformed, reasons):
                tally.count(rec.domain, reason)
        batch.clear()
        malformed.clear()
        batch_bytes = 0

    try:
        try:
            for rec in read_shard(shard, dataset, max_line_bytes):
                lines, nbytes = rec.line, nbytes + rec.nbytes + 1
                if rec.malformed:
                    malformed.append(rec)
                else:
                    batch.append(rec)
                batch_bytes += len(rec.text)
                if len(batch) + len(malformed) >= cfg.batch_size or batch_bytes >= BATCH_BYTES:
                    flush()
        except ShardReadError as e:
            error = f"{e} (the {lines} complete lines before it were processed and written)"
        flush()
        outputs = out.commit()
    except BaseException:
        out.abort()
        raise

    counts = tally.to_dict()
    manifest = {
        "shard": shard.id, "source": shard.url,
        "status": "failed" if error else "done", "error": error,
        "config_hash": run_key,
        **counts,
        "bytes_read": nbytes, "file_bytes": shard.size,
        "duration_s": round(time.perf_counter() - t0, 3),
        "outputs": outputs,
        "warnings": ["empty file: no lines"] if lines == 0 and error is None else [],
    }
    return manifest, {c: np.concatenate(v) if v else np.empty(0) for c, v in scored.items()}


def failed_manifest(shard: Shard, run_key: str, error: str) -> dict:
    """The manifest of a shard that produced nothing (its outputs of an earlier run are removed
    by FilterStage.failed)."""
    return {"shard": shard.id, "source": shard.url, "status": "failed", "error": error, "config_hash": run_key,
            **Tally().to_dict(), "bytes_read": 0, "file_bytes": shard.size, "duration_s": 0.0,
            "outputs": [], "warnings": []}


@dataclass(frozen=True)
class FilterStage:
    """`curate filter` as a shard stage (pipeline.shard_stage): one task payload is a Shard."""

    cfg: FilterConfig
    dataset: DatasetManifest
    out_dir: str
    config_hash: str
    columns: tuple[str, ...]
    max_line_bytes: int = MAX_LINE_BYTES
    name: str = "filter"

    def task(self, shard: Shard) -> ShardTask:
        return ShardTask(id=shard.id, marker=str(shard_manifest_path(Path(self.out_dir), shard.id)),
                         size=shard.size or 0, payload=shard)

    def process(self, task: ShardTask) -> tuple[dict, dict[str, np.ndarray]]:
        return process_shard(task.payload, self.cfg, self.dataset, self.out_dir, self.config_hash, self.columns,
                             self.max_line_bytes)

    def is_done(self, task: ShardTask, marker: dict | None) -> bool:
        return bool(marker) and marker.get("status") == "done" and marker.get("config_hash") == self.config_hash

    def failed(self, task: ShardTask, error: str) -> dict:
        remove_shard_outputs(Path(self.out_dir), task.id)
        return failed_manifest(task.payload, self.config_hash, error)
