"""Search hyperparameters: an Optuna study whose trials are real ds_trainer runs, resumable, on one machine
or many.

python launch/search.py --space SPACE.yaml --study DIR [--config RUN.yaml] [--ds_config DS.json]
    [--storage URL] [--sampler grid|random|tpe] [--trials N] [--pruner none|halving|hyperband]
    [--parallel K] [--launcher "deepspeed --num_gpus 2"] [--objective last_val|best_val]
    [--SECTION.KEY VALUE ...]

Rerunning the same command continues the study; several commands with one --storage URL share it.
"""

import argparse
import sys

from ds_trainer.search.runner import OBJECTIVES, PRUNERS, SAMPLERS, SearchOptions, run_search


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--space", required=True, help="YAML: run-config keys and the values to try")
    parser.add_argument("--study", required=True, help="the study folder: trials, results.csv, best.yaml")
    parser.add_argument("--config", help="the run config every trial starts from")
    parser.add_argument("--ds_config", help="the DeepSpeed JSON of every trial")
    parser.add_argument("--storage", help="an RDB URL shared by several workers (default: a file in --study)")
    parser.add_argument("--sampler", default="grid", choices=SAMPLERS)
    parser.add_argument("--trials", type=int, help="trials to run (default: the whole grid)")
    parser.add_argument("--pruner", default="none", choices=PRUNERS)
    parser.add_argument("--parallel", type=int, default=1, help="trials at once on this machine")
    parser.add_argument("--launcher", default="", help='e.g. "deepspeed --num_gpus 2" (default: one process)')
    parser.add_argument("--objective", default="last_val", choices=OBJECTIVES)
    args, overrides = parser.parse_known_args(argv)
    opts = SearchOptions(**{k: v for k, v in vars(args).items()}, overrides=overrides)
    return run_search(opts)


if __name__ == "__main__":
    sys.exit(main())
