"""`curate curves RUN_DIR [--out FILE.png]`: domain-weight and per-domain loss curves of a run.

Reads RUN_DIR/domain_weights.jsonl (one JSON per update: tokens, weights {domain: w},
eval_loss {domain: loss} or null, optionally reference {domain: loss}) and RUN_DIR/metrics.jsonl
(step, tokens, loss, lr, ...). Writes a PNG with four panels (weights over tokens as a stacked
area; per-domain held-out loss with the reference losses dashed; loss minus reference; training
loss) and, beside it, a self-contained HTML page (the PNG inlined, the weight records as a table).
Reference losses come from the records, else from the run's config.yaml sampler section.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from pathlib import Path

from common.errors import CurateError

WEIGHTS_FILE, METRICS_FILE, ROUTING_FILE = "domain_weights.jsonl", "metrics.jsonl", "routing.jsonl"
DEAD_SHARE = 0.01


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (holds domain_weights.jsonl and metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png); the HTML goes beside it")


def run(args: argparse.Namespace) -> int:
    png, page = plot_curves(args.run_dir, args.out)
    print(f"wrote {png} and {page}")
    return 0


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CurateError(f"{path}:{n} is not valid JSON ({e}); fix or delete that line") from e
        if not isinstance(rec, dict):
            raise CurateError(f"{path}:{n}: expected a JSON object per line")
        records.append(rec)
    return records


def load_run(run_dir: str | Path) -> tuple[list[dict], list[dict], dict[str, float] | None]:
    """(weight records, metrics records, reference losses or None) of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CurateError(f"run directory {run_dir} does not exist")
    missing = [f for f in (WEIGHTS_FILE, METRICS_FILE) if not (run_dir / f).is_file()]
    if missing:
        raise CurateError(f"{run_dir} has no {' and no '.join(missing)}: give the --out directory of "
                          "`curate train` (it writes them as it trains)")
    weights = read_jsonl(run_dir / WEIGHTS_FILE)
    for n, rec in enumerate(weights, 1):
        if not isinstance(rec.get("weights"), dict) or not isinstance(rec.get("tokens"), (int, float)):
            raise CurateError(f"{run_dir / WEIGHTS_FILE}: record {n} lacks 'tokens' or a 'weights' mapping")
    if not weights:
        raise CurateError(f"{run_dir / WEIGHTS_FILE} has no records yet")
    metrics = [m for m in read_jsonl(run_dir / METRICS_FILE) if "tokens" in m and "loss" in m]
    return weights, metrics, _reference(run_dir, weights)


def _reference(run_dir: Path, weights: list[dict]) -> dict[str, float] | None:
    """The records' own references, else what the run's sampler config says: the manifest's, a
    file's, or with `measure` the first evaluation (that is how the sampler set them)."""
    for rec in reversed(weights):
        if isinstance(rec.get("reference"), dict):
            return {d: float(v) for d, v in rec["reference"].items()}
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    import yaml
    from samplers.config import MEASURE, SamplerConfig
    section = (yaml.safe_load(config.read_text()) or {}).get("sampler") or {}
    cfg = SamplerConfig.from_dict(section, where=f"{config}: sampler")
    if cfg.reference_losses == MEASURE:
        first = next((r for r in weights if isinstance(r.get("eval_loss"), dict)), None)
        return None if first is None else {d: float(v) for d, v in first["eval_loss"].items()}
    return cfg.reference(list(weights[0]["weights"]))


