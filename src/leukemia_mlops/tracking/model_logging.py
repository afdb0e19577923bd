"""Logging trained networks as MLflow models."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def log_classifier(uri: str, run_id: str, net: nn.Module, image_size: int) -> None:
    """Log ``net`` as an MLflow PyTorch model, with an input signature, into a run."""
    import mlflow
    from mlflow.models import infer_signature

    net = net.eval().float().to(memory_format=torch.contiguous_format)
    # A batch of two: torch.export would fix a batch dimension of one into the saved model.
    example = np.zeros((2, 3, image_size, image_size), np.float32)
    with torch.no_grad():
        output = net(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            net,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=torch_requirements(),
        )


def torch_requirements() -> list[str]:
    """The pip requirement of a logged torch model: this torch, without its build suffix."""
    return [f"torch=={torch.__version__.split('+')[0]}"]
