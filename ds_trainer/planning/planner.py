"""`plan()`: a PlanRequest's memory per GPU, compute budget, and the cheapest ds_configs/ layout that fits."""

from __future__ import annotations

from typing import Any

from ds_trainer.offload import Host
from ds_trainer.planning.constants import GIB, GPU_FIXED_OVERHEAD, MEMORY_MARGIN
from ds_trainer.planning.ds_json import CANDIDATES, layout_ds_config, load_base, suggested_ds_config
from ds_trainer.planning.figures import (
    Activations,
    Compute,
    Layout,
    MemoryNeed,
    ModelStates,
    ParamCount,
    Plan,
    Suggestion,
)
from ds_trainer.planning.host import HOST_LAYOUTS, HostNeed, host_needs
from ds_trainer.planning.memory import (
    activation_memory,
    buffer_bytes,
    deepspeed_estimate,
    model_states,
    zero_paper_states,
)
from ds_trainer.planning.request import PlanRequest, ResolvedRequest, resolve_request
from ds_trainer.planning.shape import count_parameters


class _Sizer:
    """One request's memory figures. The search asks for the same layouts and micro batches many
    times: each layout's model states and each micro batch's activations are computed once."""

    def __init__(self, resolved: ResolvedRequest, params: ParamCount) -> None:
        r = resolved.request
        self.resolved = resolved
        self.params = params
        self.world = r.nodes * r.gpus_per_node
        self.gpu_usable = int(r.gpu_memory_gb * GIB * (1 - MEMORY_MARGIN)) - GPU_FIXED_OVERHEAD
        self.cpu_usable = int(r.cpu_memory_gb * GIB * (1 - MEMORY_MARGIN))
        self.nvme_usable = int(r.nvme_gb * GIB * (1 - MEMORY_MARGIN))
        self._states: dict[Layout, ModelStates] = {}
        self._activations: dict[int, Activations] = {}

    def states(self, lay: Layout) -> ModelStates:
        if lay not in self._states:
            r = self.resolved.request
            self._states[lay] = model_states(self.params, lay, r.dtype, r.nodes, r.gpus_per_node)
        return self._states[lay]

    def activations(self, micro: int) -> Activations:
        if micro not in self._activations:
            r, cfg, context = self.resolved.request, self.resolved.cfg, self.resolved.context
            self._activations[micro] = activation_memory(cfg, micro, context, r.dtype, r.attention)
        return self._activations[micro]

    def need(self, lay: Layout, ds_cfg: dict[str, Any], micro: int, ckpt: bool) -> MemoryNeed:
        return MemoryNeed(
            states=self.states(lay),
            buffers=buffer_bytes(ds_cfg, self.params, self.resolved.request.dtype, self.world),
            activations=self.activations(micro).total(ckpt),
            gpu_usable=self.gpu_usable,
            cpu_usable_per_node=self.cpu_usable,
            nvme_usable_per_node=self.nvme_usable,
        )


def _suggest(sizer: _Sizer, micro_batch: int, dtype: str) -> tuple[Suggestion | None, str | None]:
    """The first candidate that fits, at the requested micro batch or else at each smaller divisor of
    it; or None and why nothing fits."""
    bases = {name: load_base(name) for name, _, _ in CANDIDATES}
    last = None
    for micro in sorted((d for d in range(1, micro_batch + 1) if micro_batch % d == 0), reverse=True):
        for base_name, lay, ckpt in CANDIDATES:
            base = bases[base_name]
            n = sizer.need(lay, base, micro, ckpt)
            last = (base_name, lay, ckpt, micro, n)
            if n.fits:
                gas = None if micro == micro_batch else micro_batch // micro
                config = suggested_ds_config(base, dtype, ckpt, micro, gas)
                return Suggestion(base_name, lay, ckpt, micro, gas or 1, n, config), None
    assert last is not None
    base_name, lay, ckpt, micro, n = last
    return None, (
        f"no DeepSpeed config fits: even {lay.describe()} ({base_name}.json) with activation checkpointing at "
        f"micro batch {micro} falls short ({n.shortfall()}); add GPUs or nodes, use GPUs with more memory, "
        f"or plan a smaller model or context"
    )


def plan(request: PlanRequest) -> Plan:
    """Memory per GPU, compute budget and a fitting DeepSpeed JSON for `request.model` on
    nodes × gpus_per_node; the formulas and the search order are explained in docs/planning.md.

    Raises DsTrainerError on bad input; a model that fits nowhere is a Plan with `suggestion=None` and
    `no_fit_reason` set.
    """
    resolved = resolve_request(request)
    r, layout = request, resolved.layout
    params = count_parameters(resolved.cfg)
    sizer = _Sizer(resolved, params)
    _, requested_cfg = layout_ds_config(layout)
    suggestion, no_fit_reason = _suggest(sizer, r.micro_batch, r.dtype)
    n_tokens = r.tokens if r.tokens is not None else int(round(r.tokens_per_param * params.total))
    return Plan(
        model=resolved.cfg,
        model_name=resolved.model_name,
        params=params,
        nodes=r.nodes,
        gpus_per_node=r.gpus_per_node,
        dtype=r.dtype,
        layout=layout,
        micro_batch=r.micro_batch,
        context=resolved.context,
        attention=r.attention,
        gpu_memory=int(r.gpu_memory_gb * GIB),
        zero_paper=zero_paper_states(params.total, layout, r.dtype, r.nodes, r.gpus_per_node),
        states=sizer.states(layout),
        deepspeed=deepspeed_estimate(params, layout, r.nodes, r.gpus_per_node, r.ds_buffer_factor),
        buffers=buffer_bytes(requested_cfg, params, r.dtype, sizer.world),
        activations=sizer.activations(r.micro_batch),
        need=sizer.need(layout, requested_cfg, r.micro_batch, False),
        need_checkpointed=sizer.need(layout, requested_cfg, r.micro_batch, True),
        compute=Compute(
            tokens=n_tokens,
            tokens_per_param=n_tokens / params.total,
            flops=6.0 * params.total * n_tokens,
            devices=sizer.world,
            peak_tflops=float(resolved.peak_tflops),
            mfu=float(r.mfu),
        ),
        suggestion=suggestion,
        no_fit_reason=no_fit_reason,
    )


def host_plan(
    request: PlanRequest, host: Host, nvme_path: str | None = None, device_on_host: bool = False
) -> list[HostNeed]:
    """The offload layouts on one node of `request`'s machine with `host`'s memory (docs/planning.md).
    `device_on_host`: the ranks compute on the CPU, so each layout's per-GPU figure is host memory too."""
    resolved = resolve_request(request)
    sizer = _Sizer(resolved, count_parameters(resolved.cfg))
    needs = {lay: sizer.need(lay, load_base(name), request.micro_batch, False) for name, lay in HOST_LAYOUTS}
    if device_on_host:
        device = {lay: n.gpu for lay, n in needs.items()}
        return host_needs(resolved.cfg, request.dtype, host, sizer.world, device, nvme_path)
    gpu = {lay: n.shortfall() for lay, n in needs.items() if n.gpu > n.gpu_usable}
    return host_needs(resolved.cfg, request.dtype, host, sizer.world, None, nvme_path, gpu)
