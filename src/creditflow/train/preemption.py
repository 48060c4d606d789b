"""Preemption: SIGTERM or SIGINT stops a run at the next step boundary, with a checkpoint of that point.

A cluster scheduler preempts a job with SIGTERM (and SIGKILL after a grace period); Ctrl-C sends
SIGINT. While a run trains, :func:`stop_signals` replaces both handlers by one that only records the
signal. The epoch loop looks at the record after every step; the trainer then writes a checkpoint of
that step (mid-epoch: the epoch's data order, the generator, the position and the epoch's running
sums, so the resumed run gives the numbers of an uninterrupted one) and raises :class:`Preempted`.
The command line prints its one line (the folder and how to resume) and exits ``128 + signal``
(143 for SIGTERM, 130 for SIGINT), the status a shell gives a process ended by that signal.

A second signal while the first is being served takes the default action at once (a user who
presses Ctrl-C twice gets out; the last checkpoint written stays). In a worker of the multi-process
launcher a repeated signal is only recorded (:data:`SECOND_SIGNAL_ENDS` false there): Ctrl-C reaches
the workers from the terminal and from the launcher, which forwards every signal it gets and is the
one that ends the workers on a second signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped at a signal after writing a checkpoint of the step it had reached."""

    def __reduce__(self):  # a worker's Preempted travels to the launcher as itself
        return type(self), (self.signum, self.folder, self.epoch, self.step, self.steps)

    def __init__(self, signum: int, folder, epoch: int, step: int, steps: int):
        self.signum, self.folder, self.epoch, self.step, self.steps = signum, folder, epoch, step, steps
        name = signal.Signals(signum).name
        where = ("its start" if epoch == 0 else f"the end of epoch {epoch}" if step == steps
                 else f"epoch {epoch} step {step}/{steps}")
        super().__init__(f"stopped by {name} at {where}; checkpoint in {folder}: run the same command again to "
                         "resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The signal received while training (None: none). One per process: signals reach the main thread."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


STOP = StopRequest()
#: whether a second signal ends this process at once (False in the launcher's workers, see above)
SECOND_SIGNAL_ENDS = True
#: whether a request outlives the run it stopped (:func:`serve_as_worker`: the next run there stops too)
_KEEP_REQUEST = False
_serving = False  # a stop_signals block holds the handlers now (the main thread's)


@contextlib.contextmanager
def _handling(handler) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT inside the block, the handlers before it back after it."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT only request a stop inside the block (the handlers before it come back after).

    Outside the main thread (where Python cannot install handlers) nothing is installed and no stop
    is ever requested: the run ends as the signal's default action ends it.
    """
    global _serving
    if threading.current_thread() is not threading.main_thread() or _serving:
        yield STOP  # nested (compare's runs inside compare's block): the outer block serves the signal
        return

    def request(signum, frame):
        if STOP.requested and SECOND_SIGNAL_ENDS:  # the second signal: out now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        STOP.signum = STOP.signum or signum

    _serving = True
    try:
        with _handling(request):
            yield STOP
    finally:
        if not _KEEP_REQUEST:
            STOP.signum = None
        _serving = False


def serve_as_worker() -> None:
    """For a worker process that runs one run after another for a parent that forwards signals
    (``reproduce --jobs``): a repeated signal does not end it (Ctrl-C comes from the terminal and from
    the parent), and a request outlives the run it stopped, so the worker's next run stops at its
    start (:func:`check_not_stopped`). Outside a run the signal's default action ends the worker."""
    global SECOND_SIGNAL_ENDS, _KEEP_REQUEST
    SECOND_SIGNAL_ENDS, _KEEP_REQUEST = False, True


def check_not_stopped(folder) -> None:
    """:class:`Preempted` (the run at ``folder`` never started) if a stop was requested already."""
    if STOP.requested:
        raise Preempted(STOP.signum, folder, 0, 0, 0)


@contextlib.contextmanager
def forward_signals(workers: Callable[[], Iterable[int]]) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT to this process go on to every pid ``workers()`` names.

    For a parent whose children train (the launcher's ranks and stages, ``reproduce --jobs``): a
    child that is training stops at a step boundary with a checkpoint and reports :class:`Preempted`,
    which ends the parent's wait; a child still starting up takes the signal's default action. A
    second signal here kills the children at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for pid in workers():
            try:
                os.kill(pid, signal.SIGKILL if len(received) > 1 else signum)
            except ProcessLookupError:
                pass

    with _handling(forward):
        yield


__all__ = ["Preempted", "check_not_stopped", "forward_signals", "serve_as_worker", "STOP", "STOP_SIGNALS", "StopRequest", "stop_signals"]
