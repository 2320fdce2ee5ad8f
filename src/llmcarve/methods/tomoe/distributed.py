"""Data-parallel ToMoE training that gives each process exactly the gradients one process would get.

Every process holds the frozen model and the same heads, and trains on its equal share of every
batch. Three quantities of a step belong to the whole batch, not to a share, so they are reduced
across processes:
- the widest per-token V mask (the budget counts the widest token of the batch);
- the hard expert load shares of the balance loss;
- the per-token noise (each process draws the whole batch's noise and keeps its rows, see gumbel.py).
Losses that are means over tokens need nothing: the mean of equal shares' means is the batch mean,
so averaging gradients over processes (`average_gradients`) reproduces the one-process gradient.
With one process every function here is the plain single-process operation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Shard":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def rows(self, whole_batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor whose first dimension is the whole batch."""
        per_process = whole_batch.shape[0] // self.world
        return whole_batch[self.rank * per_process : (self.rank + 1) * per_process]


SINGLE = Shard()


def batch_max(values: torch.Tensor, shard: Shard) -> torch.Tensor:
    """values.max() over the whole batch, with torch's gradient: split evenly over the tied maxima.

    The value is the global maximum on every process; the gradient flows only where a process holds
    a maximal entry, scaled so that after `average_gradients` each tied entry gets 1/ties of it.
    """
    local = values.max()
    if shard.world == 1:
        return local
    top = local.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    ties_here = (values.detach() == top).sum().to(local.dtype)
    ties = ties_here.clone()
    dist.all_reduce(ties)
    return top + (shard.world * ties_here / ties) * (local - local.detach())


def batch_mean(value: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Mean over processes of a per-share mean (no gradient): the whole batch's mean."""
    if shard.world == 1:
        return value.detach()
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / shard.world


def average_gradients(parameters, shard: Shard) -> None:
    if shard.world == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= shard.world


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_process_group(device: torch.device) -> tuple[Shard, torch.device]:
    """Under torchrun: join the group (NCCL on GPUs, gloo on CPUs) and take this process's GPU."""
    if not launched_by_torchrun():
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Shard.current(), device
