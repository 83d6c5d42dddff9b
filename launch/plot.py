"""Draw a run's training curves from its metrics.jsonl as one PNG: loss against epochs (tokens seen on top)
and the learning rate against steps, as in "Build a LLM from Scratch" (ch. 5, appendix D).

python launch/plot.py RUN_DIR [--out FILE.png]   # default: RUN_DIR/training.png
"""

import argparse
import sys
from pathlib import Path

from ds_trainer.errors import DsTrainerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="the run's checkpoint.dir, holding metrics.jsonl")
    parser.add_argument("--out", help="the PNG to write; default: RUN_DIR/training.png")
    args = parser.parse_args(argv)
    try:
        from ds_trainer.plot import DEFAULT_PNG, read_curves, write_png

        curves = read_curves(args.run_dir)
        path = write_png(curves, args.out or Path(args.run_dir) / DEFAULT_PNG)
    except DsTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {path}: {len(curves.eval_steps)} evaluation points, {len(curves.lr)} lr points")
    if curves.torn_lines:
        print(f"skipped metrics.jsonl line(s) {curves.torn_lines}: records cut short by a killed run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
