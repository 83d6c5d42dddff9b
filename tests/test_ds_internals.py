"""DeepSpeed's internals that ds_trainer relies on are all still there (fails loudly on an upgrade that
removes one), and nothing outside ds_internals reaches into them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from ds_trainer import ds_internals

PACKAGE = Path(ds_internals.__file__).parent
# engine.py calls deepspeed.initialize, the public entry point; ds_internals is the one home of the rest.
ALLOWED = {"ds_internals.py"}


@pytest.mark.parametrize("name", ds_internals.RELIED_ON)
def test_every_relied_on_deepspeed_attribute_exists(name):
    module, _, path = name.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        assert hasattr(obj, part), (
            f"DeepSpeed no longer has {name}: ds_trainer/ds_internals.py depends on it; adapt the function "
            "using it to the new DeepSpeed"
        )
        obj = getattr(obj, part)


def test_fused_adam_still_exposes_its_kernel_to_the_bias_correction_replay():
    import torch
    from deepspeed.ops.adam import FusedAdam

    ((name, attributes),) = ds_internals.RELIED_ON_INSTANCE.items()
    assert name == "deepspeed.ops.adam:FusedAdam"
    opt = FusedAdam([torch.nn.Parameter(torch.zeros(1))])
    missing = [a for a in attributes if not hasattr(opt, a)]
    assert missing == [], (
        f"DeepSpeed's FusedAdam no longer sets {missing}: adapt replay_cpu_adam_bias_correction"
    )


def runtime_imports(source: str) -> list[str]:
    """`deepspeed.runtime...` modules imported by `source` (any form of import)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepspeed.runtime"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("deepspeed.runtime")]
    return found


def test_deepspeed_runtime_is_imported_in_ds_internals_only():
    assert runtime_imports("from deepspeed.runtime.pipe import engine\nimport deepspeed.runtime.zero") == [
        "deepspeed.runtime.pipe",
        "deepspeed.runtime.zero",
    ]
    outside = {
        str(f.relative_to(PACKAGE)): found
        for f in sorted(PACKAGE.rglob("*.py"))
        if f.name not in ALLOWED and (found := runtime_imports(f.read_text()))
    }
    assert outside == {}
