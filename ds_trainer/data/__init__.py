"""Data: corpora into token windows (in memory or memory-mapped shards), and the global sample order.

Names are imported on first use, so `launch/prepare_data.py` (which needs none of torch) starts fast.
"""

from importlib import import_module

_WHERE = {
    "BatchRampup": "sampler",
    "GlobalBatchSampler": "sampler",
    "Permutation": "sampler",
    "SampleStream": "sampler",
    "TokenShards": "shards",
    "is_prepared": "shards",
    "TokenWindows": "text",
    "WindowSet": "text",
    "builtin_corpus": "text",
    "load_text_documents": "text",
    "split_train_val": "text",
    "build_datasets": "datasets",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ds_trainer.data' has no attribute {name!r}")
    return getattr(import_module(f"ds_trainer.data.{_WHERE[name]}"), name)
