"""The pipeline trainer: 2 stages on CPU (gloo), tiny models.

Each multi-process test costs one launch (two spawned interpreters, a few seconds); the checks
share launches where they can: one uninterrupted sync run is the reference both for the
single-process trainer and for the killed-and-resumed run.
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import time

import pytest
import torch

import creditflow as cf
from creditflow.parallel import WorkerFailed
from creditflow.parallel.pipeline import fit
from creditflow.parallel.stages import Stage, make_plan, partition
from creditflow.train import Callback, train
from creditflow.train.checkpoint import load_checkpoint
from creditflow.train.config import RunConfig
from creditflow.train.metrics import read_jsonl

STEPS = 6  # per epoch


class KillStage1InEpoch2(Callback):
    """Runs in every stage before each step: SIGKILL stage 1 at its 3rd step of epoch 2."""

    def on_step_start(self, trainer, step):
        if trainer.strategy.rank == 1 and step == STEPS + 2:
            os.kill(os.getpid(), signal.SIGKILL)


def batches(n: int, d: int = 20, classes: int = 5, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, d, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, n=name: f"{n}: {m}")


# --- in-process pieces ---------------------------------------------------------------------------

def test_partition_is_contiguous_and_minimises_the_slowest_stage():
    assert partition([1, 1, 1, 5], 2) == [range(0, 3), range(3, 4)]
    assert partition([3, 1, 1, 1, 1, 1], 3) == [range(0, 1), range(1, 3), range(3, 6)]
    assert partition([1, 2], 1) == [range(0, 2)]
    with pytest.raises(ValueError, match="cannot split 2 pipeline units into 3 stages"):
        partition([1, 2], 3)


@pytest.mark.parametrize("balance", ["params", "time"])
def test_plans_cover_every_unit_once_with_the_top_on_the_last_stage(balance):
    rule = cf.rules.build("las", cf.models.build("mlp:20-16-16-16-16-5"), 5)  # 3 hidden blocks + top
    plan = make_plan(rule, 3, balance, batch_size=8)
    assert [i for r in plan.stages for i in r] == [0, 1, 2, 3] and all(len(r) for r in plan.stages)
    assert plan.inputs[0] == [(20,)] and all(shape == [(16,)] for shape in plan.inputs[1:])
    assert plan.describe(rule)[-1].startswith("stage 2:") and "top" in plan.describe(rule)[-1]


def test_a_rule_with_backward_locking_is_refused():
    rule = cf.rules.build("bp", cf.models.build("mlp:20-16-5"), 5)
    with pytest.raises(ValueError, match="backward-locked.*ddp"):
        make_plan(rule, 2)


# --- two processes -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 2-stage sync DFA run on fashion-mnist-mini (2 epochs x 6 steps)."""
    root = tmp_path_factory.mktemp("pipeline")
    cfg = RunConfig(rule="dfa", model="mlp:784-64-32-10", parallel="pipeline", stages=2, pipeline_schedule="sync",
                    epochs=2, batch_size=32, max_steps_per_epoch=STEPS, lr=1e-3, device="cpu",
                    out=str(root / "whole"), eval_batch_size=500)
    summary = train(cfg, progress=False)
    return root, cfg, summary


def test_sync_pipeline_equals_the_single_process_trainer(runs):
    root, cfg, summary = runs
    single = cfg.model_copy(update={"parallel": "none", "out": str(root / "single")})
    reference = train(single, progress=False)
    assert_same_state(load_checkpoint(root / "whole" / "checkpoint.pt")["rule"],
                      load_checkpoint(root / "single" / "checkpoint.pt")["rule"])
    assert summary["test_acc"] == pytest.approx(reference["test_acc"])
    rows, ref_rows = read_jsonl(root / "whole" / "metrics.jsonl"), read_jsonl(root / "single" / "metrics.jsonl")
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert row["train_acc"] == pytest.approx(ref["train_acc"])


def test_killed_stage_stops_the_run_and_resume_equals_the_uninterrupted_run(runs):
    root, cfg, _ = runs
    cut = cfg.model_copy(update={"out": str(root / "cut")})
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"stage 1 was killed by signal SIGKILL") as err:
        train(cut, progress=False, callbacks=[KillStage1InEpoch2()])
    assert time.monotonic() - start < 60
    assert err.value.role == "stage" and err.value.rank == 1
    assert load_checkpoint(root / "cut" / "checkpoint.pt")["epoch"] == 1  # the epoch-1 checkpoint, whole
    assert len(read_jsonl(root / "cut" / "metrics.jsonl")) == 1
    train(cut, resume=True, progress=False)
    assert_same_state(load_checkpoint(root / "cut" / "checkpoint.pt")["rule"],
                      load_checkpoint(root / "whole" / "checkpoint.pt")["rule"])
    assert len(read_jsonl(root / "cut" / "metrics.jsonl")) == 2


