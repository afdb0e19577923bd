"""Training order and augmentation seeds: a function of (seed, epoch) only."""

import numpy as np
import torch

from leukemia_mlops.data.datamodule import CellDataModule
from leukemia_mlops.data.sampling import SeededSampler


def epoch_items(sampler: SeededSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_each_epoch_is_a_fixed_permutation_with_fresh_seeds():
    sampler = SeededSampler(50, seed=7)
    first, again = epoch_items(sampler, 3), epoch_items(SeededSampler(50, seed=7), 3)
    assert first == again
    assert sorted(index for index, _ in first) == list(range(50))
    assert len({seed for _, seed in first}) == 50
    other_epoch, other_seed = epoch_items(sampler, 4), epoch_items(SeededSampler(50, seed=8), 3)
    assert [i for i, _ in other_epoch] != [i for i, _ in first]
    assert [i for i, _ in other_seed] != [i for i, _ in first]


def test_ranks_split_one_padded_epoch_order_between_them():
    shards = [epoch_items(SeededSampler(11, 5, num_replicas=3, rank=r), 2) for r in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 4]
    assert {i for shard in shards for i, _ in shard} == set(range(11))
    single = epoch_items(SeededSampler(11, 5), 2)
    interleaved = [shards[k % 3][k // 3] for k in range(11)]
    assert interleaved == single  # the same order, dealt out rank by rank


def test_weights_draw_with_replacement_in_proportion():
    weights = np.array([1.0] * 10 + [0.0] * 90)
    drawn = [index for index, _ in epoch_items(SeededSampler(100, 1, weights), 0)]
    assert len(drawn) == 100 and set(drawn) <= set(range(10))


def batches(prepared, workers: int, epoch: int, balance: str = "loss") -> list[torch.Tensor]:
    datamodule = CellDataModule(
        str(prepared), batch_size=8, num_workers=workers, balance=balance, seed=3
    )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [images for images, _ in loader]


def test_augmented_batches_do_not_depend_on_the_worker_count(tiny_prepared):
    in_process = batches(tiny_prepared, 0, epoch=1)
    with_workers = batches(tiny_prepared, 2, epoch=1)
    assert len(in_process) == len(with_workers) > 1
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
    next_epoch = batches(tiny_prepared, 0, epoch=2)
    assert not torch.equal(in_process[0], next_epoch[0])


def test_balanced_sampling_is_reproducible_too(tiny_prepared):
    first = batches(tiny_prepared, 0, epoch=0, balance="sampler")
    again = batches(tiny_prepared, 0, epoch=0, balance="sampler")
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
