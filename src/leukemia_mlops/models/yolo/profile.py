"""Model size and compute, to compare against published figures."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BN running statistics are buffers and not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, img_size: int, batch_size: int = 1) -> int:
    """FLOPs of one eval forward on ``img_size`` squares, counted as 2 x multiply-adds.

    That is Darknet's "BFLOPs" convention. Build the model under ``torch.device("meta")`` to
    count a full-size network without allocating or computing anything.
    """
    param = next(model.parameters())
    images = torch.zeros(batch_size, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()  # train-mode BN would update running statistics
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops()
