"""CIFAR input pipelines, side by side in one process: images/s of the CPU path and the device-resident path.

What is measured (the data is a synthetic CIFAR-10 written in the official pickled layout to a temp dir, so
nothing is downloaded; ``--images`` of them, default 10,240):

1. **Loader throughput** (``--device cpu``, always): full passes over the training set, taking every batch
   as the training loop would (for the device path: the index batch, moved to the device, then
   ``CIFARDataModule.on_after_batch_transfer``, which gathers, crops, flips and normalises the batch).

   * ``cpu, workers=W``: torchvision ``v2`` transforms per image in ``W`` ``StatefulDataLoader`` workers
     (``W`` = 0 and ``--workers``);
   * ``device-resident``: the same augmentation batched with :func:`step_lightning.data.augment.crop_flip`
     on the device (here the CPU: it shows the cost of the batched ops themselves; on a GPU it is a few
     kernels per batch).

   The passes are interleaved (one pass of each path per round) and the ratio to the CPU path with 0 workers
   is the median over rounds.

2. **ResNet-18 epoch time on a GPU** (``--gpu``, needs CUDA): one CIFAR-10-sized epoch (50,000 synthetic
   images) of the shipped ``configs/cifar10/resnet18.yaml`` settings (bf16-mixed,
   channels_last, device-resident augmentation, StepAdamW) at ``--gpu-batch`` (512) through a real
   ``Trainer``, dense and STEP in its mask-learning phase (switch after the first step), after one warm-up
   epoch, interleaved over ``--rounds``; prints seconds per epoch and STEP/dense.

Run::

    python benchmarks/input_pipeline.py                    # CPU table, about a minute on 2 cores
    python benchmarks/input_pipeline.py --gpu --rounds 2   # plus the GPU epoch times (CUDA machine)

Output: Markdown on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from step_lightning.data import CIFARDataModule


def write_cifar(root: Path, images: int, seed: int = 0) -> None:
    """A synthetic CIFAR-10 of ``images`` training and 1,000 test images in the official layout."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per_batch = images // 5
    for name, count in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", 1000)]:
        entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, count).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


class _Trainer:
    """The attributes of a Trainer that CIFARDataModule reads, for timing the loader on its own."""

    training = True
    sanity_checking = False
    validating = False
    global_rank = 0

    def __init__(self, device: torch.device) -> None:
        self.strategy = type("S", (), {"root_device": device})()


def loader_pass(dm: CIFARDataModule, device: torch.device) -> tuple[float, int]:
    """Seconds for one pass over the training loader, batches taken as the training loop would."""
    dm.trainer = _Trainer(device)  # type: ignore[assignment]
    loader = dm.train_dataloader()
    start = time.perf_counter()
    count = 0
    for batch in loader:
        if dm.use_device_path:
            _, labels = dm.on_after_batch_transfer(batch.to(device, non_blocking=True), 0)
        else:
            batch[0].to(device, non_blocking=True)
            labels = batch[1].to(device, non_blocking=True)
        count += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, count


def cpu_table(data: Path, batch: int, workers: int, rounds: int) -> str:
    device = torch.device("cpu")
    paths: dict[str, CIFARDataModule] = {
        "cpu, workers=0": CIFARDataModule(data_dir=str(data), batch_size=batch, num_workers=0, gpu_augment=False),
        f"cpu, workers={workers}": CIFARDataModule(data_dir=str(data), batch_size=batch, num_workers=workers,
                                                   gpu_augment=False),
        "device-resident (on CPU)": CIFARDataModule(data_dir=str(data), batch_size=batch, num_workers=0,
                                                    gpu_augment=True),
    }
    for dm in paths.values():
        dm.setup("fit")
        loader_pass(dm, device)  # warm-up: worker start, first allocation
    rates: dict[str, list[float]] = {name: [] for name in paths}
    ratios: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        seconds = {}
        for name in order:
            secs, count = loader_pass(paths[name], device)
            seconds[name] = secs
            rates[name].append(count / secs)
        for name in paths:
            ratios[name].append(seconds["cpu, workers=0"] / seconds[name])
    lines = [f"#### Loader throughput, batch {batch}, {rounds} interleaved rounds",
             "", "| path | images/s (median) | speed vs cpu, workers=0 (median of rounds) | range |",
             "|---|---:|---:|---:|"]
    for name in paths:
        lines.append(f"| {name} | {statistics.median(rates[name]):,.0f} | {statistics.median(ratios[name]):.2f}x | "
                     f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f} |")
    return "\n".join(lines)


def gpu_table(data: Path, batch: int, rounds: int, accelerator: str = "gpu") -> str:
    import lightning.pytorch as pl

    from step_lightning import StepAdamW, STEPCallback
    from step_lightning.models import ImageClassifier
    from step_lightning.optim import WarmupDecayLR

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    def epoch_seconds(recipe: str) -> float:
        model = ImageClassifier("resnet18", num_classes=10, channels_last=True,
                                optimizer=lambda p: StepAdamW(p, lr=1e-3, weight_decay=5e-2),
                                lr_scheduler=lambda o: WarmupDecayLR(o, decay="cosine"))
        dm = CIFARDataModule(data_dir=str(data), batch_size=batch, gpu_augment=True)
        timer = EpochTimer()
        callbacks: list[pl.Callback] = [timer] + ([STEPCallback(switch=1)] if recipe == "step" else [])
        trainer = pl.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed", max_epochs=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, dm)
        return timer.times[-1]  # the second epoch: after cuDNN autotuning and allocator warm-up

    times: dict[str, list[float]] = {"dense": [], "step": []}
    ratios = []
    for r in range(rounds):
        for recipe in (["dense", "step"] if r % 2 == 0 else ["step", "dense"]):
            times[recipe].append(epoch_seconds(recipe))
        ratios.append(times["step"][-1] / times["dense"][-1])
    return "\n".join([
        f"#### ResNet-18, CIFAR-10-shaped synthetic epoch, bf16-mixed, batch {batch}, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, {rounds} interleaved rounds", "",
        "| recipe | s/epoch (median) | / dense (median of rounds) |", "|---|---:|---:|",
        f"| dense (StepAdamW, never frozen) | {statistics.median(times['dense']):.2f} | 1.00x |",
        f"| STEP, mask-learning phase | {statistics.median(times['step']):.2f} | {statistics.median(ratios):.3f}x |",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_240, help="training images of the CPU table")
    parser.add_argument("--batch", type=int, default=256, help="batch size of the CPU table")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the second CPU row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--gpu", action="store_true", help="also time ResNet-18 epochs on the CUDA GPU")
    parser.add_argument("--gpu-batch", type=int, default=512)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load: Any = os.getloadavg()
    print(f"input_pipeline.py, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, load {load[0]:.1f}; "
          f"command: {' '.join(sys.argv)}\n")
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), args.images)
        print(cpu_table(Path(tmp), args.batch, args.workers, args.rounds))
        if args.gpu:
            if not torch.cuda.is_available():
                raise SystemExit("--gpu: no CUDA GPU here.")
            gpu_dir = Path(tmp) / "full"
            write_cifar(gpu_dir, 50_000)
            print()
            print(gpu_table(gpu_dir, args.gpu_batch, args.rounds))


if __name__ == "__main__":
    main()
