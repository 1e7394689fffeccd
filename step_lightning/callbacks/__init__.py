"""Recipe callbacks: one recipe per file on a shared base."""

from step_lightning.callbacks.asp import ASPCallback
from step_lightning.callbacks.base import NMSparsityCallback
from step_lightning.callbacks.srste import SRSTECallback
from step_lightning.callbacks.step import STEPCallback
from step_lightning.callbacks.summary import SparsitySummary

__all__ = ["ASPCallback", "NMSparsityCallback", "SRSTECallback", "STEPCallback", "SparsitySummary"]
