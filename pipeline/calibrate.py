"""Calibrate `drop_fraction` settings on a sample of the input, before `curate filter` runs.

    cfg = resolve(cfg, shards, dataset, client, run_key=run_hash(cfg, models, dataset), cache=out_dir / "calibration.json")

Picks up to `calibration.max_shards` shards evenly spaced over the sorted input list, reads the
first documents of each (up to `calibration.max_docs` in all), scores them on the Dask workers with
the same filter chain the run uses, and turns each `drop_fraction` into per-domain thresholds
(`filters.config.calibrate_config`). The result is a config with concrete thresholds: it is what
the run hashes, records in its manifest and applies. With `cache`, the thresholds are stored there
and reused while the config, the dataset manifest, the sampled shards and the model files are unchanged, so a resumed
run does not calibrate again (and could not drift if it did: the sample is deterministic).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from filters.base import ModelFilter, Rule
from filters.config import (FilterConfig, build_filters, calibrate_config, calibration_records, parse_filter_config,
                            small_samples)
from common.errors import CurateError
from common.progress import Progress
from pipeline.domains import DatasetManifest
from pipeline.readers import MAX_LINE_BYTES, Shard, ShardReadError, read_shard
from pipeline.stages import worker_chain
from common.files import write_atomic


def check_domains(cfg: FilterConfig, dataset: DatasetManifest) -> None:
    """A domain name in the config that the dataset does not have is a typo: refuse it."""
    unknown = sorted(cfg.domains_named() - set(dataset.domains))
    if unknown:
        where = cfg.source or "filter config"
        raise CurateError(f"{where}: unknown domain(s) {', '.join(unknown)}; the dataset's domains are "
                          f"{', '.join(dataset.domains)}")


def sample_shards(shards: list[Shard], max_shards: int) -> list[Shard]:
    if len(shards) <= max_shards:
        return list(shards)
    picks = np.unique(np.linspace(0, len(shards) - 1, max_shards).round().astype(int))
    return [shards[i] for i in picks]


def score_sample(shard: Shard, cfg: FilterConfig, dataset: DatasetManifest, limit: int, run_key: str,
                 max_line_bytes: int = MAX_LINE_BYTES) -> dict:
    """Runs on a worker: the first `limit` documents of a shard, their domains and every score the
    chain's models give (NaN where a model does not score a document). Lines are read as the run
    reads them (`max_line_bytes`), and documents the rule-based filters (length) reject are left
    out: the models never see either in the run."""
    texts, domains = [], []
    try:
        for rec in read_shard(shard, dataset, max_line_bytes):
            if rec.malformed is None:
                texts.append(rec.text)
                domains.append(rec.domain)
                if len(texts) >= limit:
                    break
    except ShardReadError:
        pass            # a broken shard still gives the documents read before the break
    chain = worker_chain(cfg, run_key)
    alive = np.arange(len(texts))
    for f in chain:
        if not isinstance(f, ModelFilter):  # a rule, not a model: apply it
            keep = np.asarray(f.filter([texts[i] for i in alive], [domains[i] for i in alive]).keep, bool)
            alive = alive[keep]
    scores: dict[str, np.ndarray] = {}
    for f in chain:
        if isinstance(f, ModelFilter):
            cols = {c: np.full(alive.size, np.nan) for c in f.columns}
            for start in range(0, alive.size, cfg.batch_size):
                idx = alive[start:start + cfg.batch_size]
                part = f.score([texts[i] for i in idx], [domains[i] for i in idx])
                for c, v in part.items():
                    cols[c][start:start + idx.size] = v
            scores.update(cols)
    return {"domains": [domains[i] for i in alive], "scores": scores}


def _cache_key(run_key: str, picked: list[Shard], per_shard: int) -> str:
    # run_key covers the filter settings, the models' sha256 and the dataset manifest
    key = {"run": run_key, "shards": [[s.url, s.size] for s in picked], "per_shard": per_shard}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def rules_by_name(cfg: FilterConfig) -> dict[str, Rule]:
    """Every threshold of the chain, by its name in the `calibrated` records, as the filters describe it."""
    return {r.name: r for f in build_filters(cfg) if isinstance(f, ModelFilter) for r in f.rules()}


def _summary(after: FilterConfig) -> str:
    lines = []
    rules = rules_by_name(after)
    for name, rec in calibration_records(after):
        rule = rules[name]
        parts = []
        for d, t in sorted(rule.thresholds.items()):
            n = rec["sample_docs"].get(d)
            share = f" drops {rec['sample_removed'][d]}/{n}" if n else ""
            parts.append(f"{d} {t:.6g}{share}")
        if rule.default is not None and not isinstance(rec["drop_fraction"], dict):
            parts.append(f"other domains {rule.default:.6g}")
        lines.append(f"calibrated {name} (drop_fraction {rec['drop_fraction']}), removes {rule.what} {rule.removes}: "
                     + ", ".join(parts))
    return "\n".join(lines + small_samples(after))


def _sample(cfg: FilterConfig, shards: list[Shard], run_key: str) -> tuple[list[Shard], int, str]:
    picked = sample_shards(shards, cfg.calibration.max_shards)
    per_shard = max(1, math.ceil(cfg.calibration.max_docs / len(picked)))
    return picked, per_shard, _cache_key(run_key, picked, per_shard)


def known(cfg: FilterConfig, shards: list[Shard], run_key: str, cache: str | Path) -> FilterConfig | None:
    """The resolved config without calibrating: `cfg` itself when it has no `drop_fraction`, the
    cached thresholds when `cache` holds them for this run key; None when calibration must run."""
    if not cfg.needs_calibration():
        return cfg
    cache = Path(cache)
    if not cache.is_file():
        return None
    stored = json.loads(cache.read_text())
    if stored.get("key") != _sample(cfg, shards, run_key)[2]:
        return None
    resolved = parse_filter_config(stored["config"], where=str(cache))
    resolved.source = cfg.source
    print(f"calibration: reusing the thresholds in {cache}", file=sys.stderr)
    return resolved


def resolve(cfg: FilterConfig, shards: list[Shard], dataset: DatasetManifest, client,
            run_key: str, cache: str | Path | None = None, progress: bool = True,
            max_line_bytes: int = MAX_LINE_BYTES) -> FilterConfig:
    """The config with every `drop_fraction` replaced by calibrated thresholds (unchanged if none).
    `run_key` is `stages.run_hash` of `cfg`: it names the workers' loaded chain (reused here) and
    keys the cached thresholds."""
    check_domains(cfg, dataset)
    if cache is not None and (done := known(cfg, shards, run_key, cache)) is not None:
        return done
    if not cfg.needs_calibration():
        return cfg
    picked, per_shard, key = _sample(cfg, shards, run_key)
    futures = client.map(score_sample, picked, cfg=cfg, dataset=dataset, limit=per_shard, run_key=run_key,
                         max_line_bytes=max_line_bytes, key=[f"curate-calibrate-{key[:8]}-{s.id}" for s in picked])
    from distributed import as_completed
    with Progress(len(picked), "calibrate", unit="shard", enabled=progress) as bar:
        for _ in as_completed(futures):
            bar.update(1)
    parts = client.gather(futures)          # in the order of `picked`, so the thresholds are reproducible
    domains = [d for p in parts for d in p["domains"]]
    if not domains:
        raise CurateError(f"calibration found no documents in the {len(picked)} sampled shard(s) "
                          f"(all malformed or too short?): cannot turn drop_fraction into thresholds")
    columns = parts[0]["scores"].keys()
    scores = {c: np.concatenate([p["scores"][c] for p in parts]) for c in columns}
    resolved = calibrate_config(cfg, domains, scores)
    print(f"calibration: scored {len(domains)} documents from {len(picked)} shard(s)\n"
          + _summary(resolved), file=sys.stderr)
    if cache is not None:
        write_atomic(Path(cache), json.dumps({"key": key, "config": resolved.to_dict()}, indent=1).encode())
    return resolved


def overshoot(cfg: FilterConfig, totals: dict) -> list[str]:
    """After a run: warnings for every domain a calibrated rule removed far more of (over twice its
    drop fraction, and 5 points more) than asked, as when the run's data differs from the sample.
    A rule's share is of the documents reaching it, as its drop fraction is."""
    # every reason in chain order, calibrated or not: each rule sees what the earlier ones keep
    order = [r for f in build_filters(cfg) for r in f.all_reasons()]
    rules = rules_by_name(cfg)
    out = []
    for d, c in sorted(totals.get("by_domain", {}).items()):
        for name, rec in calibration_records(cfg):
            fraction = rec["drop_fraction"]
            f = fraction.get(d) if isinstance(fraction, dict) else fraction
            reasons = rules[name].reasons
            first = min(order.index(r) for r in reasons)
            reach = c["docs_in"] - c["malformed"] - sum(c["removed"].get(r, 0) for r in order[:first])
            removed = sum(c["removed"].get(r, 0) for r in reasons)
            if f is not None and reach > 0 and removed / reach > max(2 * f, f + 0.05):
                out.append(f"warning: {name} removed {removed} of {reach} {d} documents ({removed / reach:.0%}) "
                           f"while its drop_fraction asked for {f:.0%}: the calibration sample does not "
                           f"represent this domain (see calibration.json, raise calibration.max_docs)")
    return out
