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
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped at a signal after writing a checkpoint of the step it had reached."""

    def __reduce__(self):  # a worker's Preempted travels to the launcher as itself
        return type(self), (self.signum, self.folder, self.epoch, self.step, self.steps)

    def __init__(self, signum: int, folder, epoch: int, step: int, steps: int):
        self.signum, self.folder, self.epoch, self.step, self.steps = signum, folder, epoch, step, steps
        name = signal.Signals(signum).name
        where = f"the end of epoch {epoch}" if step == steps else f"epoch {epoch} step {step}/{steps}"
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
_installed = threading.local()  # set while a stop_signals block holds the handlers (main thread only)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT only request a stop inside the block (the handlers before it come back after).

    Outside the main thread (where Python cannot install handlers) nothing is installed and no stop
    is ever requested: the run ends as the signal's default action ends it.
    """
    if threading.current_thread() is not threading.main_thread() or getattr(_installed, "on", False):
        yield STOP  # nested (compare's runs inside compare's block): the outer block serves the signal
        return
    _installed.on = True
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def request(signum, frame):
        if STOP.requested and SECOND_SIGNAL_ENDS:  # the second signal: out now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        STOP.signum = STOP.signum or signum

    for s in STOP_SIGNALS:
        signal.signal(s, request)
    try:
        yield STOP
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        STOP.signum = None
        _installed.on = False


__all__ = ["Preempted", "STOP", "STOP_SIGNALS", "StopRequest", "stop_signals"]
