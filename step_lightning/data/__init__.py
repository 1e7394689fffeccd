"""LightningDataModules. Each works offline from local data; downloads happen only in ``prepare_data``.

Each family's module is imported on first use of its name (:func:`step_lightning.extras.lazy_attribute`), so
``from step_lightning.data import GLUEDataModule`` works with the ``nlp`` extra alone, without torchvision
or fairseq2, and a jsonargparse ``class_path: step_lightning.data.DigitsDataModule`` resolves the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from step_lightning.extras import lazy_attribute

if TYPE_CHECKING:
    from step_lightning.data.cifar import CIFARDataModule
    from step_lightning.data.digits import DigitsDataModule
    from step_lightning.data.glue import GLUEDataModule
    from step_lightning.data.image_folder import ImageFolderDataModule
    from step_lightning.data.mnist import MNISTDataModule
    from step_lightning.data.wikitext import WikiTextDataModule
    from step_lightning.data.wmt import WMTDataModule

# public name -> (module, the extra whose libraries it needs)
_FAMILIES = {
    "CIFARDataModule": ("step_lightning.data.cifar", "vision"),
    "DigitsDataModule": ("step_lightning.data.digits", "cli"),  # the quickstart's: scikit-learn's bundled digits
    "GLUEDataModule": ("step_lightning.data.glue", "nlp"),
    "ImageFolderDataModule": ("step_lightning.data.image_folder", "vision"),
    "MNISTDataModule": ("step_lightning.data.mnist", "vision"),
    "WMTDataModule": ("step_lightning.data.wmt", "translation"),
    "WikiTextDataModule": ("step_lightning.data.wikitext", "nlp"),
}

__all__ = [
    "CIFARDataModule",
    "DigitsDataModule",
    "GLUEDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "WMTDataModule",
    "WikiTextDataModule",
]


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _FAMILIES, name, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
