"""LightningModules per task family; plain ``nn.Module`` backbones live in ``components``."""

from step_lightning.models.image_classifier import ImageClassifier

__all__ = ["ImageClassifier"]
