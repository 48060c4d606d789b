"""Jobs built on the trainer that are not training: comparisons, paper reproductions, analyses of runs."""

from .analyze import AnalyzeOptions, analyze
from .compare import compare
from .reproduce import ReproduceOptions, reproduce

__all__ = ["AnalyzeOptions", "ReproduceOptions", "analyze", "compare", "reproduce"]
