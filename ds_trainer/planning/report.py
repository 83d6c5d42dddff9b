"""A plan as the table launch/plan.py prints (GiB with two decimals), and its suggested JSON written out."""

from __future__ import annotations

import json
from pathlib import Path

from ds_trainer.errors import DsTrainerError
from ds_trainer.planning.constants import GPU_FIXED_OVERHEAD, MEMORY_MARGIN, gib
from ds_trainer.planning.figures import MemoryNeed, Plan
from ds_trainer.planning.host import HostNeed


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n / 1e9:,.3f}B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _fits(n: MemoryNeed) -> str:
    return "fits" if n.fits else f"does NOT fit ({n.shortfall()})"


def _setup_lines(p: Plan) -> list[str]:
    c = p.model
    return [
        f"model       {p.model_name}: {_millions(p.params.total)} parameters ({p.params.total:,}); "
        f"{c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, vocab {c.vocab_size}, block {c.block_size}; "
        f"largest layer {_millions(p.params.largest_layer)}",
        f"setup       {p.nodes} node(s) x {p.gpus_per_node} GPU(s) = {p.world_size} data-parallel ranks, "
        f"{gib(p.gpu_memory)} GiB each; {p.dtype}; {p.layout.describe()}; micro batch {p.micro_batch} x context "
        f"{p.context}",
        "",
    ]


def _states_lines(p: Plan) -> list[str]:
    lines = ["model states per GPU (GiB)   ZeRO paper   planner   DeepSpeed estimator"]
    ds = p.deepspeed
    rows = [
        ("parameters", p.zero_paper.params, p.states.params),
        ("gradients", p.zero_paper.grads, p.states.grads),
        ("optimizer states", p.zero_paper.optimizer, p.states.optimizer),
    ]
    for name, paper, ours in rows:
        lines.append(f"  {name:<26} {gib(paper):>10} {gib(ours):>9}")
    lines.append(
        f"  {'ZeRO-3 gathered module':<26} {'-':>10} {gib(p.states.working_set):>9}   (forward/backward)"
    )
    lines.append(f"  {'fp32 gradient copies':<26} {'-':>10} {gib(p.states.update):>9}   (optimizer step)")
    ds_gpu = gib(ds.gpu) if ds else "n/a (none for ZeRO-0/1)"
    lines.append(f"  {'peak on GPU':<26} {gib(p.zero_paper.gpu):>10} {gib(p.states.gpu):>9}   {ds_gpu}")
    if ds or p.states.cpu_per_node or p.states.nvme_per_node:
        ds_cpu = f"{gib(ds.cpu_per_node)} (x{ds.buffer_factor:g} buffer factor)" if ds else "n/a"
        if ds and p.layout.offload_optimizer == "none":
            ds_cpu += "; to load the model at start-up"
        lines.append(
            f"  {'CPU per node':<26} {gib(p.zero_paper.cpu_per_node):>10} {gib(p.states.cpu_per_node):>9}   {ds_cpu}"
        )
        if p.states.nvme_per_node:
            lines.append(
                f"  {'NVMe per node':<26} {gib(p.zero_paper.nvme_per_node):>10} {gib(p.states.nvme_per_node):>9}"
            )
    if ds:
        lines.append(f"  DeepSpeed: {ds.function}({ds.options})" + (f"; {ds.note}" if ds.note else ""))
    return lines


def _activation_lines(p: Plan) -> list[str]:
    a = p.activations
    return [
        "",
        f"activations per GPU, micro batch {p.micro_batch} x context {p.context}, {p.attention} attention (GiB)",
        f"  {'':<26} {'no ckpt':>10} {'ckpt':>9}",
        f"  {'per layer':<26} {gib(a.per_layer):>10} {gib(a.block_input):>9}   (x {a.n_layer} layers)",
        f"  {'logits + loss backward':<26} {gib(a.logits + a.loss_backward):>10} {gib(a.logits + a.loss_backward):>9}",
        f"  {'total':<26} {gib(a.full):>10} {gib(a.checkpointed):>9}",
        "",
    ]


def _fit_lines(p: Plan) -> list[str]:
    return [
        f"fit on {gib(p.gpu_memory)} GiB ({gib(p.need.gpu_usable)} usable after {MEMORY_MARGIN:.0%} margin and "
        f"{gib(GPU_FIXED_OVERHEAD)} GiB fixed overhead)",
        f"  {'':<26} {'no ckpt':>10} {'ckpt':>9}",
        f"  {'model states held':<26} {gib(p.need.states.held):>10} {gib(p.need_checkpointed.states.held):>9}",
        f"  {'DeepSpeed buffers':<26} {gib(p.need.buffers):>10} {gib(p.need_checkpointed.buffers):>9}",
        f"  {'+ max of: activations':<26} {gib(p.need.activations + p.states.working_set):>10} "
        f"{gib(p.need_checkpointed.activations + p.states.working_set):>9}   (incl. ZeRO-3 gathered module)",
        f"  {'       or: update copies':<26} {gib(p.states.update):>10} {gib(p.states.update):>9}",
        f"  {'peak per GPU':<26} {gib(p.need.gpu):>10} {gib(p.need_checkpointed.gpu):>9}",
        f"  without checkpointing: {_fits(p.need)}",
        f"  with checkpointing:    {_fits(p.need_checkpointed)}",
        "",
    ]