def human_tokens(x: float, _pos=None) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    run_dir = Path(run_dir)
    weights, metrics, reference = load_run(run_dir)
    png = Path(out) if out else run_dir / "curves.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    domains = list(dict.fromkeys(d for rec in weights for d in rec["weights"]))
    colors = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(domains)}
    end = max([r["tokens"] for r in weights] + [m["tokens"] for m in metrics])

    routing = read_jsonl(run_dir / ROUTING_FILE) if (run_dir / ROUTING_FILE).is_file() else []
    routing = [r for r in routing if isinstance(r.get("layers"), dict) and r["layers"] and "tokens" in r]
    if routing:
        fig, axes = plt.subplots(3, 2, figsize=(14, 14), constrained_layout=True)
        (ax_w, ax_l), (ax_x, ax_t), (ax_min, ax_max) = axes
        _plot_routing(fig, ax_min, ax_max, routing)
    else:
        fig, axes = plt.subplots(2, 2, figsize=(14, 9.5), constrained_layout=True)
        (ax_w, ax_l), (ax_x, ax_t) = axes
    fig.suptitle(f"{run_dir.resolve().name}: domain weights and losses", fontsize=15, fontweight="bold")

    # weights: a step function, each record in effect until the next one
    xs, ys = [], {d: [] for d in domains}
    for i, rec in enumerate(weights):
        stop = weights[i + 1]["tokens"] if i + 1 < len(weights) else max(end, rec["tokens"])
        xs += [rec["tokens"], stop]
        for d in domains:
            ys[d] += [rec["weights"].get(d, 0.0)] * 2
    ax_w.stackplot(xs, [ys[d] for d in domains], labels=domains, colors=[colors[d] for d in domains], alpha=0.85)
    ax_w.set(title=f"Domain weights ({len(weights)} records)", ylabel="sampling weight", ylim=(0, 1))
    ax_w.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title="domain")

    evals = [r for r in weights if isinstance(r.get("eval_loss"), dict)]
    for d in domains:
        pts = [(r["tokens"], r["eval_loss"][d]) for r in evals if d in r["eval_loss"]]
        if pts:
            ax_l.plot(*zip(*pts), marker="o", ms=4, color=colors[d], label=d)
        if reference and d in reference:
            ax_l.axhline(reference[d], color=colors[d], ls="--", lw=1, alpha=0.8)
    ax_l.set(title="Held-out loss per domain" + (" (dashed: reference)" if reference else ""), ylabel="loss")

    if reference and evals:
        for d in domains:
            pts = [(r["tokens"], r["eval_loss"][d] - reference[d]) for r in evals
                   if d in r["eval_loss"] and d in reference]
            if pts:
                ax_x.plot(*zip(*pts), marker="o", ms=4, color=colors[d], label=d)
        ax_x.axhline(0, color="black", lw=1)
        ax_x.set(title="Loss minus reference (the dynamic rules favour the highest)", ylabel="loss - reference")
    else:
        ax_x.set_title("Loss minus reference")
        ax_x.text(0.5, 0.5, "no reference losses known" if evals else "no evaluations yet",
                  ha="center", va="center", transform=ax_x.transAxes, fontsize=12, color="gray")

    if metrics:
        ax_t.plot([m["tokens"] for m in metrics], [m["loss"] for m in metrics], color="tab:blue", lw=1.2,
                  label="training loss")
        ax_t.set(title=f"Training loss ({len(metrics)} logged steps)", ylabel="loss")
        lrs = [(m["tokens"], m["lr"]) for m in metrics if isinstance(m.get("lr"), (int, float))]
        if lrs:
            ax_lr = ax_t.twinx()
            ax_lr.plot(*zip(*lrs), color="tab:orange", lw=1, ls=":", label="learning rate")
            ax_lr.set_ylabel("learning rate", color="tab:orange")
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        ax_t.set_title("Training loss")
        ax_t.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", transform=ax_t.transAxes,
                  fontsize=12, color="gray")

    for ax in axes.flat:
        ax.set_xlim(0, max(end, 1))      # one token axis for all panels
        ax.xaxis.set_major_formatter(FuncFormatter(human_tokens))
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    for ax in (ax_l, ax_x):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from common.files import write_atomic
    write_atomic(png, buf.getvalue())
    page = png.with_suffix(".html")
    write_atomic(page, _html(run_dir, buf.getvalue(), weights, domains, reference).encode())
    return png, page


def _plot_routing(fig, ax_min, ax_max, routing: list[dict]) -> None:
    """Router health from RUN/routing.jsonl: per layer (colour = depth), the smallest and the largest
    expert's share of the held-out assignments at each evaluation."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    layers = sorted({int(k) for r in routing for k in r["layers"]})
    norm = Normalize(min(layers), max(max(layers), min(layers) + 1))
    cmap = plt.get_cmap("viridis")
    xs = [r["tokens"] for r in routing]
    for layer in layers:
        shares = [r["layers"].get(str(layer)) for r in routing]
        pts = [(x, v) for x, v in zip(xs, shares) if v]
        if not pts:
            continue
        ax_min.plot([x for x, _ in pts], [min(v) for _, v in pts], color=cmap(norm(layer)), lw=1, marker=".")
        ax_max.plot([x for x, _ in pts], [max(v) for _, v in pts], color=cmap(norm(layer)), lw=1, marker=".")
    last = routing[-1]["layers"]
    starved = sum(v < DEAD_SHARE for shares in last.values() for v in shares)
    uniform = 1 / len(next(iter(last.values())))
    ax_min.axhline(DEAD_SHARE, color="red", ls="--", lw=1)
    ax_min.set(title=f"Smallest expert share per layer\n{starved} under {DEAD_SHARE:.0%} at the last evaluation "
                     "(red line: 1%)", ylabel="share of held-out assignments", ylim=(0, None))
    worst = max(last, key=lambda k: max(last[k]))
    ax_max.axhline(uniform, color="gray", ls=":", lw=1)
    ax_max.set(title=f"Largest expert share per layer\nlast: {max(last[worst]):.0%} in layer {worst} "
                     f"(dotted: uniform {uniform:.1%})", ylabel="share of held-out assignments", ylim=(0, None))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=[ax_min, ax_max], label="layer", shrink=0.9)
    bar.locator = MaxNLocator(integer=True)      # layers are whole numbers
    bar.update_ticks()


def _html(run_dir: Path, png: bytes, weights: list[dict], domains: list[str], reference) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(d)}<br><small>weight / loss</small></th>" for d in domains)
    rows = []
    for rec in weights:
        losses = rec.get("eval_loss") or {}
        cells = "".join(f"<td>{rec['weights'].get(d, 0):.4f} / {_fmt(losses.get(d))}</td>" for d in domains)
        rows.append(f"<tr><td title='{int(rec['tokens']):,}'>{human_tokens(rec['tokens'])}</td>{cells}</tr>")
    ref = ("<p>Reference losses: " + ", ".join(f"{esc(d)} {v:.4f}" for d, v in reference.items()) + "</p>"
           if reference else "<p>No reference losses known.</p>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{esc(run_dir.name)}: domain weights</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} img{{max-width:100%}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}} tr:nth-child(even){{background:#fafafa}}</style></head>
<body><h1>{esc(run_dir.name)}: domain weights and losses</h1>
<img alt="curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Weight records ({len(weights)})</h2>{ref}
<table><tr><th>tokens</th>{head}</tr>
{chr(10).join(rows)}
</table></body></html>
"""


def _fmt(v) -> str:
    return "-" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.4f}"
