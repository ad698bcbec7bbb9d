"""Run and shard manifests, their counts, and `curate manifest DIR`.

Counts have one shape everywhere (a shard manifest, the run totals, each `by_domain` entry):

    {"docs_in": 10, "kept": 6, "removed": {"ads": 2, "disfluency": 1}, "malformed": 1,
     "malformed_by_kind": {"bad_json": 1}}

and always satisfy docs_in = kept + sum(removed) + malformed. Lines whose domain could not be
determined (bad JSON, unknown set name) are counted under the domain "unknown".
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path

from pipeline.readers import UNKNOWN_DOMAIN
from common.files import read_manifest, write_atomic

MALFORMED = "malformed:"
PACKAGES = ("llama-moe-curate", "dask", "distributed", "pyarrow", "fsspec", "zstandard", "numpy",
            "fasttext-numpy2", "kenlm", "datasets")


def empty_counts() -> dict:
    return {"docs_in": 0, "kept": 0, "removed": {}, "malformed": 0, "malformed_by_kind": {}}


def _add(c: dict, reason: str | None) -> None:
    c["docs_in"] += 1
    if reason is None:
        c["kept"] += 1
    elif reason.startswith(MALFORMED):
        kind = reason[len(MALFORMED):]
        c["malformed"] += 1
        c["malformed_by_kind"][kind] = c["malformed_by_kind"].get(kind, 0) + 1
    else:
        c["removed"][reason] = c["removed"].get(reason, 0) + 1


def _merge(into: dict, other: dict) -> None:
    for k in ("docs_in", "kept", "malformed"):
        into[k] += other.get(k, 0)
    for k in ("removed", "malformed_by_kind"):
        for key, n in other.get(k, {}).items():
            into[k][key] = into[k].get(key, 0) + n


class Tally:
    """Counts of one shard or one run, in total and by domain."""

    def __init__(self) -> None:
        self.total = empty_counts()
        self.by_domain: dict[str, dict] = {}

    def count(self, domain: str | None, reason: str | None) -> None:
        """One document: reason None = kept, `malformed:<what>`, or a filter's reason."""
        _add(self.total, reason)
        key = domain or UNKNOWN_DOMAIN
        counts = self.by_domain.get(key)       # not setdefault: that builds an empty dict every call
        if counts is None:
            counts = self.by_domain[key] = empty_counts()
        _add(counts, reason)

    def merge(self, counts: dict) -> None:
        """Add a manifest-style dict (totals plus by_domain)."""
        _merge(self.total, counts)
        for d, c in counts.get("by_domain", {}).items():
            _merge(self.by_domain.setdefault(d, empty_counts()), c)

    def to_dict(self) -> dict:
        out = _sorted(self.total)
        out["by_domain"] = {d: _sorted(self.by_domain[d]) for d in sorted(self.by_domain)}
        return out


def _sorted(c: dict) -> dict:
    return {k: dict(sorted(v.items())) if isinstance(v, dict) else v for k, v in c.items()}


def adds_up(c: dict) -> bool:
    """docs_in = kept + removed + malformed, for the counts and every by_domain entry."""
    ok = c["docs_in"] == c["kept"] + sum(c["removed"].values()) + c["malformed"]
    ok = ok and c["malformed"] == sum(c["malformed_by_kind"].values())
    return ok and all(adds_up(d) for d in c.get("by_domain", {}).values())


# ----------------------------------------------------------------------------- files
def shard_manifest_path(out_dir: Path, shard_id: str) -> Path:
    return Path(out_dir) / "shards" / f"{shard_id}.json"


def write_json(path: Path, obj: dict) -> None:
    write_atomic(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_shard_manifest(out_dir: Path, shard_id: str) -> dict | None:
    """The shard's manifest, or None when absent or unreadable (then the shard is redone)."""
    return read_json_object(shard_manifest_path(out_dir, shard_id))


def read_json_object(path: Path) -> dict | None:
    """A JSON object from `path`, or None when the file is absent or holds anything else (only
    possible if written by something else: atomic writes never leave half a file)."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError:          # JSONDecodeError, UnicodeDecodeError
        return None
    return obj if isinstance(obj, dict) else None


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def model_hashes(descriptions: list[dict]) -> dict[str, str]:
    """sha256s found in the filters' describe() dicts: any key ending in `sha256`."""
    out = {}
    for d in descriptions:
        for k, v in d.items():
            if k.endswith("sha256") and isinstance(v, str):
                out[f"{d.get('reason', 'filter')}.{k}"] = v
    return out


# ----------------------------------------------------------------------------- `curate manifest`
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory of `curate filter` or `curate tokenize`")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    m = read_manifest(args.dir, "filter", "tokenize", other_kinds=True)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if m.get("kind") == "filter":
        console.print(filter_table(m))
        sh = m.get("shards", {})
        console.print(f"shards: {sh.get('done', 0)} done, {sh.get('failed', 0)} failed "
                      f"({sh.get('skipped', 0)} skipped as already done); config hash {m.get('config_hash')}")
        for f in m.get("failed", []):
            console.print(f"  failed {f['shard']}: {f['error']}", markup=False)
        for f in m.get("filters", []):
            if f.get("tokenisation"):
                console.print(f"{f['reason']}: KenLM is fed {f['tokenisation']}", markup=False)
    else:
        console.print(generic_table(m, title=f"{args.dir} ({m.get('kind', 'unknown kind')})"))
    return 0


def filter_table(m: dict):
    from rich.table import Table

    t = m["totals"]
    reasons = sorted({r for c in [t, *t["by_domain"].values()] for r in c["removed"]})
    table = Table(title=f"curate filter: {t['kept']} of {t['docs_in']} documents kept")
    for col in ["domain", "docs in", "kept", *[f"removed: {r}" for r in reasons], "malformed", "kept %"]:
        table.add_column(col, justify="left" if col == "domain" else "right")

    def row(name: str, c: dict, **kw) -> None:
        pct = f"{100 * c['kept'] / c['docs_in']:.1f}" if c["docs_in"] else "-"
        table.add_row(name, str(c["docs_in"]), str(c["kept"]), *[str(c["removed"].get(r, 0)) for r in reasons],
                      str(c["malformed"]), pct, **kw)

    for d, c in t["by_domain"].items():
        row(d, c)
    row("total", t, style="bold", end_section=True)
    if t["malformed_by_kind"]:
        table.caption = "malformed: " + ", ".join(f"{k} {n}" for k, n in t["malformed_by_kind"].items())
    return table


def _per_domain(m: dict) -> dict:
    # `curate tokenize` writes {"domains": {name: {...}}}; filter manifests have their own table
    return m.get("domains") or {}


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def generic_table(m: dict, title: str):
    """Whatever per-domain numbers a manifest holds (e.g. tokens and documents of a tokenize run)."""
    from rich.table import Table

    rows = {d: _flatten(v) for d, v in _per_domain(m).items() if isinstance(v, dict)}
    cols = list(dict.fromkeys(k for r in rows.values() for k in r))
    table = Table(title=title)
    table.add_column("domain")
    for c in cols:
        table.add_column(c, justify="right")
    for d, r in rows.items():
        table.add_row(d, *[f"{r[c]:,}" if isinstance(r.get(c), int) else
                           f"{r[c]:.4g}" if c in r else "-" for c in cols])
    if cols and len(rows) > 1:
        table.add_row("total", *[f"{sum(r.get(c, 0) for r in rows.values()):,}"
                                 if all(isinstance(r.get(c, 0), int) for r in rows.values()) else ""
                                 for c in cols], style="bold")
    if not rows:
        table.caption = "no per-domain counts in this manifest"
    return table
