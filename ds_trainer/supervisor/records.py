"""What the supervisor leaves in the run folder: restarts.jsonl (one line per event) and excluded_hosts."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

EXCLUDED_FILE = "excluded_hosts"
RESTART_LOG = "restarts.jsonl"


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


class RestartLog:
    """One line per event: to stdout (`[time] resilient: ...`) and as JSON to <run>/restarts.jsonl."""

    def __init__(self, run_dir: Path, out=None) -> None:
        self.path = run_dir / RESTART_LOG
        self.out = out if out is not None else sys.stdout

    def event(self, event: str, message: str, **fields: Any) -> None:
        stamp, unix = now_iso(), time.time()
        print(f"[{stamp}] resilient: {message}", file=self.out, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": stamp, "unix": unix, "event": event, **fields}) + "\n")


def read_excluded(run_dir: Path) -> dict[str, str]:
    """Hosts excluded earlier in this run folder: host -> the reason on its line."""
    path = run_dir / EXCLUDED_FILE
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                host, _, rest = line.strip().partition("\t")
                out[host] = rest.partition("\t")[2] or rest  # host, time, reason
    return out


def record_excluded(run_dir: Path, host: str, reason: str) -> None:
    path = run_dir / EXCLUDED_FILE
    head = (
        ""
        if path.exists()
        else "# host<TAB>time<TAB>reason; resilient.py leaves these out; delete a line to readmit\n"
    )
    with open(path, "a") as f:
        f.write(f"{head}{host}\t{now_iso()}\t{reason}\n")
