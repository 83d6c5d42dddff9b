"""Hyperparameter search: Optuna studies whose trials are real ds_trainer runs (launch/search.py)."""
