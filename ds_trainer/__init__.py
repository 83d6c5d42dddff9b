"""ds_trainer: pretrain GPT language models from scratch with DeepSpeed."""

__version__ = "0.1.0"
