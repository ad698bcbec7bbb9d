"""`curate routing CHECKPOINT --tokens TOKDIR`: which experts each domain's tokens go to, per layer.

LLaMA-MoE reports that deeper layers route tokens of different domains to noticeably different
experts, while shallow layers route them alike. This command measures that on the held-out split of
every domain: per layer a domain x expert load matrix (each row: the share of that domain's
(token, slot) assignments each expert received), a heatmap, and one specialisation score,

    specialisation(layer) = sum_d  p(d) * JS( load[d, :] || overall[:] )     (base 2, in [0, 1])

where `overall` is the token-weighted mean of the rows and p(d) the domain's share of tokens. It is
0 when every domain uses the experts alike and grows as their choices separate (two equal domains on
disjoint experts score 0.311; the score is relative, for comparing layers and checkpoints).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import CurateError


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a `curate convert` output or a training checkpoint (checkpoints/step_N)")
    p.add_argument("--tokens", required=True, help="a `curate tokenize` output; its held-out split is used")
    p.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/routing)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: min(model max, 1024))")
    p.add_argument("--max-sequences", type=int, default=64, help="held-out sequences per domain (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


@dataclass
class RoutingReport:
    domains: list[str]
    tokens: dict[str, int]                     # routed tokens per domain
    counts: dict[int, np.ndarray]              # layer -> [domains, experts] assignment counts

    def load(self, layer: int) -> np.ndarray:
        """[domains, experts] rows normalised to sum to 1."""
        c = self.counts[layer].astype(np.float64)
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)

    def specialisation(self, layer: int) -> float:
        return specialisation(self.counts[layer])

    def to_json(self) -> dict:
        layers = {}
        for layer in sorted(self.counts):
            load = self.load(layer)
            layers[str(layer)] = {
                "specialisation": self.specialisation(layer),
                "load": {d: [round(float(x), 6) for x in load[i]] for i, d in enumerate(self.domains)},
                "counts": {d: [int(x) for x in self.counts[layer][i]] for i, d in enumerate(self.domains)},
            }
        return {"domains": self.domains, "tokens": self.tokens, "layers": layers}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint support)."""
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def specialisation(counts: np.ndarray) -> float:
    """Token-weighted mean JS divergence between each domain's expert distribution and the overall one."""
    counts = np.asarray(counts, dtype=np.float64)
    rows = counts.sum(axis=1)
    used = rows > 0
    if used.sum() < 2:
        return 0.0
    counts, rows = counts[used], rows[used]
    overall = counts.sum(axis=0)
    share = rows / rows.sum()
    return float(sum(s * js_divergence(c, overall) for s, c in zip(share, counts)))


def measure_routing(model, sequences: dict[str, np.ndarray], batch_size: int = 8,
                    device: str = "cpu") -> RoutingReport:
    """Run each domain's sequences ([N, T] token ids) through the model and count expert choices."""
    import torch

    moe = model.moe_layers()
    if not moe:
        raise CurateError("this checkpoint is a dense model: there is no routing to analyse")
    num_experts = next(iter(moe.values())).cfg.num_experts
    domains = list(sequences)
    # summed on the device from each layer's own counts (MoELayer.last_counts); read back once
    sums = {layer: torch.zeros(len(domains), num_experts, dtype=torch.float64, device=device) for layer in moe}
    tokens = {d: 0 for d in domains}
    model.eval()
    with torch.no_grad():
        for di, dom in enumerate(domains):
            seqs = sequences[dom]
            for start in range(0, len(seqs), batch_size):
                batch = torch.as_tensor(seqs[start:start + batch_size], dtype=torch.long, device=device)
                model(batch)
                tokens[dom] += batch.numel()
                for layer, m in moe.items():
                    sums[layer][di] += m.last_counts
    counts = {layer: s.cpu().numpy().round().astype(np.int64) for layer, s in sums.items()}
    return RoutingReport(domains=domains, tokens=tokens, counts=counts)


def plot_routing(report: RoutingReport, out: Path) -> Path:
    """One heatmap per layer (domain x expert load) and the specialisation-by-depth curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(report.counts)
    cols = min(6, len(layers))
    rows = -(-len(layers) // cols) + 1
    fig = plt.figure(figsize=(3.2 * cols, 2.6 * rows + 0.5))
    grid = fig.add_gridspec(rows, cols)
    vmax = max(float(report.load(layer).max()) for layer in layers)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        im = ax.imshow(report.load(layer), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"layer {layer}  JS {report.specialisation(layer):.3f}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(report.domains)))
        ax.set_yticklabels(report.domains if i % cols == 0 else [], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.colorbar(im, ax=fig.axes, shrink=0.6, label="share of the domain's assignments")
    ax = fig.add_subplot(grid[rows - 1, :])
    ax.plot(layers, [report.specialisation(layer) for layer in layers], marker="o")
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel("specialisation (JS, bits)")
    ax.set_title("per-domain routing preference by depth")
    ax.grid(alpha=0.3)
    path = out / "routing.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from samplers import PackedTokens
    from trainer.checkpoint_io import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(args.checkpoint, device=device)
    data = PackedTokens(args.tokens)
    if data.vocab_size > cfg.vocab_size:
        raise CurateError(f"the tokens in {args.tokens} use a vocabulary of {data.vocab_size}, larger than the "
                          f"model's {cfg.vocab_size}: tokenize with the model's tokenizer")
    seq_len = args.seq_len or min(cfg.max_seq_len, 1024)
    sequences = {d: data.eval_sequences(d, seq_len, args.max_sequences)[:, :-1] for d in data.domains}
    report = measure_routing(model, sequences, args.batch_size, device)

    out = Path(args.out) if args.out else Path(args.checkpoint) / "routing"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "routing.json.tmp"
    tmp.write_text(json.dumps(report.to_json(), indent=1))
    tmp.replace(out / "routing.json")
    png = plot_routing(report, out)

    table = Table(title=f"routing specialisation by layer ({sum(report.tokens.values()):,} held-out tokens)")
    table.add_column("layer", justify="right")
    table.add_column("JS vs overall", justify="right")
    table.add_column("most-preferred expert per domain")
    for layer in sorted(report.counts):
        load = report.load(layer)
        top = ", ".join(f"{d}:{int(load[i].argmax())}" for i, d in enumerate(report.domains))
        table.add_row(str(layer), f"{report.specialisation(layer):.4f}", top)
    (Console() if sys.stdout.isatty() else Console(width=160)).print(table)
    print(f"wrote {out / 'routing.json'} and {png}")
    return 0
