"""Pretrain a GPT with DeepSpeed.

python launch/pretrain.py [--config RUN.yaml] [--ds_config DS.json] [--SECTION.KEY VALUE ...]
deepspeed [--num_gpus N | --hostfile HOSTS] launch/pretrain.py --ds_config ds_configs/zero3.json ...
"""

import argparse
import os
import sys

from ds_trainer.config import load_run_config
from ds_trainer.errors import DsTrainerError


def main(argv: list[str] | None = None) -> int:
    # No abbreviations: `--conf x` must reach the run config as an unknown key, not pass as --config.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="run config YAML (model, data, train, eval, checkpoint, log)")
    parser.add_argument("--ds_config", help="DeepSpeed JSON; default: built-in ZeRO-0 fp32 AdamW")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    try:
        run = load_run_config(args.config, overrides)
        from ds_trainer.pretrain import pretrain  # heavy imports only once the arguments are good

        return pretrain(run, args.ds_config)
    except DsTrainerError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
