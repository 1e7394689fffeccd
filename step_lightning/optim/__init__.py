"""Optimizers, the switch test of STEP, and learning-rate schedules."""

from step_lightning.optim.autoswitch import SAMPLE_KEYS, STATISTICS, AutoSwitch, Statistic
from step_lightning.optim.schedules import WarmupDecayLR
from step_lightning.optim.step_adamw import StepAdamW

__all__ = ["SAMPLE_KEYS", "STATISTICS", "AutoSwitch", "Statistic", "StepAdamW", "WarmupDecayLR"]
