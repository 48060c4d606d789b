"""creditflow: train neural networks with credit-assignment rules beyond backpropagation."""

from . import (  # noqa: F401
    data,
    diagnostics,
    models,
    parallel,  # noqa: F401  (registers the ddp and pipeline strategies of the trainer)
    rules,
)

__version__ = "0.1.0"

__all__ = ["data", "diagnostics", "models", "parallel", "rules", "__version__"]
