"""Diagnostics: measurements of a rule beside BP (memory now; alignment to come)."""

from .memory import MemoryReport, peak_memory, saved_tensor_bytes

__all__ = ["MemoryReport", "peak_memory", "saved_tensor_bytes"]
