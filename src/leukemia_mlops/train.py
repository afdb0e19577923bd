"""``python -m leukemia_mlops.train [group=option ...] [-m]``: Hydra entry point for training.

Returns the best validation weighted F1, the objective of ``-m hparams_search=...`` sweeps.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from leukemia_mlops.config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from leukemia_mlops.training.run import run_training

    return run_training(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
