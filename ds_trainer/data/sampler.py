"""Which windows each rank reads at each step, from one global order that no rank count changes.

The order is a stream: position g of the stream names one window of one dataset. A run's data
position is therefore one number (samples consumed) plus, for mixtures, how many samples each
dataset has given, and it means the same thing on 1 rank or 1,000.
"""

from __future__ import annotations

import numpy as np

from ds_trainer.errors import DsTrainerError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-spread hash of 64-bit integers."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n) computed per index (a Feistel network with cycle walking).

    It needs no O(n) table, so a billion-window dataset costs nothing to shuffle, and any rank can
    look up any position of the order on its own.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        bits = max(2, int(n - 1).bit_length() if n > 1 else 1)
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        keys = _mix64(
            np.arange(self.ROUNDS, dtype=np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B9)
        )
        self.keys = keys

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(idx, dtype=np.uint64))
        out_of_range = x >= self.n
        while out_of_range.any():  # the domain is < 4n, so a few walks at most on average
            x[out_of_range] = self._feistel(x[out_of_range])
            out_of_range = x >= self.n
        return x.astype(np.int64)


class SampleStream:
    """The global order: each dataset in its own seeded permutation, a new one every epoch, and datasets
    interleaved so that after g samples dataset d has given as close to weight_d × g as integers allow.
    """

    def __init__(self, sizes: list[int], weights: list[float] | None, seed: int) -> None:
        if weights is None:
            weights = [1.0] * len(sizes)
        total = float(sum(weights))
        self.sizes = list(sizes)
        self.weights = [w / total for w in weights]
        self.seed = seed
        self.consumed = 0
        self.counts = [0] * len(sizes)
        self._perms: dict[tuple[int, int], Permutation] = {}

    def _perm(self, dataset: int, epoch: int) -> Permutation:
        key = (dataset, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = Permutation(
                self.sizes[dataset], self.seed * 1_000_003 + dataset * 7_919 + epoch
            )
        return self._perms[key]

    def take(self, k: int) -> list[tuple[int, int]]:
        """The next k samples of the order as (dataset, window) pairs."""
        chosen = np.empty(k, dtype=np.int64)
        positions = np.empty(k, dtype=np.int64)
        counts = self.counts
        for i in range(k):
            g = self.consumed + i + 1
            if len(counts) == 1:
                d = 0
            else:  # the dataset furthest behind its share goes next
                d = max(range(len(counts)), key=lambda j: self.weights[j] * g - counts[j])
            chosen[i], positions[i] = d, counts[d]
            counts[d] += 1
        self.consumed += k
        out: list[tuple[int, int]] = [(0, 0)] * k
        for d in np.unique(chosen):
            where = np.nonzero(chosen == d)[0]
            pos = positions[where]
            n = self.sizes[d]
            windows = np.empty(len(pos), dtype=np.int64)
            for epoch in np.unique(pos // n):
                sel = pos // n == epoch
                windows[sel] = self._perm(int(d), int(epoch))(pos[sel] % n)
            for i, w in zip(where.tolist(), windows.tolist(), strict=True):
                out[i] = (int(d), w)
        return out

    def epoch(self) -> int:
        """Completed passes over the first (or only) dataset."""
        return self.counts[0] // self.sizes[0]

    def epochs_done(self) -> float:
        """Passes over the first (or only) dataset so far, with the fraction of the current one."""
        return self.counts[0] / self.sizes[0]

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "counts": list(self.counts),
            "sizes": self.sizes,
            "weights": self.weights,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "sizes"):
            if state[key] != getattr(self, key):
                raise DsTrainerError(
                    f"the checkpoint's data order was made with {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; resume with the same data and train.seed, or start in a new checkpoint.dir"
                )
        if not np.allclose(state["weights"], self.weights):
            raise DsTrainerError(
                f"the checkpoint was trained on mixture weights {state['weights']}, this run has {self.weights}; "
                "keep data.mixture unchanged to resume, or start in a new checkpoint.dir"
            )
        self.consumed = int(state["consumed"])
        self.counts = [int(c) for c in state["counts"]]


class GlobalBatchSampler:
    """This rank's share of each global batch of the stream.

    A global batch of micro × accumulation × ranks samples is read as: micro-step m, rank r takes
    stream positions (m·ranks + r)·micro … + micro. With one rank, micro 2 × accumulation 2 therefore
    reads exactly the windows of micro 4 × accumulation 1.
    """

    def __init__(self, stream: SampleStream, micro_batch_size: int, rank: int, world_size: int) -> None:
        self.stream = stream
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size

    @property
    def consumed(self) -> int:
        return self.stream.consumed

    @property
    def epoch(self) -> int:
        return self.stream.epoch()

    @property
    def epochs_done(self) -> float:
        return self.stream.epochs_done()

    def next_step(self, grad_accum: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches (lists of (dataset, window)) for the next optimizer step."""
        mb, world = self.micro_batch_size, self.world_size
        batch = self.stream.take(mb * grad_accum * world)
        return [
            batch[(m * world + self.rank) * mb : (m * world + self.rank + 1) * mb] for m in range(grad_accum)
        ]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class BatchRampup:
    """Global batch size as a function of samples consumed: from `start` up to `target` in whole
    steps of micro × ranks, linearly over `ramp_samples`; constant `target` without a ramp.
    """

    def __init__(self, target: int, increment: int, start: int | None = None, ramp_samples: int = 0) -> None:
        self.target = target
        self.increment = increment
        self.start = target if start is None else start
        self.ramp_samples = ramp_samples

    def global_batch(self, consumed: int) -> int:
        if consumed >= self.ramp_samples or self.start >= self.target:
            return self.target
        grow = (self.target - self.start) * consumed / self.ramp_samples
        return self.start + int(grow // self.increment) * self.increment

    def steps_for(self, total_samples: int) -> int:
        """Optimizer steps until `total_samples` have been consumed."""
        steps, consumed = 0, 0
        while consumed < self.ramp_samples and consumed < total_samples:
            consumed += self.global_batch(consumed)
            steps += 1
        return steps + max(0, -(-(total_samples - consumed) // self.target))
