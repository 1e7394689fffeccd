"""Data loaders that resume exactly: torchdata's ``StatefulDataLoader``, with an explicit DDP sampler."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


def global_seed(seed: int | None) -> int:
    """``seed``, or the one ``seed_everything`` set (``PL_GLOBAL_SEED``), or 0."""
    if seed is not None:
        return seed
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def stateful_loader(dataset: Dataset, trainer: pl.Trainer | None, batch_size: int, shuffle: bool, seed: int,
                    num_workers: int = 0, **kwargs: Any) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` (Lightning saves its position in checkpoints, so a run resumes mid-epoch).

    Under DDP a training loader gets a ``DistributedSampler`` here, seeded with ``seed``: its order is a
    function of the seed and the epoch (Lightning calls ``set_epoch``), so fast-forwarding to the saved
    position on resume yields exactly the batches an uninterrupted run would see. (Lightning would otherwise
    wrap torchdata's stateful ``RandomSampler`` in a ``DistributedSamplerWrapper``, whose inner order is
    re-drawn on resume.)
    Evaluation loaders (``shuffle=False``) get Lightning's ``UnrepeatedDistributedSampler``: no example is
    counted twice in a dev-set metric.
    """
    sampler: DistributedSampler | None = None
    if trainer is not None and trainer.world_size > 1 and not shuffle:
        # Evaluation: every example exactly once over all ranks (DistributedSampler would repeat a few to even
        # out the ranks, which changes dev-set metrics; Lightning's evaluation loops allow uneven ranks).
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                               shuffle=False)
    elif trainer is not None and trainer.world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=True, seed=seed)
        # A resumed run restores the loader position before Lightning's per-epoch `set_epoch`: the epoch must
        # already be right here (the loaders are built after the checkpoint's loop state is restored).
        sampler.set_epoch(trainer.current_epoch)
    return StatefulDataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else None,
                              sampler=sampler, num_workers=num_workers,
                              pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
                              persistent_workers=num_workers > 0, **kwargs)
