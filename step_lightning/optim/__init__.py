"""Optimizers and the switch test of STEP."""

from step_lightning.optim.autoswitch import STATISTICS, AutoSwitch, Statistic
from step_lightning.optim.step_adamw import StepAdamW

__all__ = ["STATISTICS", "AutoSwitch", "Statistic", "StepAdamW"]
