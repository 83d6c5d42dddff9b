"""Export a checkpoint as fp32 safetensors with its config, and as a Hugging Face GPT-2 folder.

python launch/export.py --checkpoint RUN_DIR [--tag step_00001000] --out OUT
# then: transformers.GPT2LMHeadModel.from_pretrained("OUT/hf")
"""

import argparse
import sys

from ds_trainer.errors import DsTrainerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="the run's checkpoint.dir")
    parser.add_argument("--tag", help="checkpoint folder inside it; default: the one `latest` names")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        from ds_trainer.export import export

        paths = export(args.checkpoint, args.out, args.tag)
    except DsTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
