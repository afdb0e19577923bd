"""A Hydra sweeper on Optuna's ask-and-tell API (``hydra/sweeper=leukemia_optuna``).

Hydra imports every module of ``hydra_plugins`` when any app starts, so these modules import
Optuna only inside the functions that need it.
"""
