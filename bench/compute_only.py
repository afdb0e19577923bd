"""The training step with batches already on the device: the ceiling of any data path.

The same network, loss, optimizer, precision and memory layout as the project's path, on one
fixed random batch: no loader, augmentation, metrics or framework. The GPU check and the CPU
precision benchmark set the project's path against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.timing import BatchClock, Rate, rate_of


def compute_only_rate(
    backbone: str,
    precision: str,
    device: str,
    image_size: int,
    batch: int,
    clock: BatchClock,
    sync: Callable[[], None] = lambda: None,
    compile_backend: str | None = None,
) -> Rate:
    """Training images/s of ``backbone`` (channels-last; ``torch.compile`` with
    ``compile_backend`` unless None); the first batch, which compiles, is ``Rate.first_s``."""
    from leukemia_mlops.models.classifier import CellClassifier

    module = CellClassifier(backbone=backbone, warmup_epochs=0).to(device)
    net = module.net.train()  # channels-last, as the module keeps it
    if compile_backend is not None:
        net = torch.compile(net, backend=compile_backend)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch,), device=device).float()
    bf16 = precision.startswith("bf16")

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss = module.loss(net(images).float(), labels)
        loss.backward()
        optimizer.step()
        sync()
        return batch

    return rate_of(step, clock)
