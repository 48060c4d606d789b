"""Runs side by side: a list of runs in this process, or in ``jobs`` one-thread worker processes.

``reproduce`` and ``compare`` share it. On a small CPU two 1-thread runs beat one 2-thread run
(docs/reproduction/README.md has the measurement). Each run resumes if it was cut; a failure stops
every worker at once; a signal goes on to the workers, whose runs stop with a checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..train.config import RunConfig
from ..train.preemption import Preempted, check_not_stopped, forward_signals
from ..train.trainer import train

if TYPE_CHECKING:
    from .presets import Probe

log = logging.getLogger(__name__)


def run_one(cfg: RunConfig, column: str, probe: Probe | None, progress: bool) -> dict[str, Any]:
    """One run of the preset, resumed if it was cut (with the alignment probe when the preset has one)."""
    callbacks = []
    if probe is not None:
        from .align import AlignmentProbe

        callbacks.append(AlignmentProbe(column, probe.every, probe.at, cfg.out_dir()))
    return train(cfg, resume=True, progress=progress, callbacks=callbacks)


def _run_item(item: tuple[int, RunConfig, str, Probe | None]) -> tuple[int, dict[str, Any]]:
    index, cfg, column, probe = item
    check_not_stopped(cfg.out_dir())  # a signal came: the queue's later runs do not start
    return index, run_one(cfg, column, probe, False)


def run_all(order: list[tuple[str, str, RunConfig]], jobs: int, progress: bool, probe: Probe | None = None):
    """Yield ``(run, summary)`` as each run finishes: in order in this process (``jobs`` 1), else
    ``jobs`` processes side by side with one thread each (on a small CPU two 1-thread runs beat one
    2-thread run; docs/reproduction/README.md has the measurement). Each run resumes if it was cut.

    A failure in any run, or an interrupt, stops every worker at once (the runs in progress keep
    their last checkpoint) instead of letting the queue drain; workers also exit if this process dies.
    """
    if jobs == 1:
        for item in order:
            log.info("%s: %s seed %d", *item[:2], item[2].seed)
            yield item, run_one(item[2], item[1], probe, progress)
        return
    ctx = multiprocessing.get_context("spawn")
    # a process pool that sees a worker die (BrokenProcessPool) instead of waiting for its task
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_setup,
                               initargs=(os.getpid(), logging.getLogger().getEffectiveLevel()))
    try:
        futures = {pool.submit(_run_item, (i, cfg, column, probe)): i for i, (_, column, cfg) in enumerate(order)}
        # A signal goes on to the workers: each stops its run with a checkpoint and reports Preempted
        # (a worker still starting a run dies by it); the queued runs are cancelled, what finished is
        # kept, then Preempted ends the preset.
        preempted: BaseException | None = None
        with forward_signals(lambda: [p.pid for p in multiprocessing.active_children()]):
            for future in as_completed(futures):
                try:
                    index, summary = future.result()
                except (Preempted, BrokenProcessPool, CancelledError) as err:
                    if preempted is None:
                        preempted = err
                        for queued in futures:
                            queued.cancel()
                    continue
                item = order[index]
                log.info("%s: %s seed %d done, test %.4f", *item[:2], item[2].seed, summary["test_acc"])
                yield item, summary
        if preempted is not None:
            if not isinstance(preempted, Preempted):  # a worker still starting its run died by the signal
                preempted = Preempted(signal.SIGTERM, Path(order[0][2].out_dir()).parents[2], 0, 0, 0)
            pool.shutdown(wait=True, cancel_futures=True)  # the workers are idle now: they exit cleanly
            raise preempted
    except BaseException:
        for p in multiprocessing.active_children():  # at once: a run in progress keeps its last checkpoint
            p.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _worker_setup(parent: int, level: int) -> None:
    """One thread per worker (what side by side is for; children it launches inherit it), the
    parent's log level, and an exit when the parent is gone, so no orphan keeps a run folder locked."""
    import threading

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from ..train.preemption import serve_as_worker

    serve_as_worker()  # a signal stops the run in progress with a checkpoint, and the runs after it
    from ..parallel.launch import thread_lock_for_tqdm

    thread_lock_for_tqdm()  # no semaphore a killed worker would leave behind
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def watch_parent():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()


__all__ = ["run_all", "run_one"]
