"""`curate filter INPUT... --out DIR`: score and filter shards on Dask.

The workers start in the background (`cluster.WorkerPool`) while the driver validates everything it
can before any shard is read (inputs exist, the config is valid, the model files exist); then every
worker loads the models, and the shards not already done with the same config hash run as a shard
stage (`shard_stage.run_shards` with `stages.FilterStage`: small shards grouped into tasks, one
failure protocol shared with `curate tokenize`). Finally the driver aggregates the shard manifests
into DIR/manifest.json and writes DIR/stats.json from the scores the tasks returned. It knows no
concrete filter: the chain comes from `filters.config.build_filters` and the output columns from the
chain's `columns`.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common.config import add_print_config_argument
from filters.config import FilterConfig, build_filters, commented_config, load_filter_config
from common.errors import CurateError
from common.progress import add_progress_argument
from common.files import temporary_path
from pipeline import calibrate
from pipeline.cluster import WorkerPool, add_tls_arguments, tls_options
from pipeline.inspect import write_stats
from pipeline.domains import DatasetManifest, load_dataset_manifest
from pipeline.manifest import Tally, adds_up, model_hashes, package_versions, read_shard_manifest, write_json
from pipeline.readers import MAX_LINE_BYTES, Shard, discover_shards
from pipeline.shard_stage import failure_report, run_shards
from pipeline.stages import FilterStage, InheritedChain, load_on_workers, run_hash
from pipeline.writers import OutputLock, remove_temporaries, score_columns

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, directories (searched recursively for *.jsonl, *.jsonl.zst, *.jsonl.gz) or globs; "
                        "local or any fsspec URL")
    p.add_argument("--out", required=True, help="output directory (local, or shared by all workers of a remote cluster)")
    p.add_argument("--config", help="filter config YAML (default: the length filter only)")
    add_print_config_argument(p, commented_config, "filter config")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="start a LocalCluster with N worker processes (default: 1)")
    where.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--dataset", help="dataset manifest YAML naming domains and fields "
                                     "(default: data_manifests/slimpajama.yaml)")
    p.add_argument("--force", action="store_true", help="redo shards even when already done with the same config")
    add_progress_argument(p)
    p.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                   help="a longer input line is skipped to its newline as malformed:line_too_long "
                        f"(default: {MAX_LINE_BYTES >> 20} MiB); it also bounds the memory one line takes")
    p.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=None,
                   help="serve the Dask dashboard of a local cluster on 127.0.0.1 (default: on with --workers 2 "
                        "or more, off for the single in-process worker)")
    add_tls_arguments(p)


def run(args: argparse.Namespace) -> int:
    m = run_filter(args.inputs, args.out, config=args.config, workers=args.workers, scheduler=args.scheduler,
                   dataset=args.dataset, force=args.force, progress=args.progress,
                   max_line_bytes=args.max_line_bytes, dashboard=args.dashboard, tls=tls_options(args))
    t, sh = m["totals"], m["shards"]
    removed = ", ".join(f"{k} {v}" for k, v in t["removed"].items()) or "none"
    print(f"{t['docs_in']} documents in, {t['kept']} kept, removed: {removed}, malformed {t['malformed']}; "
          f"shards {sh['done']} done ({sh['skipped']} already done), {sh['failed']} failed -> {args.out}")
    if m["failed"]:
        print(f"curate filter: {failure_report([(f['shard'], f['error']) for f in m['failed']])}", file=sys.stderr)
        return 1
    return 0


def run_filter(inputs: list[str], out: str | Path, config: str | None = None, workers: int | None = None,
               scheduler: str | None = None, dataset: str | None = None, force: bool = False,
               progress: bool = True, max_line_bytes: int = MAX_LINE_BYTES, dashboard: bool | None = None,
               tls: dict | None = None, pool: WorkerPool | None = None) -> dict:
    """Run the filter stage; returns the run manifest (also written to OUT/manifest.json).

    With `pool` the run uses those workers and leaves them running (another stage may follow);
    otherwise it starts its own (`workers`, `scheduler`, `dashboard`, `tls`) in the background, while
    it checks its inputs, and stops them at the end."""
    t0 = time.perf_counter()
    if workers is not None and workers < 1:
        raise CurateError(f"--workers must be at least 1, got {workers}")
    if max_line_bytes < 1:
        raise CurateError(f"--max-line-bytes must be at least 1, got {max_line_bytes}")
    cfg = load_filter_config(config)
    own = pool is None
    if own:     # starting workers takes seconds: let them start while the driver checks its inputs
        def preload() -> None:      # forked workers inherit the loaded chain instead of loading their own
            ds = load_dataset_manifest(dataset)
            models = model_hashes([f.describe() for f in build_filters(cfg)])
            InheritedChain.load(cfg, run_hash(cfg, models, ds, max_line_bytes))

        pool = WorkerPool(workers, scheduler, dashboard=dashboard, tls=tls, preload=preload)
    try:
        ds = load_dataset_manifest(dataset)
        shards = discover_shards(list(inputs), ds)
        out_dir = Path(out).resolve()
        if out_dir.exists() and not out_dir.is_dir():
            raise CurateError(f"--out {out} exists and is not a directory")
        # hashing the models (cached) also fails here, naming the file, when one is missing
        models = model_hashes([f.describe() for f in build_filters(cfg)])
        # before any work: --out must be writable, and no other run may be writing into it
        created = not out_dir.exists()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CurateError(f"cannot create --out {out}: {e.strerror}") from e
        lock = OutputLock(out_dir, "curate filter")
        try:
            lock.acquire()
            _check_writable(out_dir)
            return _run(inputs, out_dir, cfg, ds, shards, models, t0, pool.client(), force=force,
                        progress=progress, max_line_bytes=max_line_bytes)
        finally:
            lock.release()
            if created and not any(out_dir.iterdir()):     # a run stopped by a start-up check leaves nothing
                out_dir.rmdir()
    finally:
        if own:
            pool.close()


def _check_writable(out_dir: Path) -> None:
    """Write and remove a temporary file in --out and in each output folder already there (the lock
    proved --out itself writable; a read-only folder below it would otherwise fail every shard)."""
    for d in (out_dir / sub for sub in ("kept", "rejected", "shards")):
        if d.is_dir():
            probe = temporary_path(d / "probe")
            try:
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise CurateError(f"--out {out_dir}: cannot write into {d}: {e.strerror}") from e


def _run(inputs: list[str], out_dir: Path, cfg: FilterConfig, ds: DatasetManifest, shards: list[Shard],
         models: dict[str, str], t0: float, client, *, force: bool, progress: bool, max_line_bytes: int) -> dict:
    timings = {"workers_ready_s": round(time.perf_counter() - t0, 3)}
    # drop_fraction settings become concrete per-domain thresholds before the config is hashed,
    # so the manifest and a re-run see the same thresholds (cached beside the output). When they
    # are already known, the workers load the final chain once.
    h = run_hash(cfg, models, ds, max_line_bytes)
    calibrate.check_domains(cfg, ds)
    resolved = calibrate.known(cfg, shards, h, out_dir / "calibration.json")
    if resolved is not None:
        cfg, h = resolved, run_hash(resolved, models, ds, max_line_bytes)
    # every worker loads the models before any shard is read (or anything is written): a
    # corrupt model stops the run here
    load_on_workers(client, cfg, h)
    timings["models_loaded_s"] = round(time.perf_counter() - t0, 3)
    remove_temporaries(out_dir)
    if resolved is None:
        cfg = calibrate.resolve(cfg, shards, ds, client, run_key=h, cache=out_dir / "calibration.json",
                                progress=progress, max_line_bytes=max_line_bytes)
        h = run_hash(cfg, models, ds, max_line_bytes)      # calibration changes thresholds, not model files
    chain = build_filters(cfg)
    descriptions = [f.describe() for f in chain]
    columns = score_columns([c for f in chain for c in f.columns])
    stage = FilterStage(cfg, ds, str(out_dir), h, columns, max_line_bytes)

    results: dict[str, dict] = {}
    todo = []
    for s in shards:
        prev = None if force else read_shard_manifest(out_dir, s.id)
        if stage.is_done(stage.task(s), prev):
            results[s.id] = prev
        else:
            todo.append(s)
    skipped = set(results)
    ids = {s.id for s in shards}
    foreign = sorted(p.stem for p in (out_dir / "shards").glob("*.json") if p.stem not in ids)
    if foreign:
        print(f"warning: {out_dir} also holds the outputs of {len(foreign)} shard(s) that are not among these "
              f"inputs (e.g. {foreign[0]}); they are left alone and not counted. Use a fresh --out to avoid "
              "mixing them into later stages.", file=sys.stderr)
    timings["submitted_s"] = round(time.perf_counter() - t0, 3)
    done = run_shards(client, stage, [stage.task(s) for s in todo], progress=progress, skipped=len(skipped))
    results.update(done.markers)
    n_workers = len(client.scheduler_info().get("workers", {}))
    address = client.scheduler.address if client.scheduler else None

    # a retried task's first attempt may have left a temporary file behind when its worker died
    remove_temporaries(out_dir)
    tally = Tally()
    bytes_read = 0
    failed = []
    for s in shards:
        m = results[s.id]
        tally.merge(m)
        bytes_read += m.get("bytes_read", 0)
        if m["status"] != "done":
            failed.append({"shard": s.id, "source": s.url, "error": m.get("error")})
    totals = tally.to_dict()
    if not adds_up(totals):
        raise RuntimeError(f"counts do not add up: {totals}")   # a bug, never a user error
    timings["processed_s"] = round(time.perf_counter() - t0, 3)
    manifest = {
        "kind": "filter",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(i) for i in inputs],
        "out": str(out_dir),
        "dataset": {"name": ds.name, "source": ds.source, "domains": list(ds.domains)},
        "config": cfg.to_dict(), "config_source": cfg.source, "config_hash": h,
        "filters": descriptions, "models": models, "columns": list(columns),
        "packages": package_versions(),
        "cluster": {"scheduler": address, "workers": n_workers},
        "shards": {"total": len(shards), "done": len(shards) - len(failed), "failed": len(failed),
                   "skipped": len(skipped)},
        "failed": failed,
        "other_shards_in_out": foreign,
        "totals": totals,
        "bytes_read": bytes_read,
        "process_s": round(done.seconds, 3),     # from the first task submitted to the last result
        "timings": timings,                      # seconds since the start of the run
    }
    # per-filter statistics (pipeline/inspect.py) from the scores the tasks returned; only the shards
    # whose scores did not come back (done by an earlier run, or by an attempt of a retried task) are read
    values = _score_values(out_dir, columns, [results[s.id] for s in shards if s.id not in done.extras], done.extras)
    write_stats(out_dir, values, manifest)
    wall = time.perf_counter() - t0
    manifest.update(wall_s=round(wall, 3), docs_per_s=round(totals["docs_in"] / wall, 1) if wall > 0 else None)
    manifest["timings"]["finished_s"] = round(wall, 3)
    write_json(out_dir / "manifest.json", manifest)
    for warning in calibrate.overshoot(cfg, totals):
        print(warning, file=sys.stderr)
    return manifest


def _score_values(out_dir: Path, columns: Sequence[str], earlier: list[dict], extras: dict) -> dict[str, np.ndarray]:
    """Every score column's values over the run's documents: what this run's tasks returned, and
    for the shards an earlier run did, read back from their outputs (score columns only)."""
    import pyarrow.parquet as pq

    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for scores in extras.values():
        for c in columns:
            parts[c].append(scores[c])
    for m in earlier:
        for rel in m.get("outputs", []):
            t = pq.ParquetFile(out_dir / rel).read(columns=list(columns))
            for c in columns:
                v = t.column(c).to_numpy().astype(np.float64, copy=False)
                parts[c].append(v[~np.isnan(v)])
    return {c: np.concatenate(v) if v else np.empty(0) for c, v in parts.items()}
