"""Parallel training: the shared launcher, data parallelism (``ddp``) and the pipeline trainer."""

from .launch import WorkerFailed, launch

__all__ = ["WorkerFailed", "launch"]
