"""The multi-process launcher every parallel trainer shares (DDP, pipeline).

``launch(worker, nprocs, args)`` runs ``worker(rank, world_size, *args)`` in ``nprocs`` spawned
processes, each with an initialised ``torch.distributed`` process group, and returns the per-rank
results. Under ``torchrun`` it runs this process's rank in-process instead.

Failure is never a hang: the parent watches every worker's result pipe and process sentinel at
once, so a worker that raises, or dies (SIGKILL, segfault, out of memory), is seen at once; every
other worker is then terminated and :class:`WorkerFailed` names the rank (``"stage 1"``) and the
error or exit code. The process group carries ``timeout_s`` too, so a worker waiting in a
collective on a peer that never comes raises instead of waiting for ever.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..devices import resolve_device
from ..train.preemption import forward_signals

__all__ = ["WorkerFailed", "barrier", "log_like_parent", "quiet_unless_main", "find_free_port", "is_torchrun", "launch", "resolve_backend",
           "device_kind", "warn_if_oversubscribed", "worker_device"]

#: after the first failure, how long other workers get to report theirs (to find the root cause)
_SETTLE_S = 1.0
#: how long a terminated worker gets before SIGKILL
_GRACE_S = 5.0

_HOST = "127.0.0.1"
_device: torch.device | None = None  # this worker's device, set by the launcher


class WorkerFailed(RuntimeError):
    """A worker raised or died; every other worker has been stopped.

    Attributes: ``rank``, ``role`` (e.g. ``"stage"``), ``exitcode`` (None if it raised; negative:
    killed by that signal), ``remote_traceback`` (the worker's formatted traceback, if it raised) and
    ``error`` (the worker's exception itself, where it could be pickled; else None).
    """

    def __init__(self, message: str, *, rank: int, role: str = "rank", exitcode: int | None = None,
                 remote_traceback: str | None = None, error: BaseException | None = None):
        super().__init__(message)
        self.rank, self.role, self.exitcode, self.remote_traceback = rank, role, exitcode, remote_traceback
        self.error = error


def is_torchrun() -> bool:
    """True inside a ``torchrun`` (or any env://) launch: RANK, WORLD_SIZE and MASTER_ADDR are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it), for a rendezvous on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def device_kind(device: str | torch.device) -> str:
    """``"cpu"`` or ``"cuda"``: the kind of device ``device`` resolves to (:func:`creditflow.devices.resolve_device`)."""
    return resolve_device(device).type


def resolve_backend(backend: str, device: str | torch.device, nprocs: int = 1) -> str:
    """``"auto"``: NCCL for CUDA when every process has a GPU of its own, gloo otherwise (NCCL forbids
    two ranks on one GPU: ``--parallel ddp --nproc 2`` on a one-GPU machine runs over gloo); NCCL on
    CPU is an error."""
    kind = device_kind(device)
    if backend == "auto":
        return "nccl" if kind == "cuda" and torch.cuda.device_count() >= nprocs else "gloo"
    if backend == "nccl" and kind != "cuda":
        raise ValueError("backend 'nccl' needs device 'cuda'; use backend 'gloo' (or 'auto') on CPU")
    if backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise ValueError(f"unknown backend {backend!r}; use auto, gloo or nccl")
    return backend


def warn_if_oversubscribed(nprocs: int, flag: str, device: str) -> None:
    """Warn (once per launch, not refuse) when ``nprocs`` CPU processes outnumber the cores."""
    cores = os.cpu_count() or 1
    if device_kind(device) == "cpu" and nprocs > cores:
        import logging

        logging.getLogger(__name__).warning("%s %d on %d CPU cores: the processes will share cores (slower than "
                                            "fewer)", flag, nprocs, cores)


def worker_device() -> torch.device:
    """The device of this worker: ``cuda:<local rank % GPUs>`` under a CUDA launch, else ``cpu``."""
    return _device if _device is not None else torch.device("cpu")


def log_like_parent(rank: int, level: int) -> None:
    """A spawned worker logs as its parent did, rank 0 only (the others warnings and errors): one
    quiet rank, whatever the strategy. Under torchrun every rank is a CLI that set its own logging;
    :func:`quiet_unless_main` quiets the others there."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level if rank == 0 else logging.WARNING, format="%(message)s")
    quiet_unless_main(rank)


def quiet_unless_main(rank: int) -> None:
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)


def barrier() -> None:
    """A barrier that works on every backend (NCCL's needs the device; gloo's does not)."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[worker_device().index])
    else:
        dist.barrier()


def _setup(rank: int, world_size: int, backend: str, kind: str, timeout_s: float, local_rank: int,
           port: int | None = None) -> None:
    """This process's device and process group (``port``: the launcher's store; else env://)."""
    global _device
    if kind == "cuda":
        gpus = torch.cuda.device_count()
        if backend == "nccl" and local_rank >= gpus:  # wrapping around would put two NCCL ranks on one GPU
            raise ValueError(f"local rank {local_rank} has no GPU of its own ({gpus} on this node) and NCCL "
                             "forbids two ranks on one GPU; start at most one process per GPU, or use --backend gloo")
        _device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(_device)
    else:
        _device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = None if port is None else dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _entry(rank, world_size, port, backend, kind, timeout_s, threads, conn, worker, args):
    """One spawned worker: rendezvous, run, send ``("ok", result)`` or ``("error", ...)`` back."""
    os.environ.update(MASTER_ADDR=_HOST, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    if threads is not None:
        torch.set_num_threads(threads)
    from ..train import preemption

    preemption.SECOND_SIGNAL_ENDS = False  # the launcher forwards every signal it gets (forward_signals)
    _exit_with_parent()
    thread_lock_for_tqdm()
    try:
        _setup(rank, world_size, backend, kind, timeout_s, rank, port)
        # Plain pickle, not torch's ForkingPickler: that would share tensors through file descriptors
        # this process takes with it when it exits. An unpicklable result fails here, as an error.
        conn.send_bytes(pickle.dumps(("ok", worker(rank, world_size, *args))))
    except BaseException as err:  # noqa: BLE001  (the parent reports it; KeyboardInterrupt too)
        try:
            try:
                error = pickle.dumps(err)  # the exception itself, where it travels (read in the parent)
            except Exception:  # noqa: BLE001
                error = None
            conn.send_bytes(pickle.dumps(("error", f"{type(err).__name__}: {err}", traceback.format_exc(),
                                          isinstance(err, getattr(dist, "DistError", ())) or _looks_like_comm(err),
                                          error)))
            conn.close()
        finally:
            _flush()
            os._exit(1)  # no destroy_process_group: peers may be stuck in a collective with us
    conn.close()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (the result is already delivered)
        pass
    # Exit handlers and flushed output, then a quick exit: the interpreter's own teardown of torch
    # takes seconds and delivers nothing.
    atexit._run_exitfuncs()
    _flush()
    os._exit(0)


def thread_lock_for_tqdm() -> None:
    """tqdm's default lock is a multiprocessing semaphore; a worker that fails exits with ``os._exit``,
    which never unlinks it, and the resource tracker then prints a "leaked semaphore" warning on the
    user's terminal. A worker's bars are its own: a thread lock is enough."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    tqdm.set_lock(threading.RLock())


def _exit_with_parent() -> None:
    """A worker whose launching process is gone (killed) exits too, instead of waiting in a collective."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        _flush()
        os._exit(1)

    threading.Thread(target=watch, name="creditflow-parent-watch", daemon=True).start()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


def _looks_like_comm(err: BaseException) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("connection closed", "connection reset", "gloo", "nccl", "timed out",
                                   "broken pipe", "peer"))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped without a result"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code} without a result"


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5.0)


def launch(worker: Callable[..., Any], nprocs: int, args: tuple = (), *, backend: str = "auto",
           device: str = "cpu", timeout_s: float = 60.0, role: str = "rank",
           threads: int | None = None, unwrap: tuple[type[BaseException], ...] = ()) -> list:
    """Run ``worker(rank, world_size, *args)`` in ``nprocs`` processes and return their results.

    Each process has an initialised ``torch.distributed`` process group: gloo on CPU, NCCL on CUDA
    for ``backend="auto"``, one GPU per rank where there are several (:func:`worker_device` names
    it). ``worker`` and ``args`` must be picklable (a module-level function), and so must the
    results. Inside a ``torchrun`` launch (RANK/WORLD_SIZE/MASTER_ADDR set) this process's rank
    runs in-process and the result is ``[its result]``.

    If any worker raises or dies, every other one is terminated and :class:`WorkerFailed` naming
    ``f"{role} {rank}"`` is raised at once; ``timeout_s`` also bounds every collective (the process
    group's timeout) and the wait for workers to exit. ``threads``: torch threads per worker
    (default: ``OMP_NUM_THREADS`` if set, else the CPU cores shared out among the workers).
    ``unwrap``: a worker's exception of these types is raised as it is (what one process would have
    raised: a bad config, a NaN loss), not as :class:`WorkerFailed`.
    """
    try:
        return _launch(worker, nprocs, args, backend, device, timeout_s, role, threads)
    except WorkerFailed as err:
        if unwrap and isinstance(err.error, unwrap):
            raise err.error from err
        raise


def _launch(worker, nprocs, args, backend, device, timeout_s, role, threads) -> list:
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    kind = device_kind(device)
    backend = resolve_backend(backend, kind, nprocs)
    if is_torchrun():
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != nprocs:
            raise ValueError(f"torchrun started {world} processes but {nprocs} {role}s were asked for; "
                             f"use torchrun --nproc-per-node {nprocs} (or match the config)")
        if threads is not None:
            torch.set_num_threads(threads)
        _setup(rank, world, backend, kind, timeout_s, int(os.environ.get("LOCAL_RANK", rank)))
        return [worker(rank, world, *args)]
    if kind == "cuda" and backend == "nccl" and torch.cuda.device_count() < nprocs:
        # NCCL forbids two ranks on one GPU
        raise ValueError(f"{nprocs} {role}s with NCCL need {nprocs} GPUs, found {torch.cuda.device_count()}; "
                         "use fewer processes or backend='gloo'")
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // nprocs)

    ctx = mp.get_context("spawn")
    # The rendezvous store lives here, on a port the OS picks and that stays bound: no race with
    # another launch for a "free" port, and it outlives any worker.
    store = dist.TCPStore(_HOST, 0, nprocs, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    port = store.port
    procs, conns = [], {}
    try:
        for rank in range(nprocs):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_entry, name=f"creditflow-{role}-{rank}",
                            args=(rank, nprocs, port, backend, kind, timeout_s, threads, send, worker, args))
            p.start()
            send.close()  # the child holds the write end: EOF here once it is gone
            procs.append(p)
            conns[recv] = rank
        with forward_signals(lambda: [p.pid for p in procs if p.is_alive()]):
            return _collect(procs, conns, role, timeout_s)
    finally:
        _stop(procs)
        for c in conns:
            c.close()
        del store


def _collect(procs, conns, role: str, timeout_s: float) -> list:
    results: dict[int, Any] = {}
    failures: dict[int, tuple] = {}  # rank -> (kind, message, traceback, is_comm, pickled error), in arrival order
    sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
    open_conns = dict(conns)
    settle_until = None
    while len(results) + len(failures) < len(procs):
        if settle_until is not None and time.monotonic() >= settle_until:
            break
        waiting = [c for c in open_conns] + [s for s, r in sentinels.items() if r not in results and r not in failures]
        timeout = None if settle_until is None else max(0.0, settle_until - time.monotonic())
        ready = wait(waiting, timeout)
        for obj in ready:  # results first: a worker that sent one and exited is a success
            if obj in open_conns:
                rank = open_conns[obj]
                try:
                    data = obj.recv_bytes()
                except (EOFError, OSError):  # gone without a word: its sentinel says how
                    del open_conns[obj]
                    continue
                del open_conns[obj]
                try:
                    msg = pickle.loads(data)
                except Exception as err:  # noqa: BLE001  (e.g. a class this process cannot import)
                    msg = ("error", f"its result could not be read here: {type(err).__name__}: {err}", "", False, None)
                if msg[0] == "ok":
                    results[rank] = msg[1]
                else:
                    failures.setdefault(rank, ("error", *msg[1:]))
        for obj in ready:
            if obj in sentinels:
                rank = sentinels[obj]
                if rank in results or rank in failures:
                    continue
                conn = next((c for c, r in open_conns.items() if r == rank), None)
                if conn is not None and conn.poll():
                    continue  # its message is still to be read: the next round reads it
                procs[rank].join(1.0)
                failures[rank] = ("died", _describe_exit(procs[rank].exitcode), None, False, None)
        if failures and settle_until is None:
            settle_until = time.monotonic() + _SETTLE_S  # let the others report: which one was first?
    if failures:
        raise _failure(failures, role, procs)
    # every result is in: the workers only tear down now
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    return [results[r] for r in range(len(procs))]


def _failure(failures: dict[int, tuple], role: str, procs) -> WorkerFailed:
    # The root cause: the first failure seen, but an error of its own (or a death) before a
    # communication error (a peer that lost its partner). ``failures`` keeps arrival order.
    order = {rank: i for i, rank in enumerate(failures)}
    rank = min(failures, key=lambda r: (failures[r][3], order[r]))
    kind, message, tb, _, error = failures[rank]
    try:
        error = pickle.loads(error) if error is not None else None
    except Exception:  # noqa: BLE001  (a class the parent cannot import: the message still says it)
        error = None
    others = sorted(set(failures) - {rank})
    also = f" (also failed: {', '.join(f'{role} {r}' for r in others)})" if others else ""
    if kind == "died":
        text = f"{role} {rank} {message}{also}; the other {role}s were stopped"
        return WorkerFailed(text, rank=rank, role=role, exitcode=procs[rank].exitcode)
    text = f"{role} {rank} failed: {message}{also}; the other {role}s were stopped\n\n{role} {rank} traceback:\n{tb}"
    return WorkerFailed(text, rank=rank, role=role, exitcode=None, remote_traceback=tb, error=error)
