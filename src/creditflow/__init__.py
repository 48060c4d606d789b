"""creditflow: train neural networks with credit-assignment rules beyond backpropagation."""

from . import models, rules  # noqa: F401

__version__ = "0.1.0"

try:  # the data package is optional at import time only while it is being built
    from . import data  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["data", "models", "rules", "__version__"]
