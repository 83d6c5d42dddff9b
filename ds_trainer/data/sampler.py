"""Which windows each rank reads at each step, from one global order that no rank count changes."""

from __future__ import annotations

import torch


class GlobalBatchSampler:
    """Cuts a seeded permutation of the dataset into global batches and hands each rank its share.

    Position is one number, the global sample index `consumed` within `epoch`, so it means the same
    thing for any number of ranks. A global batch of micro × accumulation × ranks windows is read as:
    micro-step m, rank r takes order[consumed + (m·ranks + r)·micro : … + micro]. With one rank,
    micro 2 × accumulation 2 therefore reads exactly the windows of micro 4 × accumulation 1.
    The tail of an epoch that does not fill a global batch is skipped; the next epoch reshuffles.
    """

    def __init__(
        self, num_samples: int, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int
    ) -> None:
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.consumed = 0
        self._order: torch.Tensor | None = None

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_samples, generator=g)
        return self._order

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) for the next optimizer step."""
        if self.consumed + self.global_batch_size > self.num_samples:
            self.epoch += 1
            self.consumed = 0
            self._order = None
        order = self._epoch_order()
        mb, out = self.micro_batch_size, []
        for m in range(self.grad_accum):
            start = self.consumed + (m * self.world_size + self.rank) * mb
            out.append(order[start : start + mb].tolist())
        self.consumed += self.global_batch_size
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._order = None
