"""Other hosts over ssh: the health probe before an attempt, and killing a run's ranks there."""

from __future__ import annotations

import concurrent.futures
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

# Run on each host by `probe_host`: torch imports and computes. argv: device (auto|cpu|cuda), slots.
PROBE_SCRIPT = """\
import sys, torch
device, slots = sys.argv[1], int(sys.argv[2])
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda" and torch.cuda.device_count() < slots:
    sys.exit(f"{torch.cuda.device_count()} CUDA devices visible, the hostfile gives {slots} slots")
x = torch.ones(64, 64, device=device)
got = (x @ x).sum().item()
if got != 64**3:
    sys.exit(f"64x64 matmul on {device} gave {got}, not {64**3}")
print("ok", torch.__version__, device)
"""


def probe_host(
    host: str,
    timeout: float,
    *,
    slots: int = 1,
    device: str = "auto",
    ssh_port: int | None = None,
    python: str = sys.executable,
    cwd: str | None = None,
) -> str | None:
    """None when `host` looks able to run ranks, else why not, in a few words. Checks what a launch needs:
    ssh without prompts, the working folder at the same path (DeepSpeed's pdsh command `cd`s there), this
    Python with torch, and one small tensor op on the device."""
    remote = " ".join(
        [
            f"cd {shlex.quote(cwd or os.getcwd())} &&",
            shlex.quote(python),
            "-c",
            shlex.quote(PROBE_SCRIPT),
            shlex.quote(device),
            str(slots),
        ]
    )
    connect = max(1, int(timeout))
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect}"]
    cmd += ["-p", str(ssh_port)] if ssh_port else []
    try:
        r = subprocess.run(
            [*cmd, host, remote], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return f"no answer to the probe within {timeout:g} s"
    except OSError as e:
        return f"ssh could not run: {e}"
    last = (r.stderr.strip().splitlines() or [""])[-1].strip()
    if r.returncode == 255:  # ssh's own failure: connect, auth, host key
        return f"ssh failed: {last or 'exit 255'}"
    if r.returncode != 0:
        return f"probe failed (exit {r.returncode}): {last}"
    if not r.stdout.startswith("ok "):
        return f"probe printed {r.stdout.strip()[:200]!r}"
    return None


def kill_remote_ranks(
    host: str, pattern: str, timeout: float, ssh_port: int | None = None, sig: str = "KILL"
) -> str:
    """`pkill -SIG -f PATTERN` on `host` over ssh: 'killed' (signalled), 'none', or why it could not be done."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout))}"]
    cmd += ["-p", str(ssh_port)] if ssh_port else []
    try:
        r = subprocess.run(
            [*cmd, host, f"pkill -{sig} -f -- {shlex.quote(pattern)}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except (subprocess.TimeoutExpired, OSError) as e:
        return f"unreachable ({type(e).__name__})"
    return {0: "killed", 1: "none"}.get(r.returncode, f"unreachable (exit {r.returncode})")


def on_each_host(hosts: Sequence[str], fn: Callable[[str], str | None]) -> dict[str, str | None]:
    """fn(host) for every host at once: a dead host costs its timeout once, not once per host."""
    if not hosts:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return dict(zip(hosts, pool.map(fn, hosts), strict=True))
