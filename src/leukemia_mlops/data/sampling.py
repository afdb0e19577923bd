"""Training order and augmentation seeds that depend on the run's seed and the epoch alone.

A resumed run replays epoch ``e`` exactly as an uninterrupted run does, whatever happened to
the processes before: no random state has to survive in DataLoader workers or be checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.distributed as dist
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler

#: A dataset item: its index and the seed of its augmentation.
SeededIndex = tuple[int, int]


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the running DDP group, or (1, 0) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def unpadded_shard(size: int) -> UnrepeatedDistributedSampler:
    """In-order items ``rank, rank + world size, ...`` of ``range(size)``, not padded.

    For evaluation: Lightning's own ``DistributedSampler`` pads every rank to the same length,
    so that a few cells would count twice in the gathered metrics. Being a
    ``DistributedSampler``, Lightning keeps it. (Unequal shard lengths are safe only without
    gradients: DDP synchronises nothing in a forward pass then.)
    """
    world_size, rank = _process_group()
    return UnrepeatedDistributedSampler(range(size), world_size, rank, shuffle=False)


class SeededSampler(DistributedSampler):
    """Yields ``(index, augmentation seed)`` pairs drawn from ``(seed, epoch)``.

    Shuffles without replacement, or, given ``weights``, draws with replacement in proportion
    to them (class balancing). Under DDP (or given ``num_replicas`` and ``rank``) each rank
    takes every ``num_replicas``-th item of the same epoch order (padded to a multiple of
    it), as ``DistributedSampler`` does; being one, Lightning keeps it instead of its own.
    Lightning calls :meth:`set_epoch` before every training epoch, resumed ones included.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        weights: np.ndarray | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        world_size, own_rank = _process_group()
        num_replicas = world_size if num_replicas is None else num_replicas
        rank = own_rank if rank is None else rank
        super().__init__(range(size), num_replicas, rank, shuffle=True, seed=seed)
        self.size = size
        self.probabilities = None if weights is None else weights / weights.sum()

    def __iter__(self) -> Iterator[SeededIndex]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.probabilities is None:
            order = rng.permutation(self.size)
        else:
            order = rng.choice(self.size, self.size, p=self.probabilities)
        order = np.resize(order, self.total_size)
        seeds = rng.integers(2**32, size=self.total_size)
        mine = slice(self.rank, self.total_size, self.num_replicas)
        return zip(order[mine].tolist(), seeds[mine].tolist(), strict=True)
