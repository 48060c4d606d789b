"""Training: validated configs and the one trainer (strategies and callbacks)."""

from .config import CompareConfig, ConfigError, RunConfig
from .trainer import Callback, Diverged, NonFiniteLoss, Strategy, Trainer, train

__all__ = ["Callback", "CompareConfig", "ConfigError", "Diverged", "NonFiniteLoss", "RunConfig", "Strategy", "Trainer", "train"]
