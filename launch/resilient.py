"""Run a DeepSpeed launch and restart it without a person: probe hosts, exclude failed ones, relaunch.

python launch/resilient.py [--max_restarts 3] [--backoff 10] [--backoff_max 300] [--probe_timeout 30] \\
    [--probe_device auto] [--] [deepspeed options] launch/pretrain.py [pretrain arguments]

Exit code: 0 finished, 85 preempted (requeue), 2 user error, 1 no host left, else the last failure's.
"""

import sys

from ds_trainer.supervisor import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
