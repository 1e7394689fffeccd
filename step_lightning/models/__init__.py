"""LightningModules per task family; plain ``nn.Module`` backbones live in ``components``."""

from step_lightning.models.causal_lm import CausalLM
from step_lightning.models.image_classifier import ImageClassifier
from step_lightning.models.sequence_classifier import SequenceClassifier
from step_lightning.models.translation import TranslationModule

__all__ = ["CausalLM", "ImageClassifier", "SequenceClassifier", "TranslationModule"]
