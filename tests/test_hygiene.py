"""The suite's own hygiene, checked after every other test (conftest puts this test last)."""

from __future__ import annotations

import ast
import getpass
import os
import tempfile
from pathlib import Path

import pytest
from helpers import TMP_BEFORE, leftover_processes, under_ci

# torch's compile cache: `import torch._dynamo` (which torch.optim does) creates it in every process that
# does not set TORCHINDUCTOR_CACHE_DIR, including the ranks tests start over ssh and SLURM. It is
# torch's cache for the user, kept on purpose, not a test's leftover.
TORCH_CACHE = f"torchinductor_{getpass.getuser()}"


def test_the_session_left_no_process_and_no_temporary_file(tmp_path_factory):
    """No launch/pretrain.py or resilient.py process of this run is alive (local ones carry the session's
    mark, remote ones name a folder under its temporary root), and /tmp holds nothing new but pytest's
    own root, where only failed tests' folders stay (tmp_path_retention_policy = "failed")."""
    base = tmp_path_factory.getbasetemp()
    left = leftover_processes(str(base))
    assert not left, [" ".join(p.cmdline()) for p in left]
    added = set(os.listdir(tempfile.gettempdir())) - TMP_BEFORE - {base.parent.name, TORCH_CACHE}
    assert not added, sorted(added)


# subprocess functions that wait for the child, and the Popen methods that do.
WAITING_CALLS = {"run", "call", "check_call", "check_output"}
WAITING_METHODS = {"wait", "communicate"}


def calls_without_timeout(source: str) -> list[int]:
    """Lines of `source` that wait on a child process with no timeout."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if any(k.arg == "timeout" for k in node.keywords):
            continue
        name = node.func.attr
        on_subprocess = isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
        waits = (on_subprocess and name in WAITING_CALLS) or (name in WAITING_METHODS and not node.args)
        if waits:
            found.append(node.lineno)
    return found


def test_every_subprocess_call_of_the_suite_has_a_timeout():
    assert calls_without_timeout("subprocess.run(['x'])\nproc.wait()\nproc.communicate(timeout=1)") == [1, 2]
    missing = {
        f.name: lines
        for f in sorted(Path(__file__).parent.glob("*.py"))
        if (lines := calls_without_timeout(f.read_text()))
    }
    assert missing == {}


@pytest.mark.parametrize(
    ("value", "set_"),
    [(None, False), ("", False), ("0", False), ("false", False), ("False", False), ("true", True),
     ("1", True), ("yes", True), ("github", True)],
)  # fmt: skip
def test_ci_counts_as_set_for_any_value_but_empty_0_or_false(monkeypatch, value, set_):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert under_ci() is set_
