"""The shared launcher: results per rank, and failures that end the run fast, naming the worker."""

import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from creditflow.parallel import WorkerFailed, launch
from creditflow.parallel.launch import find_free_port, is_torchrun


# Workers are module-level functions: the "spawn" start method pickles them by name.
def sum_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world_size, "sum": t.item() * scale, "pid": os.getpid()}


def fail_or_wait(rank, world_size, pid_dir, how):
    (pid_dir / f"{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        time.sleep(0.5)  # the others are inside the collective by now
        if how == "raise":
            raise ValueError("bad batch on purpose")
        os.kill(os.getpid(), 9)
    dist.all_reduce(torch.ones(1))  # never completes: rank 1 is gone
    return rank


def hang(rank, world_size):
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: the process group's timeout fires
    else:
        time.sleep(120)


def assert_gone(pids):
    assert not multiprocessing.active_children()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_results_come_back_per_rank():
    out = launch(sum_ranks, 2, (10,), timeout_s=30)
    assert [r["rank"] for r in out] == [0, 1] and all(r["world"] == 2 for r in out)
    assert all(r["sum"] == 30.0 for r in out)
    assert_gone([r["pid"] for r in out])


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_worker_ends_the_run_naming_it(tmp_path, how):
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        launch(fail_or_wait, 2, (tmp_path, how), timeout_s=20, role="stage")
    took = time.monotonic() - start
    assert took < 20 if how == "raise" else took < 60
    err = info.value
    assert err.rank == 1 and err.role == "stage"
    if how == "raise":
        assert "stage 1 failed: ValueError: bad batch on purpose" in str(err)
        assert "fail_or_wait" in err.remote_traceback and err.exitcode is None
    else:
        assert "stage 1 was killed by signal SIGKILL" in str(err) and err.exitcode == -9
    assert_gone([int(p.read_text()) for p in tmp_path.glob("*.pid")])


@pytest.mark.slow  # ~5 s of process start-up for the process group's timeout
def test_a_worker_stuck_in_a_collective_times_out():
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="rank 0 failed"):
        launch(hang, 2, timeout_s=2)
    assert time.monotonic() - start < 30
    assert not multiprocessing.active_children()


def test_inside_torchrun_runs_this_rank_in_process(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(find_free_port()))
    assert is_torchrun()
    try:
        out = launch(sum_ranks, 1, (2,))
        assert out[0]["pid"] == os.getpid() and out[0]["sum"] == 2.0
        with pytest.raises(ValueError, match="torchrun started 1 processes but 2"):
            launch(sum_ranks, 2, (2,))
    finally:
        dist.destroy_process_group()
