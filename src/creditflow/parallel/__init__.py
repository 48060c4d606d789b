"""Parallel training: the shared launcher and two strategies of the one trainer, data parallelism
(``ddp``) and the pipeline (``pipeline``); importing this package registers them."""

from .ddp import DataParallel, DataParallelStrategy
from .launch import WorkerFailed, launch
from .pipeline import PipelineStrategy, fit

__all__ = ["DataParallel", "DataParallelStrategy", "PipelineStrategy", "WorkerFailed", "fit", "launch"]
