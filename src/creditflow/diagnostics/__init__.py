"""Diagnostics: measurements of a rule beside BP (memory, gradient alignment)."""

from .alignment import Alignment, AlignmentProbe, measure, weight_angles
from .memory import MemoryReport, peak_memory, saved_tensor_bytes

__all__ = ["Alignment", "AlignmentProbe", "MemoryReport", "measure", "peak_memory", "saved_tensor_bytes",
           "weight_angles"]
