"""Per-domain held-out loss: what the dynamic sampler compares with its reference losses.

The held-out sequences of each domain are split into micro-batches; rank r takes batches r, r+W, ...
and the token-weighted sums are all-reduced, so every rank gets the same numbers whatever the world
size. Under FSDP2 every forward is a collective, so ranks with fewer batches run a zero-weight one.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.distributed import DistContext, all_reduce_sum


@torch.no_grad()
def evaluate_domains(model: nn.Module, sequences: dict[str, torch.Tensor], *, batch_size: int,
                     max_batches: int, ctx: DistContext, autocast) -> dict[str, float]:
    """Mean next-token loss per domain over the first `max_batches` batches of its held-out
    sequences ([N, seq_len + 1] token ids each). Domains without held-out data are left out."""
    was_training = model.training
    model.eval()                        # no gate noise
    sums = torch.zeros(len(sequences), 2, dtype=torch.float64, device=ctx.device)   # loss * tokens, tokens
    for i, seqs in enumerate(sequences.values()):
        n_batches = min(max_batches, math.ceil(len(seqs) / batch_size))
        for k in range(math.ceil(n_batches / ctx.world_size)):
            b = k * ctx.world_size + ctx.rank
            weight = 1.0 if b < n_batches else 0.0
            batch = seqs[(b if weight else 0) * batch_size:][:batch_size].to(ctx.device, non_blocking=True)
            with autocast():
                out = model(batch[:, :-1], labels=batch[:, 1:])
            n = batch[:, 1:].numel()
            sums[i, 0] += weight * n * out.loss.double()     # stays on the device: no wait per batch
            sums[i, 1] += weight * n
    sums = all_reduce_sum(sums, ctx)
    model.train(was_training)
    return {d: float(sums[i, 0] / sums[i, 1]) for i, d in enumerate(sequences) if sums[i, 1] > 0}
