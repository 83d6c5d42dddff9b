"""Data: text corpora into token windows, and the global-index sampler that feeds every rank."""

from ds_trainer.data.sampler import GlobalBatchSampler
from ds_trainer.data.text import (
    TokenWindows,
    builtin_corpus,
    load_text_documents,
    split_train_val,
    text_datasets,
)

__all__ = [
    "GlobalBatchSampler",
    "TokenWindows",
    "builtin_corpus",
    "load_text_documents",
    "split_train_val",
    "text_datasets",
]
