"""The few collectives ds_trainer makes itself, written so that a group of one needs no process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed


class Group:
    """All ranks of the run; every method is collective (all ranks call it, in the same order)."""

    def __init__(self, world_size: int, device: torch.device | None = None) -> None:
        self.world = world_size
        self.device = device or torch.device("cpu")
        """Where tensors of a collective live: the accelerator's device (NCCL takes no CPU tensors)."""

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def from_rank0(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks; NaN or inf on any rank makes it non-finite everywhere."""
        t = value.detach().float().clone()
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return float(t) / self.world

    def max(self, value: int) -> int:
        """The largest of an integer over ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())