def simulate_async(rule, data, S, make_optimizer):
    """The documented async schedule in one process: stage s applies e_{k-d}, d = S-1-s, after forwarding k."""
    plan = make_plan(rule, S)
    stages = [Stage(rule, plan, s) for s in range(S)]
    opts = [make_optimizer(st.param_groups()) for st in stages]
    queues, errors = [[] for _ in stages], {}

    def update(s, record, pairs, j):
        stages[s].update(record, pairs, errors[j])
        opts[s].step()
        opts[s].zero_grad()

    for k, (x, y) in enumerate(data):
        inputs = rule.first_inputs(x, y)
        for s, st in enumerate(stages):
            d = S - 1 - s
            record, pairs, inputs = st.forward(inputs, y, stash=d > 0)
            if st.is_last:
                errors[k] = rule.output_error(record)
                update(s, record, pairs, k)
            else:
                queues[s].append((k, record, pairs))
                if len(queues[s]) > d:
                    j, r, p = queues[s].pop(0)
                    update(s, r, p, j)
    for s, queue in enumerate(queues):  # the flush at the end of the epoch
        for j, r, p in queue:
            update(s, r, p, j)


def test_async_pipeline_trains_and_follows_the_documented_schedule():
    splits = cf.data.load("fashion-mnist-mini", val_fraction=0.0)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(splits.train), generator=g)[:40 * 64]
    data = [(splits.normalize(splits.train.images[i]), splits.train.labels[i]) for i in order.split(64)]
    torch.manual_seed(0)
    rule = cf.rules.build("dfa", cf.models.build("mlp:784-256-10"), 10)  # stage 0: the hidden block, 1: the head
    reference, before = copy.deepcopy(rule), copy.deepcopy(rule)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    out = fit(rule, data, stages=2, schedule="async", optimizer=adam)
    simulate_async(reference, data, 2, adam)
    assert_same_state(rule.state_dict(), reference.state_dict())
    losses = out["losses"]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    with torch.no_grad():
        x = splits.normalize(splits.test.images)
        accuracy = (rule.model(x).argmax(-1) == splits.test.labels).float().mean().item()
        chance_model = (before.model(x).argmax(-1) == splits.test.labels).float().mean().item()
    assert accuracy > 0.55 and accuracy > chance_model + 0.3  # chance: 0.1 (0.68 when written)


def test_resume_with_another_stage_count_continues_the_same_run(runs):
    """The checkpoint holds the whole rule and each tensor's optimizer state by name: epoch 2 on 3
    stages continues the 2-stage run (sync: the same arithmetic as one process)."""
    root, cfg, _ = runs
    first = cfg.model_copy(update={"out": str(root / "restaged")})
    with pytest.raises(WorkerFailed):
        train(first, progress=False, callbacks=[KillStage1InEpoch2()])
    summary = train(first.model_copy(update={"stages": 3}), resume=True, progress=False)
    assert summary["pipeline"]["stages"] == 3 and len(summary["pipeline"]["plan"]) == 3
    assert_same_state(load_checkpoint(root / "restaged" / "checkpoint.pt")["rule"],
                      load_checkpoint(root / "whole" / "checkpoint.pt")["rule"])


@pytest.mark.parametrize("flag", ["--stages", "--nproc"])
def test_more_processes_than_cores_warn_once_and_still_run(tmp_path, monkeypatch, caplog, flag):
    import logging
    import sys

    from creditflow.parallel import ddp, pipeline

    launcher = sys.modules["creditflow.parallel.launch"]  # the package exports the function of that name
    from creditflow.train import RunConfig, train

    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 1)
    started = []
    module = pipeline if flag == "--stages" else ddp
    monkeypatch.setattr(module, "launch", lambda *a, **k: started.append(a[1]) or [{"stub": True}])
    cfg = RunConfig(rule="dfa", model="mlp:784-32-10", device="cpu", parallel="pipeline" if flag == "--stages" else "ddp",
                    stages=2, nproc=2, out=str(tmp_path / "run"))
    with caplog.at_level(logging.WARNING):
        train(cfg, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "share cores" in r.getMessage()]
    assert warnings == [f"{flag} 2 on 1 CPU cores: the processes will share cores (slower than fewer)"]
    assert started == [2]


def test_stage_times_on_cuda_are_taken_only_when_profiling():
    """A host clock does not see queued CUDA work: unsynchronised busy/wait times would be launch
    times. The runner reports them on CUDA only with profile=True (which synchronises per reading)."""
    from types import SimpleNamespace

    from creditflow.parallel.pipeline import Runner

    def runner(device, profile):
        stage = SimpleNamespace(device=torch.device(device), waits_for_error=False, num_stages=2, index=0)
        return Runner(stage, None, "sync", None, profile=profile)

    assert runner("cpu", False).timed and runner("cuda", True).timed and not runner("cuda", False).timed


def test_every_channel_has_a_group_of_its_own():
    """NCCL matches messages between two ranks of a group in post order, whatever their tags: two
    channels on one group between the same pair could cross. Read off the transport's own layout."""
    import inspect

    from creditflow.parallel import transport

    assert set(transport.Groups._fields) == {"control", "headers", "forward", "errors", "decodes"}
    source = inspect.getsource(transport.Links)
    for channel in ("headers", "forward", "errors", "decodes"):
        assert source.count(f"group=self.groups.{channel}") == 2, channel  # its send and its receive
