"""LightningDataModules. Each works offline from local data; downloads happen only in ``prepare_data``."""

from step_lightning.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
