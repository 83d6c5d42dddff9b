"""Pretrain a GPT with DeepSpeed.

python launch/pretrain.py [--config RUN.yaml] [--ds_config DS.json] [--SECTION.KEY VALUE ...]
deepspeed [--num_gpus N | --hostfile HOSTS] launch/pretrain.py --ds_config ds_configs/zero3.json ...
"""

import argparse
import os
import sys

from ds_trainer.config import load_run_config
from ds_trainer.errors import DsTrainerError, report_on_rank


def main(argv: list[str] | None = None) -> int:
    """Returns only for a bad command line or run config; once training starts, the process ends here."""
    # No abbreviations: `--conf x` must reach the run config as an unknown key, not pass as --config.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="run config YAML (model, data, train, eval, checkpoint, log)")
    parser.add_argument("--ds_config", help="DeepSpeed JSON; default: built-in ZeRO-0 fp32 AdamW")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        run = load_run_config(args.config, overrides)
    except DsTrainerError as e:
        return report_on_rank(e, rank)
    from ds_trainer.pretrain import pretrain
    from ds_trainer.process import end_process  # heavy imports only once the arguments are good

    try:
        code = pretrain(run, args.ds_config)
    except DsTrainerError as e:
        code = report_on_rank(e, rank)
    end_process(code)


if __name__ == "__main__":
    sys.exit(main())
