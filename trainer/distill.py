"""Distillation from a teacher model during continual pre-training (`train.distill`).

The converted MoE starts worse than the dense model it came from; the dense model's next-token
distribution on the same batch is a denser signal than the one-hot label. The loss added is

    weight * T^2 * mean over tokens of KL( softmax(teacher / T) || softmax(student / T) )

beside `label_weight` times the usual next-token loss (0 leaves the KL alone, as Minitron's
pruned-model recovery does).

(Hinton et al.'s T^2 keeps the gradient's size independent of the temperature).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean KL(teacher || student) over the tokens where `mask` is true ([..., V] logits, fp32 math)."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * t * t


def load_teacher(path: str, device: torch.device, vocab_size: int):
    """The teacher in eval mode with no gradients; its vocabulary must be the student's."""
    from common.errors import CurateError
    from trainer.checkpoint_io import load_model

    teacher, cfg = load_model(path, device="cpu", dtype=torch.float32)
    if cfg.vocab_size != vocab_size:
        raise CurateError(f"train.distill.teacher {path} has a vocabulary of {cfg.vocab_size}, the student "
                          f"{vocab_size}: distillation compares next-token distributions, so they must match")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()
