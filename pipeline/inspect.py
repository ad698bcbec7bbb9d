"""`curate inspect DIR [--domain D] [--reason R] [-n N] [--html FILE]`: what a filter run kept and removed.

Per domain, a histogram of every score column (kept and removed documents stacked) with the
thresholds the run applied drawn on it, and sampled kept and removed documents per reason with
their scores: in the terminal (one page per domain, paged when it is one), or as one self-contained
HTML page (inline SVG, no script, nothing fetched).

Importable pieces (the job page of `curate serve` uses them):

    histograms(out_dir, bins=30) -> {"columns": [...], "domains": {domain: {column: {
        "edges": [...bins + 1 floats], "kept": [...bins ints], "removed": [...bins ints],
        "log": bool (edges are log10 of the score, when its rule says so: perplexity), "threshold": float | None,
        "removes": ">=" | ">" | "<" (which side of the threshold is removed)}}}}
    samples(out_dir, n=5, domain=None, reason=None) -> {domain: {reason or "kept": [{"id", "text",
        <score columns>}]}}           (at most n per group, a deterministic sample)
    filter_stats(out_dir) -> dict     per filter reason: documents removed in total and per domain,
                                      and per score column count / mean / quantiles (datatrove's
                                      stats.json idea); `curate filter` writes it to DIR/stats.json
    render_html(out_dir, n=5) -> str  the whole page

Reads only the score columns (and the text of the sampled documents), so it is cheap on big runs.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

import numpy as np

from common.errors import CurateError
from common.files import read_manifest, write_atomic

KEPT = "kept"
BASE_COLUMNS = ("id", "domain")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory of `curate filter`")
    p.add_argument("--domain", help="only this domain")
    p.add_argument("--reason", help="only documents removed for this reason (or `kept`)")
    p.add_argument("-n", type=int, default=5, help="sampled documents per domain and reason (default: 5)")
    p.add_argument("--html", help="write one self-contained HTML page here instead of printing")


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.dir)
    if args.n < 0:
        raise CurateError(f"-n must be >= 0, got {args.n}")
    if args.html:
        write_atomic(Path(args.html), render_html(out_dir, n=args.n, domain=args.domain, reason=args.reason).encode())
        print(f"wrote {args.html}")
        return 0
    render_terminal(out_dir, n=args.n, domain=args.domain, reason=args.reason)
    return 0


# ----------------------------------------------------------------------------- reading
def manifest(out_dir: str | Path) -> dict:
    return read_manifest(out_dir, "filter")


def _files(out_dir: Path, m: dict) -> tuple[list[Path], list[Path]]:
    """The run's output files: not those of shards another run left in the folder, which its
    counts leave out too (`other_shards_in_out`)."""
    other = set(m.get("other_shards_in_out") or ())
    kept = sorted(p for p in (out_dir / "kept").glob("*/*.parquet") if p.stem not in other)
    rejected = sorted(p for p in (out_dir / "rejected").glob("*.parquet") if p.stem not in other)
    return kept, rejected


def scores_table(out_dir: Path, columns: list[str], with_text: bool = False, m: dict | None = None):
    """One pandas frame of every document of the run (its manifest `m`, read when not given): id,
    domain, reason (`kept` for kept ones), the scores."""
    import pandas as pd
    import pyarrow.parquet as pq

    kept, rejected = _files(out_dir, manifest(out_dir) if m is None else m)
    want = [*BASE_COLUMNS, *columns, *(["text"] if with_text else [])]
    frames = []
    for path, is_kept in [(p, True) for p in kept] + [(p, False) for p in rejected]:
        t = pq.read_table(path, columns=want + ([] if is_kept else ["reason"])).to_pandas()
        if is_kept:
            t["reason"] = KEPT
        frames.append(t)
    if not frames:
        return pd.DataFrame(columns=[*want, "reason"])
    return pd.concat(frames, ignore_index=True)


def rules(m: dict) -> dict[str, dict]:
    """score column -> the rule the run applied to it, as its filter described it in the manifest
    (`filters[].rules`: thresholds per domain, default, the side `removes`)."""
    return {r["column"]: r for f in m.get("filters", []) for r in f.get("rules", ())}


def threshold(rule: dict | None, domain: str) -> tuple[float | None, str]:
    """The threshold `rule` (one of `rules(m)`) applied in `domain` (None: no limit there), and the side removed."""
    if rule is None:
        return None, ">="
    t = rule["thresholds"].get(domain, rule["default"])
    return (None if t is None else float(t)), rule["removes"]


def score_columns(m: dict) -> list[str]:
    """The score columns that hold values in this run (the chain's), in manifest order."""
    ruled = rules(m)
    return [c for c in m.get("columns", []) if c in ruled]


# ----------------------------------------------------------------------------- data for views
def histograms(out_dir: str | Path, bins: int = 30) -> dict:
    out_dir = Path(out_dir)
    m = manifest(out_dir)
    columns = score_columns(m)
    ruled = rules(m)
    table = scores_table(out_dir, columns, m=m)
    result: dict = {"columns": columns, "domains": {}}
    for domain in sorted(table["domain"].unique()) if len(table) else []:
        part = table[table["domain"] == domain]
        per: dict = {}
        for col in columns:
            x = part[col].to_numpy(dtype=np.float64)
            ok = ~np.isnan(x)
            if not ok.any():
                continue
            log = ruled[col]["log"]
            v = np.log10(np.maximum(x[ok], 1e-12)) if log else x[ok]
            t, side = threshold(ruled.get(col), domain)
            lo, hi = float(v.min()), float(v.max())
            if t is not None:
                tv = math.log10(max(t, 1e-12)) if log else t
                if not log and 0 <= lo and hi <= 1:
                    lo, hi = 0.0, 1.0
                lo, hi = min(lo, tv), max(hi, tv)
            elif 0 <= lo and hi <= 1:
                lo, hi = 0.0, 1.0
            if hi <= lo:
                hi = lo + 1.0
            edges = np.linspace(lo, hi, bins + 1)
            removed = (part["reason"].to_numpy()[ok] != KEPT)
            per[col] = {"edges": edges.tolist(),
                        "kept": np.histogram(v[~removed], edges)[0].tolist(),
                        "removed": np.histogram(v[removed], edges)[0].tolist(),
                        "log": log, "threshold": t, "removes": side}
        result["domains"][domain] = per
    return result


def samples(out_dir: str | Path, n: int = 5, domain: str | None = None, reason: str | None = None) -> dict:
    out_dir = Path(out_dir)
    m = manifest(out_dir)
    columns = score_columns(m)
    table = scores_table(out_dir, columns, with_text=True, m=m)
    if domain is not None:
        table = table[table["domain"] == domain]
    if reason is not None:
        table = table[table["reason"] == reason]
    out: dict = {}
    for (d, r), g in table.groupby(["domain", "reason"], sort=True):
        pick = g.sample(n=min(n, len(g)), random_state=0) if n else g.iloc[:0]
        docs = []
        for _, row in pick.iterrows():
            doc = {"id": row["id"], "text": row["text"]}
            doc.update({c: (None if np.isnan(row[c]) else float(row[c])) for c in columns})
            docs.append(doc)
        out.setdefault(d, {})[r] = docs
    return out


def filter_stats(out_dir: str | Path, values: dict[str, np.ndarray] | None = None, m: dict | None = None) -> dict:
    """Per reason: documents removed (total, per domain); per score column, over the documents it
    scored: count, mean, min, quantiles, max (like datatrove's stats.json). `values` (column -> the
    scores, as `curate filter` has them in memory) and `m` (the run manifest) are read from the
    output when not given."""
    out_dir = Path(out_dir)
    m = manifest(out_dir) if m is None else m
    t = m["totals"]
    columns = score_columns(m)
    values = _score_values(out_dir, columns, m) if values is None else values
    stats: dict = {"docs_in": t["docs_in"], "kept": t["kept"], "malformed": t["malformed"], "reasons": {},
                   "scores": {}}
    for r, n in sorted(t["removed"].items()):
        stats["reasons"][r] = {"removed": n, "by_domain": {d: c["removed"].get(r, 0)
                                                           for d, c in sorted(t["by_domain"].items())}}
    for col in columns:
        x = np.sort(values[col])     # sorted: the mean does not depend on the order the shards came in
        x = x[~np.isnan(x)]
        if x.size:
            q = np.quantile(x, [0.1, 0.5, 0.9])
            stats["scores"][col] = {"count": int(x.size), "mean": float(x.mean()), "min": float(x.min()),
                                    "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]), "max": float(x.max())}
    return stats


def _score_values(out_dir: Path, columns: list[str], m: dict) -> dict[str, np.ndarray]:
    """Every output file's score columns, concatenated (null -> NaN). Arrow alone, without pandas:
    `curate filter` calls this at the end of every run, over one file per domain per shard."""
    import pyarrow.parquet as pq

    kept, rejected = _files(out_dir, m)
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for path in kept + rejected:
        t = pq.ParquetFile(path).read(columns=columns)       # ParquetFile: far less set-up than read_table
        for c in columns:
            parts[c].append(t.column(c).to_numpy().astype(np.float64, copy=False))
    return {c: np.concatenate(v) if v else np.empty(0) for c, v in parts.items()}


def write_stats(out_dir: str | Path, values: dict[str, np.ndarray] | None = None, m: dict | None = None) -> Path:
    path = Path(out_dir) / "stats.json"
    write_atomic(path, json.dumps(filter_stats(out_dir, values, m), indent=1).encode())
    return path


# ----------------------------------------------------------------------------- terminal
_BLOCKS = " ▁▂▃▄▅▆▇█"


def _bars(counts: list[int]) -> str:
    top = max(counts) or 1
    return "".join(_BLOCKS[min(8, math.ceil(8 * c / top))] for c in counts)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def render_terminal(out_dir: str | Path, n: int = 5, domain: str | None = None, reason: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    hist = histograms(out_dir)
    docs = samples(out_dir, n=n, domain=domain, reason=reason)
    domains = [d for d in hist["domains"] if domain is None or d == domain]
    if domain is not None and not domains:
        raise CurateError(f"no documents of domain {domain!r} in {out_dir}; domains: {', '.join(hist['domains'])}")
    console = Console() if sys.stdout.isatty() else Console(width=160)
    pager = console.pager(styles=True) if console.is_terminal else _nothing()
    with pager:
        for d in domains:
            console.rule(f"[bold]{d}")
            table = Table(title=f"{d}: score histograms (kept ▁▂▃ / removed ▁▂▃; | marks the threshold bin)")
            for c in ("score", "range", "threshold", "kept", "removed"):
                table.add_column(c)
            for col, h in hist["domains"][d].items():
                edges = h["edges"]
                label = f"log10 {col}" if h["log"] else col
                t = h["threshold"]
                kept_bars, removed_bars = _bars(h["kept"]), _bars(h["removed"])
                if t is not None:
                    tv = math.log10(max(t, 1e-12)) if h["log"] else t
                    i = int(np.clip(np.searchsorted(edges, tv) - 1, 0, len(h["kept"]) - 1))
                    kept_bars = kept_bars[:i] + "|" + kept_bars[i + 1:]
                    removed_bars = removed_bars[:i] + "|" + removed_bars[i + 1:]
                table.add_row(label, f"{edges[0]:.3g}..{edges[-1]:.3g}", f"{h['removes']} {_fmt(t)}" if t is not None
                              else "none", f"[green]{kept_bars}[/] {sum(h['kept'])}",
                              f"[red]{removed_bars}[/] {sum(h['removed'])}")
            console.print(table)
            for r, group in docs.get(d, {}).items():
                st = Table(title=f"{d} / {r}: {len(group)} sampled", show_lines=True)
                st.add_column("id")
                st.add_column("scores")
                st.add_column("text")
                for doc in group:
                    scores = ", ".join(f"{c} {_fmt(doc[c])}" for c in hist["columns"] if doc.get(c) is not None)
                    st.add_row(doc["id"], scores, _snippet(doc["text"], 300))
                console.print(st)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _snippet(text: str, limit: int) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[:limit] + "…"


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2733;background:#fafbfc}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:2px solid #d8dee6;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.hists{display:flex;flex-wrap:wrap;gap:16px}
.hist{background:#fff;border:1px solid #d8dee6;border-radius:6px;padding:8px}
table{border-collapse:collapse;font-size:13px;background:#fff;margin-bottom:8px}
td,th{border:1px solid #d8dee6;padding:4px 8px;vertical-align:top;text-align:left}
td.text{max-width:760px;white-space:pre-wrap}.num{text-align:right}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""


def _svg(col: str, h: dict, width: int = 360, height: int = 170) -> str:
    left, bottom, top = 40, 28, 22
    w, hh = width - left - 10, height - bottom - top
    counts = [k + r for k, r in zip(h["kept"], h["removed"])]
    peak = max(counts) or 1
    n = len(counts)
    bw = w / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(col)} histogram">',
             f'<text x="{left}" y="14" font-size="12" font-weight="600">'
             f'{html.escape(("log10 " if h["log"] else "") + col)}</text>']
    for i, (k, r) in enumerate(zip(h["kept"], h["removed"])):
        x = left + i * bw
        hk, hr = hh * k / peak, hh * r / peak
        if k:
            parts.append(f'<rect x="{x:.1f}" y="{top + hh - hk:.1f}" width="{max(bw - 1, 1):.1f}" '
                         f'height="{hk:.1f}" fill="#4c9a6a"/>')
        if r:
            parts.append(f'<rect x="{x:.1f}" y="{top + hh - hk - hr:.1f}" width="{max(bw - 1, 1):.1f}" '
                         f'height="{hr:.1f}" fill="#d0533f"/>')
    edges = h["edges"]
    parts.append(f'<line x1="{left}" y1="{top + hh}" x2="{left + w}" y2="{top + hh}" stroke="#555"/>')
    for frac, anchor in ((0, "start"), (0.5, "middle"), (1, "end")):
        v = edges[0] + frac * (edges[-1] - edges[0])
        parts.append(f'<text x="{left + frac * w:.1f}" y="{height - 10}" font-size="10" text-anchor="{anchor}">'
                     f'{v:.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">{peak}</text>')
    t = h["threshold"]
    if t is not None:
        tv = math.log10(max(t, 1e-12)) if h["log"] else t
        x = left + w * (tv - edges[0]) / ((edges[-1] - edges[0]) or 1)
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top + hh}" stroke="#1d2733" '
                     f'stroke-width="2" stroke-dasharray="4 3"/>')
        right = x > left + w / 2           # the label on the side with room
        parts.append(f'<text x="{x - 4 if right else x + 4:.1f}" y="{top + 4}" font-size="10" '
                     f'text-anchor="{"end" if right else "start"}">removes {html.escape(h["removes"])} {t:.4g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(out_dir: str | Path, n: int = 5, domain: str | None = None, reason: str | None = None) -> str:
    out_dir = Path(out_dir)
    m = manifest(out_dir)
    hist = histograms(out_dir)
    docs = samples(out_dir, n=n, domain=domain, reason=reason)
    t = m["totals"]
    e = html.escape
    reasons = sorted(t["removed"])
    body = [f"<h1>curate inspect: {e(str(out_dir))}</h1>",
            f"<p>{t['kept']} of {t['docs_in']} documents kept; removed: "
            + (", ".join(f"{e(r)} {n_}" for r, n_ in sorted(t["removed"].items())) or "none")
            + f"; malformed {t['malformed']}. Config hash {e(str(m.get('config_hash')))}.</p>",
            '<p class="legend">Histograms:<span style="background:#4c9a6a"></span>kept'
            '<span style="background:#d0533f"></span>removed by any filter (stacked); the dashed line is '
            'this score\'s threshold in the domain.</p>',
            "<table><tr><th>domain</th><th>docs in</th><th>kept</th>"
            + "".join(f"<th>removed: {e(r)}</th>" for r in reasons) + "<th>malformed</th></tr>"]
    for d, c in sorted(t["by_domain"].items()):
        body.append(f"<tr><td>{e(d)}</td><td class=num>{c['docs_in']}</td><td class=num>{c['kept']}</td>"
                    + "".join(f"<td class=num>{c['removed'].get(r, 0)}</td>" for r in reasons)
                    + f"<td class=num>{c['malformed']}</td></tr>")
    body.append("</table>")
    for d, per in hist["domains"].items():
        if domain is not None and d != domain:
            continue
        body.append(f'<h2 id="{e(d)}">{e(d)}</h2><div class="hists">')
        body += [f'<div class="hist">{_svg(col, h)}</div>' for col, h in per.items()]
        body.append("</div>")
        for r, group in docs.get(d, {}).items():
            body.append(f"<h3>{e(d)} / {e(r)}: {len(group)} sampled</h3><table><tr><th>id</th><th>scores</th>"
                        "<th>text</th></tr>")
            for doc in group:
                scores = "<br>".join(f"{e(c)} {_fmt(doc[c])}" for c in hist["columns"] if doc.get(c) is not None)
                body.append(f"<tr><td>{e(doc['id'])}</td><td>{scores}</td>"
                            f"<td class=text>{e(_snippet(doc['text'], 600))}</td></tr>")
            body.append("</table>")
    return ("<!doctype html><html><head><meta charset=utf-8>"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>curate inspect</title><style>{_CSS}</style></head><body>" + "".join(body) + "</body></html>")