def _compute_lines(p: Plan) -> list[str]:
    k = p.compute
    return [
        f"compute     {k.tokens / 1e9:,.2f}B tokens ({k.tokens_per_param:.1f} per parameter); "
        f"6 x N x D = {k.flops:.3e} FLOPs",
        f"            {k.devices} device(s) x {k.peak_tflops:g} TFLOP/s peak x MFU {k.mfu:g} -> {_duration(k.seconds)}",
        "",
    ]


def _suggestion_lines(p: Plan) -> list[str]:
    s = p.suggestion
    if s is None:
        return [f"suggestion  {p.no_fit_reason}"]
    batch = f"micro batch {s.micro_batch}"
    if s.gradient_accumulation_steps > 1:
        batch += (
            f" x {s.gradient_accumulation_steps} accumulation steps (requested micro batch {p.micro_batch})"
        )
    return [
        f"suggestion  {s.base_file}.json: {s.layout.describe()}, activation checkpointing "
        f"{'on' if s.activation_checkpointing else 'off'}, {batch}; {gib(s.need.gpu)} GiB per GPU"
        + (f", {gib(s.need.states.cpu_per_node)} GiB CPU per node" if s.need.states.cpu_per_node else "")
        + (f", {gib(s.need.states.nvme_per_node)} GiB NVMe per node" if s.need.states.nvme_per_node else ""),
        json.dumps(s.config, indent=2),
    ]


def format_plan(p: Plan) -> str:
    """The plan as the table launch/plan.py prints (GiB with two decimals)."""
    sections = (_setup_lines, _states_lines, _activation_lines, _fit_lines, _compute_lines, _suggestion_lines)
    return "\n".join(line for section in sections for line in section(p))


OFFLOAD_KEYS = (
    "sub_group_size",
    "stage3_prefetch_bucket_size",
    "stage3_max_reuse_distance",
    "offload_optimizer.buffer_count",
    "offload_optimizer.pin_memory",
    "offload_param.buffer_count",
    "offload_param.buffer_size",
    "offload_param.max_in_cpu",
    "offload_param.pin_memory",
)


def format_host(needs: list[HostNeed], ranks: int, on_cpu: bool) -> str:
    """The offload layouts on one host (GiB per node), the first that fits and its derived offload sizes."""
    h = needs[0]
    disk = (
        "NVMe not checked (no --nvme_path)"
        if h.nvme_free is None
        else f"{gib(h.nvme_free)} GiB free at --nvme_path"
    )
    lines = [
        f"host        {gib(h.host_memory)} GiB, {ranks} rank(s) per node, {disk}; "
        + (
            "the ranks compute on the CPU, so their device memory is counted here too"
            if on_cpu
            else "GPU memory above"
        ),
        f"  {'GiB per node':<24} {'resident':>9} {'pinned':>8} {'NVMe':>8}   layout: fits?",
    ]
    for n in needs:
        verdict = "fits" if n.fits else f"does NOT fit ({n.shortfall()})"
        lines.append(
            f"  {n.base_file + '.json':<24} {gib(n.resident):>9} {gib(n.pinned):>8} {gib(n.nvme):>8}   "
            f"{n.layout.describe()}: {verdict}"
        )
    first = next((n for n in needs if n.fits), None)
    if first is None:
        lines.append(
            f"host suggestion  none of these fits in {gib(h.host_memory)} GiB with a {MEMORY_MARGIN:.0%} margin"
        )
        return "\n".join(lines)
    sizes = []
    for key in OFFLOAD_KEYS:
        section, _, name = key.rpartition(".")
        value = (first.zero.get(section, {}) if section else first.zero).get(name)
        if value is not None and (
            not section or first.zero.get(section, {}).get("device") in ("cpu", "nvme")
        ):
            sizes.append(f"{key}={json.dumps(value)}")
    lines.append(
        f'host suggestion  {first.base_file}.json (the least offloaded layout that fits); its "auto" offload '
        f"sizes on this host: {', '.join(sizes)}"
    )
    return "\n".join(lines)


def write_suggestion(p: Plan, path: str | Path) -> Path:
    """Write the suggested JSON to `path`; DsTrainerError when nothing fits or the path is not writable."""
    if p.suggestion is None:
        raise DsTrainerError(f"{p.no_fit_reason}; nothing written to {path}")
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(p.suggestion.config, indent=2) + "\n")
    except OSError as e:
        raise DsTrainerError(f"cannot write {path}: {e.strerror}") from None
    return out
