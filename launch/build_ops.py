"""Compile DeepSpeed's C++ ops once, before any run (do it on every node image, and in CI).

TORCH_EXTENSIONS_DIR=/path/to/cache python launch/build_ops.py
"""

import os
import sys

from ds_trainer.ops import build_ops, remove_stale_build_locks
from ds_trainer.process import remove_stale_shm_buffers


def main() -> int:
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
    if ext_dir:
        for lock in remove_stale_build_locks(ext_dir):
            print(f"removed stale build lock {lock}")
    for name in remove_stale_shm_buffers():
        print(f"removed stale shared-memory buffer {name}")
    failed = False
    for name, outcome in build_ops().items():
        print(f"{name}: {outcome}")
        failed |= outcome.startswith("not compatible") and name != "AsyncIOBuilder"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
