"""creditflow: train neural networks with credit-assignment rules beyond backpropagation."""

from . import data, diagnostics, models, rules  # noqa: F401

__version__ = "0.1.0"

__all__ = ["data", "diagnostics", "models", "rules", "__version__"]
