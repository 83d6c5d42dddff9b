"""Plan a GPT pretraining run: memory per GPU, token budget and time, and a DeepSpeed JSON that fits.

python launch/plan.py --preset gpt2 --zero 2 --nodes 1 --gpus_per_node 8
python launch/plan.py --n_layer 48 --n_head 25 --n_embd 1600 --micro_batch 16 --write ds_plan.json
python launch/plan.py --preset gpt2-xl --micro_batch 1 --context 128 --host_memory 24GB --nvme_path /nvme

The figures and formulas are documented in docs/planning.md. Sizes are GiB (2**30 bytes).
"""

import argparse
import sys

from ds_trainer.errors import DsTrainerError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit 2, like every other bad input
        raise DsTrainerError(message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="gpt2-tiny, gpt2, gpt2-medium, gpt2-large or gpt2-xl")
    for dim in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        ap.add_argument(f"--{dim}", type=int, help="overrides the preset's value")
    ap.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (default 0)")
    ap.add_argument("--offload", default="none", help="none, cpu or nvme (cpu: stage 1-3; nvme: stage 3)")
    ap.add_argument(
        "--offload_params",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="at ZeRO-3, offload the parameters too (default: yes whenever ZeRO-3 offloads)",
    )
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus_per_node", type=int, default=1)
    ap.add_argument("--gpu_memory_gb", type=float, default=80.0, help="per GPU, GiB (default 80)")
    ap.add_argument(
        "--cpu_memory_gb", type=float, default=1024.0, help="per node, for CPU offload (default 1024)"
    )
    ap.add_argument("--nvme_gb", type=float, default=2048.0, help="per node, for NVMe offload (default 2048)")
    ap.add_argument(
        "--micro_batch", type=int, default=4, help="sequences per GPU per forward pass (default 4)"
    )
    ap.add_argument("--context", type=int, help="tokens per sequence (default: the model's block_size)")
    ap.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default bf16)")
    ap.add_argument(
        "--attention", default="flash", help="flash (fused SDPA, default) or math (stores a*s^2 scores)"
    )
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    ap.add_argument(
        "--peak_tflops",
        type=float,
        help="per device; default 989 for bf16/fp16 (H100 SXM dense), 67 for fp32 (no TF32)",
    )
    ap.add_argument("--tokens", type=int, help="training tokens (default: 20 per parameter)")
    ap.add_argument("--write", metavar="PATH", help="write the suggested DeepSpeed JSON to PATH")
    ap.add_argument(
        "--host_memory",
        metavar="SIZE",
        help="host memory per node, e.g. 24GB (GB and GiB both mean 2**30 bytes): adds the offload layouts' "
        "resident, pinned and NVMe bytes on that host, with the offload sizes ds_trainer derives for it",
    )
    ap.add_argument("--nvme_path", help="with --host_memory: the NVMe folder, whose free space is checked")
    ap.add_argument(
        "--cpu_ranks",
        action="store_true",
        help="with --host_memory: the ranks compute on the CPU (no GPU), so their device memory is host memory",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        from ds_trainer.offload import Host, parse_memory
        from ds_trainer.planning import PlanRequest, format_plan, model_config, plan, write_suggestion
        from ds_trainer.planning.planner import host_plan
        from ds_trainer.planning.report import format_host

        cfg = model_config(
            args.preset, args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab_size
        )
        request = PlanRequest(
            cfg,
            zero=args.zero,
            offload=args.offload,
            offload_params=args.offload_params,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu_memory_gb=args.gpu_memory_gb,
            cpu_memory_gb=args.cpu_memory_gb,
            nvme_gb=args.nvme_gb,
            micro_batch=args.micro_batch,
            context=args.context,
            dtype=args.dtype,
            attention=args.attention,
            mfu=args.mfu,
            peak_tflops=args.peak_tflops,
            tokens=args.tokens,
        )
        result = plan(request)
        print(format_plan(result), flush=True)
        if args.host_memory is not None:
            host = Host(parse_memory(args.host_memory, "--host_memory"), args.gpus_per_node)
            needs = host_plan(request, host, args.nvme_path, args.cpu_ranks)
            print("\n" + format_host(needs, args.gpus_per_node, args.cpu_ranks), flush=True)
        elif args.nvme_path or args.cpu_ranks:
            raise DsTrainerError("--nvme_path and --cpu_ranks describe the host: give --host_memory too")
        if args.write:
            path = write_suggestion(result, args.write)
            print(f"wrote {path}")
    except DsTrainerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
