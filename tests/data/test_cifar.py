"""CIFARDataModule: offline reading of the standard layout, both input pipelines, resumable augmentation, errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from step_lightning.data import CIFARDataModule
from step_lightning.data.cifar import read_cifar
from tests.conftest import make_cifar


def _fake_trainer(stage: str = "train", rank: int = 0) -> Any:
    return SimpleNamespace(training=stage == "train", sanity_checking=False, validating=stage == "val",
                           global_rank=rank, world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))


def _batches(dm: CIFARDataModule, loader: StatefulDataLoader, stage: str = "train") -> list[tuple[Any, Any]]:
    dm.trainer = _fake_trainer(stage)  # type: ignore[assignment]
    return [dm.on_after_batch_transfer(batch, 0) for batch in loader]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_reads_the_standard_layout_offline(tmp_path: Path, dataset: str) -> None:
    make_cifar(tmp_path, dataset, n_train=40, n_test=16)
    dm = CIFARDataModule(dataset, data_dir=str(tmp_path), batch_size=8, num_workers=0)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == ((10 if dataset == "cifar10" else 100), 3, 32)
    dm.prepare_data()  # present: nothing to download
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert len(dm.val_dataloader().dataset) == 16  # the test set validates by default
    assert isinstance(dm.train_dataloader(), StatefulDataLoader)


def test_archive_is_extracted_when_only_it_is_present(tmp_path: Path) -> None:
    make_cifar(tmp_path / "src")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    dm = CIFARDataModule(data_dir=str(tmp_path), num_workers=0)
    dm.prepare_data()
    images, labels = read_cifar(tmp_path, "cifar10", train=True)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (40,)


def test_missing_data_and_failed_download_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.CIFAR10, "download", no_network)
    dm = CIFARDataModule(data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"cifar10 is not under `--data.data_dir`.*cifar-10-python.tar.gz"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=r"files missing under `--data\.data_dir`"):
        dm.setup("fit")


def test_val_split_holds_out_part_of_the_training_set(tiny_cifar: Path) -> None:
    dm = CIFARDataModule(data_dir=str(tiny_cifar), val_split=0.25, num_workers=0)
    dm.setup("fit")
    assert len(dm.splits["train"][1]) == 30 and len(dm.splits["val"][1]) == 10 and len(dm.splits["test"][1]) == 16
    train, val = dm.splits["train"][0], dm.splits["val"][0]
    assert not (train[:, None] == val[None]).flatten(2).all(-1).any()  # disjoint


def test_wrong_dataset_for_the_folder(tmp_path: Path) -> None:
    make_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-10-batches-py").symlink_to(tmp_path / "cifar-100-python")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / "cifar-100-python" / name).symlink_to(tmp_path / "cifar-100-python" / "train")
    dm = CIFARDataModule("cifar10", data_dir=str(tmp_path), num_workers=0)
    with pytest.raises(ValueError, match="labels go up to"):
        dm.setup("fit")


def test_device_path_without_augmentation_equals_the_cpu_path(tiny_cifar: Path) -> None:
    cpu = CIFARDataModule(data_dir=str(tiny_cifar), batch_size=8, num_workers=0, augment=False, gpu_augment=False)
    dev = CIFARDataModule(data_dir=str(tiny_cifar), batch_size=8, num_workers=0, augment=False, gpu_augment=True)
    for dm in (cpu, dev):
        dm.setup("fit")
    for stage, loader in (("train", "train_dataloader"), ("val", "val_dataloader")):
        torch.manual_seed(0)
        a = list(getattr(cpu, loader)())
        torch.manual_seed(0)
        b = _batches(dev, getattr(dev, loader)(), stage)
        assert len(a) == len(b) == (5 if stage == "train" else 2)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            torch.testing.assert_close(xa, xb)
            assert torch.equal(ya, yb)


def test_device_path_augmentation_resumes_on_every_rank(tiny_cifar: Path) -> None:
    def module(rank: int, state: dict[str, Any] | None = None) -> CIFARDataModule:
        dm = CIFARDataModule(data_dir=str(tiny_cifar), batch_size=8, num_workers=0, gpu_augment=True, seed=3)
        dm.setup("fit")
        dm.trainer = _fake_trainer(rank=rank)  # type: ignore[assignment]
        if state is not None:
            dm.load_state_dict(state)
        return dm

    index = torch.arange(8)
    runs = {rank: module(rank) for rank in (0, 1)}
    for dm in runs.values():
        dm.on_after_batch_transfer(index, 0)
    state = runs[0].state_dict()  # only rank 0 writes checkpoints: its state must serve every rank
    expected = {rank: dm.on_after_batch_transfer(index, 0)[0] for rank, dm in runs.items()}
    for rank in (0, 1):
        assert torch.equal(module(rank, state).on_after_batch_transfer(index, 0)[0], expected[rank])
    assert not torch.equal(expected[0], expected[1])  # ranks draw different augmentations
    assert not torch.equal(module(0).on_after_batch_transfer(index, 0)[0], expected[0])  # the next batch differs


def test_bad_arguments_are_reported_together() -> None:
    with pytest.raises(ValueError) as err:
        CIFARDataModule("cifar1000", batch_size=0, num_workers=-1, val_split=1.0, gpu_augment="yes")  # type: ignore
    message = str(err.value)
    for flag in ("--data.dataset", "--data.batch_size", "--data.num_workers", "--data.val_split", "--data.gpu_augment"):
        assert flag in message


def test_the_parser_checks_the_constraint_types_and_hands_on_plain_numbers() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CIFARDataModule, "data")
    with pytest.raises(Exception, match="batch_size"):
        parser.parse_args(["--data.batch_size", "0"])
    config = parser.parse_args(["--data.batch_size", "16", "--data.val_split", "0.25"])
    dm = parser.instantiate_classes(config).data
    # A jsonargparse PositiveInt in the hyperparameters would make the checkpoint fail torch.load(weights_only=True).
    assert type(dm.hparams["batch_size"]) is int and type(dm.hparams["val_split"]) is float
    buffer = io.BytesIO()
    torch.save(dict(dm.hparams), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["batch_size"] == 16
