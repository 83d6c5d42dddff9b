"""DeepSpeed's C++ ops, compiled once up front.

DeepSpeed JIT-compiles these on first use. Building them once before any run keeps ranks from racing to
compile, and from leaving a stale lock behind when one is killed mid-build (every later run would wait
on it forever).
"""

from __future__ import annotations

from pathlib import Path

from deepspeed.accelerator import get_accelerator

PREBUILT_OPS = ("CPUAdamBuilder", "FusedAdamBuilder", "ShareMemCommBuilder", "AsyncIOBuilder")


def build_ops(names: tuple[str, ...] = PREBUILT_OPS) -> dict[str, str]:
    """Compile DeepSpeed's ops for this accelerator; returns each op's outcome ("built" or why not)."""
    results = {}
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            results[name] = "not used on this accelerator"
        elif not builder.is_compatible(verbose=False):
            results[name] = "not compatible here (missing system library?)"
        else:
            builder.load(verbose=False)
            results[name] = "built"
    return results


def remove_stale_build_locks(extensions_dir: str) -> list[str]:
    """Delete `lock` files left by a killed build; without this every later run waits on them forever."""
    locks = list(Path(extensions_dir).rglob("lock"))
    for lock in locks:
        lock.unlink(missing_ok=True)
    return [str(lock) for lock in locks]
