"""Training: validated configs, the resumable loop, and rule comparisons."""

from .compare import compare
from .config import CompareConfig, ConfigError, RunConfig
from .loop import NonFiniteLoss, train

__all__ = ["CompareConfig", "ConfigError", "NonFiniteLoss", "RunConfig", "compare", "train"]
