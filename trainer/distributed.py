"""torchrun plumbing: process group, DDP / FSDP2 wrapping, full state dicts, all-reduce helpers.

A plain `curate train` (no torchrun) is a world of one and touches no process group.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from common.errors import CurateError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    parallel: str = "none"              # none | ddp | fsdp2

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(device: str, parallel: str) -> DistContext:
    """Start the process group when launched by torchrun (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CurateError("train.device is cuda but no CUDA device is available; use auto or cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if parallel == "auto":
        parallel = "ddp" if world > 1 else "none"
    if world > 1:
        if parallel == "none":
            raise CurateError(f"train.parallel is none but torchrun started {world} ranks; use ddp or fsdp2")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world, device=dev, parallel=parallel)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, blocks: nn.ModuleList, ctx: DistContext) -> nn.Module:
    """DDP around the whole model, or FSDP2: `fully_shard` each block, then the root (torchtitan's
    recipe: per-block units overlap the all-gather of block i+1 with the compute of block i).
    Parameters stay fp32 in both; bf16 comes from autocast in the loop."""
    if not ctx.distributed or ctx.parallel == "none":
        return model
    if ctx.parallel == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose attributes (expert_load, config) the loop reads; FSDP2 shards in place."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):     # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (before clipping) over all ranks' shards, a device scalar (reading it waits
    for the GPU, so the caller decides when); clips when max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):    # FSDP2: a replicated DTensor
        norm = norm.full_tensor()
    return norm.detach()


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 weights on CPU, on rank 0 (empty elsewhere under FSDP2). Collective."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded, on rank 0. Collective."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (in place on a copy); identity on one process."""
    if ctx.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / ctx.world_size


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value on every rank (e.g. which checkpoint to resume from)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
