"""LightningModules per task family; plain ``nn.Module`` backbones live in ``components``.

Each family's module is imported on first use of its name (:func:`step_lightning.extras.lazy_attribute`), so
``from step_lightning.models import SequenceClassifier`` works with the ``nlp`` extra alone, without
torchvision or fairseq2, and a jsonargparse ``class_path: step_lightning.models.ImageClassifier`` resolves
the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from step_lightning.extras import lazy_attribute

if TYPE_CHECKING:
    from step_lightning.models.causal_lm import CausalLM
    from step_lightning.models.image_classifier import ImageClassifier
    from step_lightning.models.sequence_classifier import SequenceClassifier
    from step_lightning.models.translation import TranslationModule

# public name -> (module, the extra whose libraries it needs)
_FAMILIES = {
    "CausalLM": ("step_lightning.models.causal_lm", "nlp"),
    "ImageClassifier": ("step_lightning.models.image_classifier", "vision"),
    "SequenceClassifier": ("step_lightning.models.sequence_classifier", "nlp"),
    "TranslationModule": ("step_lightning.models.translation", "translation"),
}

__all__ = ["CausalLM", "ImageClassifier", "SequenceClassifier", "TranslationModule"]


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _FAMILIES, name, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
