#!/usr/bin/env bash
# Submit N pretrain jobs, each starting when the one before has ended, so a run longer than the cluster's
# time limit continues by itself: every job resumes from the run folder's latest checkpoint.
#
#   launch/slurm/submit_chain.sh 5 --time 24:00:00 --nodes 4
#
# afterany, not afterok: a job that hit its time limit or was preempted ends "failed" in SLURM's eyes,
# and that is exactly when the next one must go on. A job that finds training finished exits at once.
set -euo pipefail

if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [sbatch args...]" >&2
  exit 2
fi
n=$1
shift
script=${SBATCH_SCRIPT:-"$(dirname "$0")/pretrain.sbatch"}

prev=""
for _ in $(seq "$n"); do
  id=$(sbatch --parsable ${prev:+--dependency=afterany:$prev} "$@" "$script")
  id=${id%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
  echo "$id"
  prev=$id
done
