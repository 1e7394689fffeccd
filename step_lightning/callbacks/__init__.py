"""Recipe callbacks (one recipe per file on a shared base), monitoring, and ``last.ckpt`` upkeep."""

from step_lightning.callbacks.asp import ASPCallback
from step_lightning.callbacks.base import NMSparsityCallback
from step_lightning.callbacks.checkpoint import LastCheckpoint
from step_lightning.callbacks.predictions import PredictionTable, PredictionWriter
from step_lightning.callbacks.srste import SRSTECallback
from step_lightning.callbacks.step import STEPCallback
from step_lightning.callbacks.summary import SparsitySummary

__all__ = ["ASPCallback", "LastCheckpoint", "NMSparsityCallback", "PredictionTable", "PredictionWriter",
           "SRSTECallback", "STEPCallback", "SparsitySummary"]
