"""AdamW with weight decay off norms and biases, and the paper's schedule: linear warmup, then
cosine from the peak to `min_lr_ratio` of it (2e-4 -> 2e-5) at the last step."""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices (attention, experts, gates, embeddings); not norms or biases.

    Norm weights and biases are the 1-D parameters; decaying them pulls scales towards zero, which
    is not regularisation.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    # fused (one kernel) for plain CUDA tensors; otherwise foreach, which also takes FSDP2's DTensors
    from torch.distributed.tensor import DTensor
    fused = all(p.is_cuda and not isinstance(p, DTensor) for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                             eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, cfg: OptimSection, max_steps: int) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, max_steps - 1 - cfg.warmup_steps)     # the last step runs at the minimum
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
