"""What a live DeepSpeed engine holds around its optimizer update, to check the planner's model states.

Used by benchmarks/plan_vs_measured.py and tests/test_plan.py. It wraps DeepSpeed's optimizer step and
flatten functions while it measures, and empties an engine's buffers afterwards by setting attributes of
DeepSpeed's optimizer wrappers, so it lives here and not in ds_trainer (ds_trainer.planning only
computes; docs/planning.md says what the measurements found).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MeasuredStates:
    """Bytes a live DeepSpeed engine holds around its optimizer update, each storage counted once.

    Snapshots are taken during the last training step's `engine.step()` (so Adam's states exist and
    the gradients are reduced), at two kinds of moments: when the optimizer's flatten returns (ZeRO's `self.flatten`, FP16_Optimizer's
    `_flatten_dense_tensors`: the new flat gradient copy exists next to the buffer it was copied from)
    and on entry to the inner optimizer's `step` (one call per parameter group under ZeRO); the largest
    snapshot is kept. Which buffers count, in this order (a storage already counted is not counted again):

    - params: the module's parameters and the model-dtype flat buffers they are views of (ZeRO-1/2
      `bit16_groups_flat`, FP16_Optimizer `fp16_groups_flat`, ZeRO-3 `fp16_partitioned_groups_flat`,
      `lp_param_buffer`);
    - grads: `.grad` of the module's parameters, ZeRO's gradient buffers (`grads_in_partition`,
      `averaged_gradients`, ZeRO-3 `grad_partitions_flat_buffer`), the flatten's inputs and output at a
      flatten snapshot, and `.grad` of the tensors the inner optimizer steps (the flat fp32 gradient);
    - optimizer: the inner optimizer's own parameters when they are separate tensors (fp32 master
      partitions: `single_partition_of_fp32_groups`, `fp32_groups_flat`, `fp32_partitioned_groups_flat`)
      and every tensor in its `state` (exp_avg, exp_avg_sq, step).

    `buffers` are ZeRO's reduce-bucket buffers alive at that moment (not model states; the planner
    counts them under buffers). `live` is every tensor storage alive in the process (gc walk).

    Blind spot: in bf16/fp16 at ZeRO-1/2/3 the peak is inside `flatten(...).to(fp32)`, after the flatten
    returns and before the step, where no hook sees it; the snapshots then miss the model-dtype flat
    copy or the fp32 copy (the planner counts both). In fp32, and at ZeRO-0 in any dtype, nothing is missed.
    """

    params: int
    grads: int
    optimizer: int
    buffers: int
    live: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def _tensors(obj: Any) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for x in obj for t in _tensors(x)]
    return []


def _storage_bytes(tensors: list, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def _snapshot(engine: Any, wrapper: Any, inner: Any, extra_grads: list) -> MeasuredStates:
    """The engine's model states now; `extra_grads` are the flatten's inputs and output, if any."""

    def attr(name: str) -> list:
        return _tensors(getattr(wrapper, name, None))

    seen: set[int] = set()
    module_params = list(engine.module.parameters())
    inner_params = [q for g in inner.param_groups for q in g["params"]]
    params = _storage_bytes(
        module_params
        + attr("bit16_groups_flat")
        + attr("fp16_groups_flat")
        + attr("fp16_partitioned_groups_flat")
        + attr("lp_param_buffer"),
        seen,
    )
    grads = _storage_bytes(
        [q.grad for q in module_params]
        + attr("grads_in_partition")
        + attr("averaged_gradients")
        + attr("grad_partitions_flat_buffer")
        + extra_grads
        + [q.grad for q in inner_params],
        seen,
    )
    optimizer = _storage_bytes(
        inner_params
        + attr("single_partition_of_fp32_groups")
        + attr("fp32_groups_flat")
        + attr("fp32_partitioned_groups_flat")
        + _tensors(list(inner.state.values())),
        seen,
    )
    buckets = [getattr(b, "buffer", None) for b in getattr(wrapper, "ipg_buckets", {}).values()]
    buffers = _storage_bytes(_tensors(buckets), seen)
    return MeasuredStates(params, grads, optimizer, buffers, live_tensor_bytes())


class _Recorder:
    """Snapshots of one engine, taken only while `recording` is set."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.wrapper = engine.optimizer
        self.inner = getattr(self.wrapper, "optimizer", self.wrapper)
        self.recording = False
        self.snapshots: list[MeasuredStates] = []

    def snapshot(self, extra_grads: list) -> None:
        if self.recording:
            self.snapshots.append(_snapshot(self.engine, self.wrapper, self.inner, extra_grads))

    def watched(self, fn: Any) -> Any:
        def flatten(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            out = fn(tensors, *args, **kwargs)
            self.snapshot(_tensors(list(tensors)) + [out])
            return out

        return flatten


@contextmanager
def _watching(recorder: _Recorder) -> Iterator[None]:
    """Snapshot on entry to the inner optimizer's step and when DeepSpeed's flatten returns."""
    import deepspeed.runtime.fp16.fused_optimizer as fused_optimizer

    wrapper, inner = recorder.wrapper, recorder.inner

    def step(*args: Any, **kwargs: Any) -> Any:
        recorder.snapshot([])
        return original_step(*args, **kwargs)

    original_step = inner.step
    original_flatten = fused_optimizer._flatten_dense_tensors
    wrapper_flatten = vars(wrapper).get("flatten")  # ZeRO optimizers keep it as an instance attribute
    inner.step = step
    fused_optimizer._flatten_dense_tensors = recorder.watched(original_flatten)
    if wrapper_flatten is not None:
        wrapper.flatten = recorder.watched(wrapper_flatten)
    try:
        yield
    finally:
        del inner.step  # back to the class's method
        fused_optimizer._flatten_dense_tensors = original_flatten
        if wrapper_flatten is not None:
            wrapper.flatten = wrapper_flatten


def measure_model_states(engine: Any, input_ids: Any, steps: int = 2) -> MeasuredStates:
    """Train `steps` steps on `input_ids` (targets = inputs); model states at the last update's peak."""
    recorder = _Recorder(engine)
    with _watching(recorder):
        for i in range(steps):
            loss = engine(input_ids, input_ids)
            engine.backward(loss)  # gradient reduction flattens buckets here: not the update
            recorder.recording = i == steps - 1
            engine.step()
            recorder.recording = False
    if not recorder.snapshots:
        raise RuntimeError("the optimizer never stepped; was the step skipped (overflow)?")
    return max(recorder.snapshots, key=lambda m: m.total)


def release_engine(engine: Any) -> None:
    """Empty a measured engine's big tensors: DeepSpeed's gradient hooks keep an engine alive after `del`."""
    import torch

    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    inner.state.clear()
    for group in inner.param_groups:
        for q in group["params"]:
            q.data = torch.empty(0)
            q.grad = None
    for name in (
        "bit16_groups_flat",
        "single_partition_of_fp32_groups",
        "fp16_groups_flat",
        "fp32_groups_flat",
        "fp16_partitioned_groups_flat",
        "fp32_partitioned_groups_flat",
    ):
        if hasattr(wrapper, name):
            setattr(wrapper, name, [])
    if isinstance(getattr(wrapper, "grad_partitions_flat_buffer", None), torch.Tensor):
        wrapper.grad_partitions_flat_buffer = torch.empty(0)
    for q in engine.module.parameters():
        q.data = torch.empty(0)
        q.grad = None
        if hasattr(q, "ds_tensor"):  # ZeRO-3: this rank's partition, a view of the flat buffer
            q.ds_tensor.data = torch.empty(0)
    gc.collect()


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once)."""
    import torch

    with warnings.catch_warnings():  # isinstance() on some module proxies warns of deprecations
        warnings.simplefilter("ignore")
        alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    sizes = {}
    for t in alive:
        if t.device.type != "meta":
            s = t.untyped_storage()
            sizes[s.data_ptr()] = s.nbytes()
    return sum(sizes.values())
