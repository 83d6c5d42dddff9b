"""Data: corpora into token windows (in memory or memory-mapped shards), and the global sample order."""

from ds_trainer.data.datasets import build_datasets
from ds_trainer.data.sampler import BatchRampup, GlobalBatchSampler, Permutation, SampleStream
from ds_trainer.data.shards import TokenShards, is_prepared
from ds_trainer.data.text import TokenWindows, WindowSet, builtin_corpus, load_text_documents, split_train_val

__all__ = [
    "BatchRampup",
    "GlobalBatchSampler",
    "Permutation",
    "SampleStream",
    "TokenShards",
    "TokenWindows",
    "WindowSet",
    "build_datasets",
    "builtin_corpus",
    "is_prepared",
    "load_text_documents",
    "split_train_val",
]
