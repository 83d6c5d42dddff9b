from setuptools import find_packages, setup

setup(
    name="ds_trainer",
    version="0.1.0",
    description="Pretrain GPT language models from scratch with DeepSpeed.",
    packages=find_packages(include=["ds_trainer", "ds_trainer.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "deepspeed==0.19.8",
        "tiktoken>=0.7",
        "tensorboard>=2.15",
        "pyyaml>=6",
        "psutil>=5.9",
        "numpy>=1.24",
        "safetensors>=0.4",  # launch/export.py writes the consolidated weights with it
    ],
    extras_require={
        # transformers: the GPT-2 equivalence and export tests load Hugging Face models.
        # pytest-random-order: the suite is run in shuffled order now and then (-p random_order).
        "test": [
            "pytest>=8",
            "pytest-random-order>=1.1",
            "transformers>=4.40",
            "ruff>=0.6",
            "matplotlib>=3.7",
            "wandb>=0.17",
            "optuna>=4.2",
            "psycopg2-binary>=2.9",
        ],
        # launch/plot.py draws the training curves (loss against epochs and tokens, learning rate) as a PNG.
        "plot": ["matplotlib>=3.7"],
        # log.wandb_project: a Weights & Biases sink beside TensorBoard (WANDB_MODE=offline needs no network).
        "wandb": ["wandb>=0.17"],
        # launch/search.py: Optuna's samplers, pruners and storages; psycopg2 for a PostgreSQL storage that
        # several workers (a SLURM job array) share.
        "search": ["optuna>=4.2", "psycopg2-binary>=2.9"],
    },
)
