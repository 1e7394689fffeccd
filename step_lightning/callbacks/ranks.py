"""Verify, with one small collective, that every DDP rank holds the same masks and recipe counters."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from step_lightning.sparsity import MaskedWeights, describe_rank_mismatch, mask_fingerprint


def check_rank_agreement(trainer: pl.Trainer, owner: str, masked_weights: MaskedWeights,
                         scalars: Mapping[str, int | None], when: str, optimizer_step: int) -> None:
    """Under DDP, verify with one ``all_gather`` that every rank holds the same masks and ``scalars``.

    Collective: every rank must call it at the same point (never inside a rank-0-only branch). Does
    nothing with one process.

    Args:
        trainer: the running trainer (its strategy gathers).
        owner: the name messages start with (the recipe callback's class name).
        masked_weights: the recipe's masks; while it holds none (STEP right at its switch, or dense until
            the end), the magnitude masks of the current weights are compared: the ones the next step would
            use and ``export`` would write.
        scalars: integers every rank must agree on, by name (``None`` for "not yet"), e.g. the optimizer step.
        when: for messages, e.g. ``"at the end of fit"``.
        optimizer_step: the recipe's optimizer step count now, for the message.

    Raises:
        RuntimeError: the ranks disagree; the message names the ranks, what differs and the usual causes.
    """
    if trainer.world_size <= 1:
        return
    device = trainer.strategy.root_device
    masks = masked_weights.masks
    if masks is None and not masked_weights.applied:
        masks = masked_weights.compute_masks()
    if masks is None:
        layers = torch.full((len(masked_weights.names), 2), -1, dtype=torch.int64, device=device)
    else:
        layers = mask_fingerprint(masks).to(device)
    values = torch.tensor([-1 if v is None else v for v in scalars.values()], dtype=torch.int64, device=device)
    gathered = trainer.strategy.all_gather(torch.cat([values, layers.reshape(-1)])).cpu()
    problems = describe_rank_mismatch(gathered, list(scalars), masked_weights.names)
    if problems:
        rank0 = ", ".join(f"{name} {'none' if v < 0 else v}"
                          for name, v in zip(scalars, gathered[0, :len(scalars)].tolist(), strict=True))
        raise RuntimeError(
            f"{owner}: the {trainer.world_size} DDP ranks disagree {when} (rank 0: {rank0}): "
            + " | ".join(problems) + ". Every rank computes "
            "the N:M masks from its own copy of the weights and must end up with the same masks and switch step. "
            "Usual causes: non-deterministic kernels or different GPU models / library versions across nodes "
            "(try `trainer.deterministic: true`), ranks that started from different weights or callback state "
            "(initialise or load checkpoints identically on every rank), or a custom sampler or data pipeline that "
            "lets ranks run different numbers of steps (use Lightning's distributed sampler: "
            "`trainer.use_distributed_sampler: true`)."
        )
    rank_zero_info(f"{owner}: all {trainer.world_size} ranks agree {when} (optimizer step {optimizer_step}): "
                   f"{', '.join(scalars)} and the masks of {len(masked_weights.names)} weights.")
