"""Run under the deepspeed launcher: what one rank holds of the model and optimizer, from construction on.

    deepspeed --num_gpus 2 tests/probes/zero_memory.py OUT DS.json

Writes, per rank r, a JSON object to OUT.rank{r}: whether every parameter was partitioned right after
construction (ZeRO-3), the elements of parameters this rank holds, whether the weights (gathered, under
ZeRO-3) equal those of a GPT built without ZeRO from the same seed, and the bytes of parameters +
optimizer state after one step.
"""

import json
import os
import sys

import deepspeed
import torch

from ds_trainer.config import load_run_config
from ds_trainer.ds_config import load_ds_json, resolve
from ds_trainer.engine import build_engine, build_model
from ds_trainer.model import GPT
from ds_trainer.process import end_process, init_distributed


def tensors_in(obj, seen: set, depth: int = 0):
    """Every tensor reachable from an optimizer object: its state, flat buffers and partitions."""
    if depth > 4 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, seen, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors_in(v, seen, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer):
        yield from tensors_in(obj.state, seen, depth + 1)
        yield from tensors_in([g["params"] for g in obj.param_groups], seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        yield from tensors_in(vars(obj), seen, depth + 1)


def weights_differing_from_plain_gpt(model: torch.nn.Module, cfg) -> list[str]:
    """Names of parameters whose full value differs from GPT(cfg) built without ZeRO from seed 0.

    Under ZeRO-3 the module was initialised inside zero.Init (each module gathered around `apply`);
    it must still hold GPT-2's initialisation, not whatever zero.Init's partitioning left behind.
    """
    torch.manual_seed(0)
    plain = dict(GPT(cfg).named_parameters())
    named = list(model.named_parameters())
    # Gathering is collective: every rank takes part; a no-op for parameters ZeRO-3 does not manage.
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return [n for n, p in named if not torch.equal(p.detach().cpu(), plain[n].detach())]


def main() -> None:
    out_path, ds_path = sys.argv[-2], sys.argv[-1]
    init_distributed()
    run = load_run_config(None, ["--data.context_length", "32", "--train.micro_batch_size", "2"])
    raw, source = load_ds_json(ds_path)
    ds = resolve(raw, source, run, int(os.environ["WORLD_SIZE"]), 1000, "cpu")
    torch.manual_seed(0)
    model = build_model(run.gpt_config(), ds)
    params = list(model.parameters())
    partitioned = all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    mismatched = weights_differing_from_plain_gpt(model, run.gpt_config())
    engine = build_engine(model, ds)
    x = torch.randint(0, 50257, (2, 32))
    engine.backward(engine(x, x))
    engine.step()
    storages = {}
    for t in [*(getattr(p, "ds_tensor", p) for p in params), *tensors_in(engine.optimizer, set())]:
        if t.device.type == "cpu" and t.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    result = {
        "partitioned_at_construction": partitioned,
        "param_elements_full": full,
        "param_elements_held": held,
        "weights_differing_from_plain_gpt": mismatched,
        "model_and_optimizer_bytes": sum(storages.values()),
    }
    with open(f"{out_path}.rank{os.environ['RANK']}", "w") as f:
        json.dump(result, f)
    end_process(0)  # DeepSpeed's gloo groups must not reach the interpreter's teardown


if __name__ == "__main__":
    main()
