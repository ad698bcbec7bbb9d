"""Per-domain held-out loss: what the dynamic sampler compares with its reference losses.

The held-out sequences of each domain are split into micro-batches; rank r takes batches r, r+W, ...
and the token-weighted sums are all-reduced, so every rank gets the same numbers whatever the world
size. Under FSDP2 every forward is a collective, so ranks with fewer batches run a zero-weight one.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from trainer.distributed import DistContext, all_reduce_sum


@torch.no_grad()
def evaluate_domains(model: nn.Module, sequences: dict[str, torch.Tensor], *, batch_size: int,
                     max_batches: int, ctx: DistContext, autocast,
                     moe_layers: dict | None = None,
                     on_batch: Callable[[int, int], None] | None = None) -> tuple[dict[str, float], dict[int, list[float]]]:
    """Mean next-token loss per domain over the first `max_batches` batches of its held-out
    sequences ([N, seq_len + 1] token ids each; domains without held-out data are left out), and, for
    the MoE layers in `moe_layers` ({layer: MoELayer}), the fraction of the routed assignments each
    expert received on those batches (summed over ranks; gate noise is off in eval). `on_batch(done,
    total)` is called after each of this rank's batches (a progress display)."""
    was_training = model.training
    model.eval()                        # no gate noise
    sums = torch.zeros(len(sequences), 2, dtype=torch.float64, device=ctx.device)   # loss * tokens, tokens
    layers = list(moe_layers or {})
    counts = None
    rank_batches = [math.ceil(min(max_batches, math.ceil(len(s) / batch_size)) / ctx.world_size)
                    for s in sequences.values()]
    done = 0
    for i, seqs in enumerate(sequences.values()):
        n_batches = min(max_batches, math.ceil(len(seqs) / batch_size))
        for k in range(rank_batches[i]):
            b = k * ctx.world_size + ctx.rank
            weight = 1.0 if b < n_batches else 0.0
            batch = seqs[(b if weight else 0) * batch_size:][:batch_size].to(ctx.device, non_blocking=True)
            with autocast():
                out = model(batch[:, :-1], labels=batch[:, 1:])
            n = batch[:, 1:].numel()
            sums[i, 0] += weight * n * out.loss.double()     # stays on the device: no wait per batch
            sums[i, 1] += weight * n
            if layers:
                c = torch.stack([moe_layers[layer].last_counts.double() for layer in layers]) * weight
                counts = c if counts is None else counts + c
            done += 1
            if on_batch is not None:
                on_batch(done, sum(rank_batches))
    sums = all_reduce_sum(sums, ctx)
    load = {}
    if counts is not None:
        counts = all_reduce_sum(counts, ctx)
        counts = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
        load = {layer: row.tolist() for layer, row in zip(layers, counts.cpu())}
    model.train(was_training)
    losses = {d: float(sums[i, 0] / sums[i, 1]) for i, d in enumerate(sequences) if sums[i, 1] > 0}
    return losses, load
