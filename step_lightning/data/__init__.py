"""LightningDataModules. Each works offline from local data; downloads happen only in ``prepare_data``."""

from step_lightning.data.cifar import CIFARDataModule
from step_lightning.data.digits import DigitsDataModule
from step_lightning.data.glue import GLUEDataModule
from step_lightning.data.image_folder import ImageFolderDataModule
from step_lightning.data.mnist import MNISTDataModule
from step_lightning.data.wikitext import WikiTextDataModule
from step_lightning.data.wmt import WMTDataModule

__all__ = [
    "CIFARDataModule",
    "DigitsDataModule",
    "GLUEDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "WMTDataModule",
    "WikiTextDataModule",
]
