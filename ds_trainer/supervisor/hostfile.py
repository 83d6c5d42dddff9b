"""DeepSpeed's hostfile and --include/--exclude syntax, and taking whole hosts out of a launch."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ds_trainer.errors import DsTrainerError


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """DeepSpeed's hostfile: `HOST slots=N` per line, `#` comments and blank lines ignored; host order kept
    (it is the rank order). Same rules as deepspeed.launcher.runner._parse_hostfile, as user errors."""
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+)\s+slots=(\d+)", line)
        if not m:
            raise DsTrainerError(f"{source} line {n}: {line!r} is not 'HOST slots=N'")
        if m.group(1) in hosts:
            raise DsTrainerError(f"{source} line {n}: {m.group(1)} is listed twice")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise DsTrainerError(f"{source} lists no hosts; write one 'HOST slots=N' line per node")
    return hosts


def parse_node_spec(spec: str) -> dict[str, list[int]]:
    """DeepSpeed's --include/--exclude: `HOST[:SLOT[,SLOT...]]` joined by `@`; no slots = the whole host."""
    out: dict[str, list[int]] = {}
    for part in filter(None, spec.split("@")):
        host, _, slots = part.partition(":")
        out.setdefault(host, []).extend(int(s) for s in slots.split(",") if s)
    return out


def format_node_spec(spec: dict[str, list[int]]) -> str:
    return "@".join(h + (":" + ",".join(map(str, s)) if s else "") for h, s in spec.items())


def active_hosts(hosts: dict[str, int], include: str = "", exclude: str = "") -> list[str]:
    """Hosts that keep at least one slot under DeepSpeed's --include/--exclude, in hostfile order."""
    if include:
        return [h for h in hosts if h in parse_node_spec(include)]
    dropped = parse_node_spec(exclude)
    left = []
    for h, n in hosts.items():
        if h in dropped and (not dropped[h] or set(range(n)) <= set(dropped[h])):
            continue
        left.append(h)
    return left


def exclusion_filter(include: str, exclude: str, excluded: Sequence[str]) -> tuple[str, str]:
    """(include, exclude) for DeepSpeed with whole `excluded` hosts taken out. DeepSpeed allows only one
    of the two: an --include loses those hosts; otherwise they join --exclude, replacing any slot-level
    entry the user gave for them (DeepSpeed would merge `node2:0` and `node2` into slot 0 only)."""
    if include:
        spec = {h: s for h, s in parse_node_spec(include).items() if h not in excluded}
        return format_node_spec(spec), ""
    spec = {h: s for h, s in parse_node_spec(exclude).items() if h not in excluded}
    spec.update({h: [] for h in excluded})
    return "", format_node_spec(spec)
