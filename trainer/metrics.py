"""What a run leaves to read: RUN/metrics.jsonl, RUN/domain_weights.jsonl, RUN/routing.jsonl (expert
load per layer at each evaluation), RUN/tensorboard/, and a progress bar. Only rank 0 writes. On resume the JSONL files are cut back to the checkpoint's step
(the killed run may have logged past it) and TensorBoard purges the same steps, so nothing repeats.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from common.errors import CurateError
from common.files import write_atomic
from common.progress import Progress

METRICS = "metrics.jsonl"
DOMAIN_WEIGHTS = "domain_weights.jsonl"
ROUTING = "routing.jsonl"
DEAD_SHARE = 0.01       # an expert under 1% of a layer's assignments is warned about (uniform: top_k / E)


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int, max_steps: int, resumed: bool,
                 progress: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self.bar = None
        self.last_record: dict | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, DOMAIN_WEIGHTS, ROUTING):
            truncate_jsonl(self.run_dir / name, start_step if resumed else -1)
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a killed run wrote after the checkpoint we resume from
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if resumed else None)
        # step N/M with ETA: a bar on a terminal, a line every 10 s or 10% in a log
        self.bar = Progress(total=max_steps, initial=start_step, desc="train", unit="step", enabled=progress)

    def log_step(self, record: dict, expert_load: dict[str, list[float]] | None = None) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run_dir / METRICS, record)
        step = record["step"]
        for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
            if record.get(key) is not None:
                self.tb.add_scalar(f"train/{key}", record[key], step)
        for layer, load in (expert_load or {}).items():
            total = sum(load) or 1.0
            for e, v in enumerate(load):
                self.tb.add_scalar(f"expert_load/layer_{layer}/expert_{e}", v / total, step)
        self.last_record = record
        self.bar.set_fields(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                            tokens_per_s=f"{record['tokens_per_s']:,.0f}")

    def log_domains(self, record: dict) -> None:
        """One evaluation: {tokens, step, weights, eval_loss}."""
        if not self.enabled:
            return
        append_jsonl(self.run_dir / DOMAIN_WEIGHTS, record)
        for d, w in record["weights"].items():
            self.tb.add_scalar(f"weights/{d}", w, record["step"])
        for d, loss in record["eval_loss"].items():
            self.tb.add_scalar(f"eval_loss/{d}", loss, record["step"])
        self.tb.flush()

    def log_routing(self, record: dict) -> None:
        """One evaluation's router health: {step, tokens, layers: {layer: [share of assignments per expert]}}
        (held-out batches, no gate noise). Warns, naming the layer, when an expert gets under 1%."""
        if not self.enabled:
            return
        append_jsonl(self.run_dir / ROUTING, record)
        step = record["step"]
        starved = []
        for layer, shares in record["layers"].items():
            for e, v in enumerate(shares):
                self.tb.add_scalar(f"routing/layer_{layer}/expert_{e}", v, step)
            self.tb.add_scalar(f"routing_busiest/layer_{layer}", max(shares), step)
            low = [f"{e} ({v:.1%})" for e, v in enumerate(shares) if v < DEAD_SHARE]
            if low:
                starved.append(f"layer {layer}: expert(s) {', '.join(low)}")
        self.tb.flush()
        if starved:
            self.message(f"warning: at step {step} some experts get under {DEAD_SHARE:.0%} of the held-out "
                         f"assignments -- " + "; ".join(starved))

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def working(self, **fields) -> None:
        """Show on the progress display what a long step between optimizer steps is doing
        (eval="3/28 batches"); a field given None is cleared."""
        if self.bar is not None:
            self.bar.set_fields(**fields)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.note(text, file=sys.stdout)     # above the bar when there is one

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
        r = self.last_record
        if r is not None:       # the result, on stdout
            print(f"step {r['step']}: loss {r['loss']:.4f} aux {r['aux_loss']:.2e} lr {r['lr']:.2e} "
                  f"grad norm {r['grad_norm']:.3f} {r['tokens_per_s']:,.0f} tokens/s; run dir {self.run_dir}",
                  flush=True)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(_finite(record)) + "\n")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep records with step <= last_step (all of them are dropped when last_step < 0). A torn last
    line (killed mid-write) is dropped too; a damaged line before it is a CurateError, not lost silently."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise CurateError(f"{path}: line {number} is not JSON (only a torn last line is dropped on resume)")
        if rec.get("step", 0) <= last_step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept).encode())


def _finite(record: dict) -> dict:
    # JSON has no NaN/inf: a diverged loss is written as null rather than an unparsable file
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


# Dense bf16 tensor-core peaks (FLOP/s) of the GPUs we know; anything else needs train.peak_flops.
# First match wins, so the more specific names come first.
PEAK_BF16 = {"H100 PCIe": 756e12, "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device) -> float | None:
    if getattr(device, "type", None) != "cuda":
        return None
    import torch
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
