"""A filter job's report for its page: the per-domain kept/removed table and the score histograms.

`score_histograms` reads the score columns of the output's Parquet files itself, so the page shows them
while the job runs; `curate inspect`'s histograms (pipeline/inspect.py) need the finished run's manifest
(for the thresholds). Folding the two into one is open work.
"""
from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.manifest import Tally, read_json_object, read_shard_manifest

_NOT_SCORES = {"line"}
BINS = 24


def domain_table(out: Path, shard_ids: list[str]) -> dict:
    """{"by_domain": {domain: counts}, "reasons": [...]} (counts as in pipeline/manifest.py), from the
    manifest when the run finished, else summed over the shards done so far."""
    manifest = read_json_object(out / "manifest.json")
    if manifest is not None and "by_domain" in manifest.get("totals", {}):
        by_domain = manifest["totals"]["by_domain"]
    else:
        tally = Tally()
        for sid in shard_ids:
            m = read_shard_manifest(out, sid)
            if m is not None and m.get("status") == "done":
                tally.merge(m)
        by_domain = tally.to_dict()["by_domain"]
    reasons = sorted({r for t in by_domain.values() for r in t.get("removed", {})})
    return {"by_domain": by_domain, "reasons": reasons}


def _score_columns(schema) -> list[str]:
    import pyarrow as pa

    return [f.name for f in schema if f.name not in _NOT_SCORES and pa.types.is_floating(f.type)]


def score_histograms(out: Path) -> dict:
    """{column: {"log10": bool, "edges": [...], "domains": {domain: {"kept": [...], "removed": [...]}}}}."""
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    files = [(p, "kept") for p in sorted((out / "kept").glob("*/**/*.parquet"))]
    files += [(p, "removed") for p in sorted((out / "rejected").glob("*.parquet"))]
    for path, side in files:
        if path.name.startswith("."):
            continue
        try:
            schema = pq.read_schema(path)
            cols = _score_columns(schema)
            if not cols or "domain" not in schema.names:
                continue
            table = pq.read_table(path, columns=["domain", *cols])
        except OSError:
            continue                   # being written: the next poll reads it
        domains = table.column("domain").to_pylist()
        for c in cols:
            for dom, v in zip(domains, table.column(c).to_pylist()):
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    continue
                values.setdefault(c, {}).setdefault(dom or "?", {"kept": [], "removed": []})[side].append(v)
    out_h = {}
    for c, per_dom in values.items():
        log = c == "perplexity"
        tf = (lambda x: math.log10(max(x, 1e-9))) if log else (lambda x: x)
        allv = [tf(v) for d in per_dom.values() for s in d.values() for v in s]
        lo, hi = min(allv), max(allv)
        if hi <= lo:
            hi = lo + 1.0
        edges = [lo + (hi - lo) * i / BINS for i in range(BINS + 1)]
        doms = {}
        for dom, sides in sorted(per_dom.items()):
            doms[dom] = {}
            for side, vs in sides.items():
                counts = [0] * BINS
                for v in vs:
                    counts[min(BINS - 1, int((tf(v) - lo) / (hi - lo) * BINS))] += 1
                doms[dom][side] = counts
        out_h[c] = {"log10": log, "edges": edges, "domains": doms}
    return out_h
