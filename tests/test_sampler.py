"""The global sample order: permutations, rank shares, positions that survive a change of rank count, mixing."""

from __future__ import annotations

import numpy as np
import pytest

from ds_trainer.data import BatchRampup, GlobalBatchSampler, Permutation, SampleStream
from ds_trainer.errors import DsTrainerError


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_bijection(n):
    out = Permutation(n, seed=3)(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))


def test_permutation_depends_on_seed_and_scales():
    a, b = Permutation(1000, 1)(np.arange(1000)), Permutation(1000, 2)(np.arange(1000))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    big = Permutation(10**12, 7)(np.arange(10**12 - 5, 10**12))  # no O(n) table: instant at any size
    assert ((big >= 0) & (big < 10**12)).all() and len(set(big.tolist())) == 5


def ranks(
    n: int, world: int, micro: int = 2, seed: int = 0, state: dict | None = None
) -> list[GlobalBatchSampler]:
    out = []
    for r in range(world):
        stream = SampleStream([n], None, seed)
        if state:
            stream.load_state_dict(state)
        out.append(GlobalBatchSampler(stream, micro, r, world))
    return out


def read(samplers: list[GlobalBatchSampler], steps: int, accum: int = 1) -> list[int]:
    """Windows every rank reads over `steps` steps, in global-batch order."""
    out = []
    for _ in range(steps):
        per_rank = [s.next_step(accum) for s in samplers]
        for m in range(accum):
            for r in range(len(samplers)):
                out += [w for _, w in per_rank[r][m]]
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_covers_every_sample_once(world):
    n, micro = 60, 2  # 60 = 5 global batches of 12 for world 3, and whole batches for 1 and 2 too
    samplers = ranks(n, world, micro)
    steps = n // (micro * world)
    epoch0, epoch1 = read(samplers, steps), read(samplers, steps)
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1  # each epoch reshuffles


def test_an_epoch_boundary_inside_a_global_batch_loses_nothing():
    samplers = ranks(10, 1, micro=4)
    got = read(samplers, 5)  # 20 samples: two full passes over 10 windows
    assert sorted(got[:10]) == list(range(10)) and sorted(got[10:]) == list(range(10))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)])
def test_position_resumes_on_another_rank_count(before, after):
    n, micro = 97, 2
    uninterrupted = read(ranks(n, 1, micro), 97)[: n * 2]
    first = ranks(n, before, micro)
    seen = read(first, 7)
    state = first[0].state_dict()
    assert all(s.state_dict() == state for s in first)  # every rank holds the same position
    resumed = ranks(n, after, micro, state=state)
    rest = read(resumed, (2 * n - len(seen)) // (micro * after))
    both = seen + rest
    assert both == uninterrupted[: len(both)]  # exactly the remaining samples: none repeated, none skipped
    assert sorted(both[:n]) == list(range(n))


def test_accumulation_reads_the_same_windows_as_a_larger_micro_batch():
    a = GlobalBatchSampler(SampleStream([30], None, 5), 2, 0, 1)
    b = GlobalBatchSampler(SampleStream([30], None, 5), 4, 0, 1)
    for _ in range(10):
        assert [w for m in a.next_step(2) for w in m] == [w for m in b.next_step(1) for w in m]


@pytest.mark.parametrize(
    "weights", [[0.5, 0.3, 0.2], [0.7, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.9, 0.05, 0.03, 0.02], [5.0, 1.0]]
)
def test_mixture_counts_stay_within_one_of_their_share_at_every_prefix(weights):
    """After every sample n, each dataset d has given round(w_d * n) up to one: |count - w_d * n| <= 1."""
    n = 10_000
    picks = SampleStream([500, 300, 50, 7][: len(weights)], weights, seed=1).take(n)
    chosen = np.array([d for d, _ in picks])
    share = np.asarray(weights) / sum(weights)
    prefix = np.arange(1, n + 1)
    for d, w in enumerate(share):
        deviation = np.abs(np.cumsum(chosen == d) - w * prefix)
        assert deviation.max() <= 1.0, (d, int(deviation.argmax()) + 1, float(deviation.max()))


def test_mixture_datasets_cycle_through_their_own_permutations():
    picks = SampleStream([500, 300, 50], [0.5, 0.3, 0.2], seed=1).take(10_000)
    # each dataset cycles through its own permutations: dataset 2 (50 windows) has had 40 full epochs
    small = [w for d, w in picks if d == 2]
    assert all(sorted(small[i : i + 50]) == list(range(50)) for i in range(0, 2000, 50))


def test_mixture_is_deterministic_and_resumable():
    a = SampleStream([100, 40], [0.7, 0.3], seed=4)
    first = a.take(333)
    state = a.state_dict()
    rest = a.take(200)
    b = SampleStream([100, 40], [0.7, 0.3], seed=4)
    b.load_state_dict(state)
    assert b.take(200) == rest
    assert SampleStream([100, 40], [0.7, 0.3], seed=4).take(333) == first
    assert SampleStream([100, 40], [0.7, 0.3], seed=5).take(333) != first


def test_resume_refuses_other_data_seed_or_weights():
    state = SampleStream([100, 40], [0.7, 0.3], seed=4).state_dict()
    for other in (SampleStream([101, 40], [0.7, 0.3], 4), SampleStream([100, 40], [0.7, 0.3], 5)):
        with pytest.raises(DsTrainerError, match="resume with the same data"):
            other.load_state_dict(state)
    with pytest.raises(DsTrainerError, match="mixture weights"):
        SampleStream([100, 40], [0.5, 0.5], 4).load_state_dict(state)


def test_rampup_grows_in_whole_micro_steps_and_counts_steps():
    ramp = BatchRampup(target=32, increment=4, start=8, ramp_samples=240)
    sizes, consumed = [], 0
    while consumed < 400:
        sizes.append(ramp.global_batch(consumed))
        consumed += sizes[-1]
    assert sizes[0] == 8 and sizes[-1] == 32
    assert all(s % 4 == 0 for s in sizes) and sizes == sorted(sizes)
    assert ramp.steps_for(400) == len(sizes)
    assert BatchRampup(32, 4).steps_for(320) == 10
