"""``last.ckpt`` every N optimizer steps and after every validation: a run always resumes from recent state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` fresh: every ``every_n_train_steps`` optimizer steps, after each validation
    of ``fit`` and at the end of training.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when it also
    saves a top-k checkpoint, so after a validation that did not improve, ``last.ckpt`` is stale; and
    without ``every_n_train_steps`` a crash loses the epoch in progress. This callback only writes
    ``last.ckpt`` (keep a ``ModelCheckpoint(monitor=...)`` beside it for the best model).

    Its closest Lightning equivalent, ``ModelCheckpoint(save_last=True, every_n_train_steps=N,
    save_top_k=0)`` (checked against Lightning 2.6.6), saves ``last.ckpt`` at the same multiples of N,
    through the same ``trainer.save_checkpoint`` (so as atomically, and with the same loop state for a
    mid-epoch resume), but differs in three ways, each shown by ``tests/callbacks/test_checkpoint.py``:

    * after a validation, and at the end of training, it rewrites ``last.ckpt`` only if it already saved
      at that step (``on_validation_end`` / ``on_train_epoch_end`` test ``_last_global_step_saved ==
      global_step``; ``on_train_end`` saves only if nothing was ever saved): with N = 3 and 7 steps,
      validating at step 5, its ``last.ckpt`` holds step 3 after the validation and step 6 at the end;
      ours holds 5, then 7. A resume from it repeats up to N - 1 steps and their validation;
    * with ``save_on_exception=True`` it writes ``last.ckpt`` (and an ``epoch=..-step=..`` file) from the
      state at the exception; we never save on an exception or interrupt, so a run that died of a
      non-finite loss or a bug leaves the last state saved at a clean step boundary, not a broken one;
    * if a ``last.ckpt`` it did not write is already in its folder, it writes ``last-v1.ckpt`` beside it
      (``enable_version_counter``); we replace ``last.ckpt``, the one name ``--ckpt_path`` and
      ``compare`` look for.

    It saves through
    ``trainer.save_checkpoint``: every rank calls it, rank 0 writes, and the CLI's
    :class:`~step_lightning.checkpointing.AtomicCheckpointIO` makes the write atomic, so a ``kill -9`` at
    any moment leaves the previous ``last.ckpt`` intact. Mid-epoch checkpoints resume on the next batch
    when the data loaders are stateful (the step_lightning data modules use torchdata's
    ``StatefulDataLoader``, whose position Lightning saves, with a seeded ``DistributedSampler`` under
    DDP); the run is then bitwise the uninterrupted one when everything random is a function of the
    position (digits; CIFAR's device-resident augmentation). Per-image CPU augmentation draws from the
    workers' RNG, which no loader replays: those runs resume on the right batches, not the same crops.
    As a ``Checkpoint`` callback, Lightning runs it after every other callback's hook, so a checkpoint
    holds the recipe's state after its end-of-step work.

    Args:
        every_n_train_steps: optimizer steps between saves (0: only after validations and at the end).
        dirpath: directory of ``last.ckpt``; default ``<logger's log_dir>/checkpoints`` (as ModelCheckpoint),
            or ``<default_root_dir>/checkpoints`` without a logger.

    Example::

        trainer:
          callbacks:
            - class_path: step_lightning.callbacks.LastCheckpoint
              init_args: {every_n_train_steps: 1000}
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_train_steps: int = 1000, dirpath: str | None = None) -> None:
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 0:
            raise ValueError(f"LastCheckpoint: `every_n_train_steps` must be an integer >= 0, got "
                             f"{every_n_train_steps!r}.")
        self.every_n_train_steps = every_n_train_steps
        self.dirpath = dirpath
        self.last_model_path = ""
        self._saved_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.dirpath is None:
            root = trainer.log_dir if trainer.loggers else trainer.default_root_dir  # a collective: every rank
            self.dirpath = str(Path(root or ".") / "checkpoints")
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self._saved_step or trainer.sanity_checking or trainer.fast_dev_run:
            return
        assert self.dirpath is not None
        path = str(Path(self.dirpath) / self.FILENAME)
        # Explicit: Lightning logs "`weights_only` was not set" at every save that leaves it to its default.
        trainer.save_checkpoint(path, weights_only=False)
        self._saved_step = trainer.global_step
        self.last_model_path = path

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.every_n_train_steps
        if every and trainer.global_step > 0 and trainer.global_step % every == 0:
            self._save(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._save(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "every_n_train_steps": self.every_n_train_steps}
