#!/usr/bin/env bash
# The GPU proof: on a machine with one NVIDIA GPU, in under 8 minutes, gpt2 (124M) for a few dozen steps
# under ZeRO-1/2/3 in bf16 and fp16, and gpt2-medium in bf16 eager, compiled (train.compile) and with
# activation checkpointing; then a table of tokens/s, MFU (against the datasheet peak, ds_trainer/flops.py), peak memory, and whether
# the loss was finite and fell (fp16: the loss scale logged). Never part of CI.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   STEPS=40 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#   SMOKE=1 bash benchmarks/gpu_check.sh         # the plumbing on a CPU with gpt2-tiny (tests/test_gpu_check.py)
#
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
STEPS=${STEPS:-$([ "$SMOKE" = 1 ] && echo 8 || echo 40)}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check}
PYTHON=${PYTHON:-python3}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ds_trainer_torch_extensions}
# The GPT-2 tokenizer file: the offline copy beside the checkout when there is one, else tiktoken downloads.
[ -d ../shared/tiktoken_cache ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$(cd ../shared/tiktoken_cache && pwd)}
mkdir -p "$OUT"
start=$(date +%s)

[ "$SMOKE" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
"$PYTHON" launch/build_ops.py || exit 1

# name | preset | DeepSpeed JSON | micro-batch | extra flags
RUNS=(
  "gpt2 zero1 bf16|gpt2|zero1.json|16"
  "gpt2 zero2 bf16|gpt2|zero2.json|16"
  "gpt2 zero3 bf16|gpt2|zero3.json|16"
  "gpt2 zero1 fp16|gpt2|zero1_fp16.json|16"
  "gpt2 zero2 fp16|gpt2|zero2_fp16.json|16"
  "gpt2 zero3 fp16|gpt2|zero3_fp16.json|16"
  "gpt2-medium zero1 bf16|gpt2-medium|zero1.json|8"
  "gpt2-medium zero1 bf16 compiled|gpt2-medium|zero1.json|8|--train.compile true"
  "gpt2-medium zero1 bf16 act. ckpt|gpt2-medium|zero1_activation_checkpointing.json|8"
  "gpt2-medium zero3 bf16 compiled|gpt2-medium|zero3.json|8|--train.compile true"
)
for spec in "${RUNS[@]}"; do
  IFS='|' read -r name preset json batch extra <<< "$spec"
  # The smoke's steps are the plumbing, not a measurement: a short context keeps them quick on a CPU
  # whose bf16 matmuls are slow (no native bf16).
  [ "$SMOKE" = 1 ] && preset=gpt2-tiny batch=2 extra="$extra --data.context_length 32"
  run="$OUT/${name// /_}"
  rm -rf "$run"
  echo "[$(( $(date +%s) - start )) s] $name"  # (importing DeepSpeed may print a line first: the port is last)
  deepspeed --num_gpus 1 --master_port "$("$PYTHON" -c 'from ds_trainer.process import free_port; print(free_port())' | tail -n 1)" \
    launch/pretrain.py --ds_config "ds_configs/$json" --model.preset "$preset" --model.dropout 0 \
    --train.micro_batch_size "$batch" --train.max_steps "$STEPS" --train.warmup_steps 5 --eval.interval 0 \
    --log.interval 1 --checkpoint.dir "$run" --checkpoint.save_interval 0 $extra > "$run.log" 2>&1 \
    || echo "  failed: $(grep -m1 '^error:' "$run.log" || tail -n 3 "$run.log")"
done

"$PYTHON" - "$OUT" "${RUNS[@]}" <<'PY'
import json, math, statistics, sys
from pathlib import Path
out, specs = Path(sys.argv[1]), sys.argv[2:]
print("\n| run | tokens/s | TFLOP/s per GPU | MFU | peak memory | loss first -> last | finite, falling |")
print("|---|---|---|---|---|---|---|")
for spec in specs:
    name = spec.split("|")[0]
    path = out / name.replace(" ", "_") / "metrics.jsonl"
    if not path.is_file():
        print(f"| {name} | failed: see {path.parent}.log | | | | | no |")
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    timed = [r for r in steps if r["step"] > 5] or steps  # after warm-up (and compilation)
    med = lambda key: statistics.median(r[key] for r in timed if key in r) if any(key in r for r in timed) else float("nan")
    losses = [r["train/loss"] for r in steps]
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    scale = " (loss scale %g)" % steps[-1]["train/loss_scale"] if "train/loss_scale" in steps[-1] else ""
    peak = max((r.get("mem/device_peak_gb", 0.0) for r in steps), default=0.0)
    print(f"| {name} | {med('perf/tokens_per_sec'):,.0f} | {med('perf/tflops_per_device'):.1f} | "
          f"{med('perf/mfu'):.1%} | {peak:.1f} GiB | {losses[0]:.2f} -> {losses[-1]:.2f}{scale} | "
          f"{'yes' if ok else 'NO'} |")
PY
echo "gpu_check took $(( $(date +%s) - start )) s"
