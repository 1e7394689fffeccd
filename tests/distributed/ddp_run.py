"""Test helper: a 2-process CPU (gloo) DDP fit of the tiny test model with STEP, launched by test_ddp.py.

    python tests/distributed/ddp_run.py OUT_DIR [--perturb-rank R]

Lightning's DDP launcher starts rank 1 by re-running this script. Each rank writes ``OUT_DIR/rank<r>.json``
at the end of fit: which module buffers DDP broadcast during training and whether any of them is a mask
or a masked-weight storage of the recipe. With ``--perturb-rank R``, rank ``R`` changes its switch step and
one mask (same kept count, other positions) just before the recipe's end-of-fit rank check, which must
then raise; the message of each rank goes to ``OUT_DIR/error_rank<r>.txt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from step_lightning import STEPCallback
from tests.conftest import TinyModule, tiny_loaders

_broadcast: list[torch.Tensor] = []
_recording = False
_original_broadcast_coalesced = dist._broadcast_coalesced


def _spy_broadcast_coalesced(group: Any, tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    if _recording:
        _broadcast.extend(tensors)
    return _original_broadcast_coalesced(group, tensors, *args, **kwargs)


dist._broadcast_coalesced = _spy_broadcast_coalesced  # what DDP calls to broadcast module buffers


class BufferReport(Callback):
    """Records what DDP broadcast during training and compares it with the recipe's masks."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        global _recording
        _recording = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        global _recording
        _recording = False
        recipe = next(cb for cb in trainer.callbacks if isinstance(cb, STEPCallback))
        engine = recipe.masked_weights
        assert engine is not None and engine.masks is not None and engine._buffers is not None
        recipe_storages = {t.untyped_storage().data_ptr() for t in [*engine.masks, *engine._buffers]}
        names = {b.untyped_storage().data_ptr(): n for n, b in pl_module.named_buffers()}
        broadcast = {t.untyped_storage().data_ptr() for t in _broadcast}
        report = {
            "world_size": trainer.world_size,
            "broadcast_tensors": len(_broadcast),
            "broadcast_buffer_names": sorted({names.get(ptr, "<not a module buffer>") for ptr in broadcast}),
            "recipe_storages_broadcast": len(recipe_storages & broadcast),
            "recipe_storages_in_module_buffers": len(recipe_storages & set(names)),
            "switch_step": recipe.switch_step,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class Perturb(Callback):
    """On one rank, changes the switch step and rolls one mask before the recipe's end-of-fit check."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != self.rank:
            return
        recipe = next(cb for cb in trainer.callbacks if isinstance(cb, STEPCallback))
        engine = recipe.masked_weights
        assert engine is not None and engine.masks is not None and recipe._switch_step is not None
        recipe._switch_step += 1  # a fault injected on purpose: no public API may set the switch step
        masks = engine.masks
        masks[1] = masks[1].roll(1, dims=-1)  # net.fc1.weight: the same kept count, other positions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--perturb-rank", type=int, default=None)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    callbacks: list[Callback] = [BufferReport(args.out_dir)]
    if args.perturb_rank is not None:
        callbacks.append(Perturb(args.perturb_rank))
    callbacks.append(STEPCallback(switch=3))  # after the others: its on_train_end check sees their changes
    trainer = pl.Trainer(
        default_root_dir=args.out_dir, accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        callbacks=callbacks,
    )
    train, _ = tiny_loaders()
    try:
        trainer.fit(TinyModule(), train)
    except RuntimeError as err:
        (args.out_dir / f"error_rank{trainer.global_rank}.txt").write_text(str(err))
        raise


if __name__ == "__main__":
    main()
