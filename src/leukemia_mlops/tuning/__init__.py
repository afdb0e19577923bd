"""Hyperparameter tuning with Optuna: search spaces, studies and their storage, pruning inside
training, and the MLflow runs of a sweep. The Hydra sweeper plugin is a thin adapter over it."""
