"""What `train.host_malloc` buys and costs: the trainer's s/step, page faults and peak resident memory with
glibc's defaults and with freed memory kept, alternating in one run.

Each case is one process of the real trainer (launch/pretrain.py, ZeRO-0 JSON, one rank) at a shape of
benchmarks/throughput.py, run as the only child of a wrapper process so that getrusage of the wrapper's
children is that run's: its peak resident set and its minor page faults (start-up included, the same for
both policies). Step times leave out the first steps, as throughput.py does.

TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/host_malloc.py [--repeats 3 --steps 15]
    [--shapes small,appendix_d] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REPO, ds_trainer_command, repeats_parser, stats, tokens_per_sec  # noqa: E402

POLICIES = ("glibc", "keep")


def one_run(shape: str, dtype: str, policy: str, steps: int) -> dict:
    """In this wrapper: train one case as its only child; tokens/s, peak RSS (GiB), minor faults."""
    with tempfile.TemporaryDirectory(prefix="host_malloc_") as tmp:
        cmd, run = ds_trainer_command(shape, dtype, "eager", steps, Path(tmp))
        subprocess.run(
            [*cmd, f"--train.host_malloc={policy}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL
        )
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "tok_s": tokens_per_sec(shape, run),
            "peak": usage.ru_maxrss / 2**20,
            "faults": usage.ru_minflt,
        }


def main() -> None:
    parser = repeats_parser(__doc__)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], args.dtype, args.one[1], args.steps)))
        return
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.repeats):
        for shape in args.shapes.split(","):
            for policy in POLICIES:  # alternating, so a drift in the machine's speed hits both alike
                cmd = [sys.executable, __file__, "--one", shape, policy, "--steps", str(args.steps),
                       "--dtype", args.dtype]  # fmt: skip
                out = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout
                results.setdefault((shape, policy), []).append(json.loads(out.strip().splitlines()[-1]))
                got = results[shape, policy][-1]
                print(f"repeat {r + 1} {shape} {policy}: {got['tok_s']:,.0f} tok/s, peak {got['peak']:.2f} GiB, "
                      f"{got['faults']:,} faults", flush=True)  # fmt: skip
    print(f"\n{args.dtype}, {args.steps} steps, {args.repeats} repeats (medians; tok/s min / median / max)")
    print(
        "| shape | policy | tok/s | peak RSS (GiB) | page faults per step (run total / steps) | speed vs glibc | peak vs glibc |"
    )
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        base = {k: statistics.median(x[k] for x in results[shape, "glibc"]) for k in ("tok_s", "peak")}
        for policy in POLICIES:
            rows = results[shape, policy]
            med = {k: statistics.median(x[k] for x in rows) for k in ("tok_s", "peak", "faults")}
            print(f"| {shape} | {policy} | {stats([x['tok_s'] for x in rows])} | "
                  f"{med['peak']:.2f} | {med['faults'] / args.steps:,.0f} | {med['tok_s'] / base['tok_s']:.2f}x | "
                  f"{med['peak'] / base['peak']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
