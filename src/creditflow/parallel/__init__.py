"""Parallel training: the shared launcher, data parallelism (``ddp``) and the pipeline trainer."""

from .launch import WorkerFailed, launch
from .pipeline import train_pipeline  # noqa: F401  (pipeline.fit: a rule object and a list of batches)

__all__ = ["WorkerFailed", "launch"]
