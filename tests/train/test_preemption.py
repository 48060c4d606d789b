"""SIGTERM/SIGINT stop a run at a step boundary with a checkpoint of that point; the same command
resumes it, and the resumed run's numbers equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from creditflow.train import Callback, RunConfig, train
from creditflow.train.preemption import Preempted

# 2 epochs of 6 steps; flips draw from the run's generator, wm's mirror from the global RNG
SMALL = dict(model="mlp:784-32-10", epochs=2, max_steps_per_epoch=6, batch_size=32, device="cpu", lr=1e-3,
             augment="flip,crop")


class SignalAt(Callback):
    """Sends this process ``signum`` before global step ``step`` (as a scheduler would, mid-step)."""

    def __init__(self, step, signum=signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_step_start(self, trainer, step):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def rows(folder):
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def same_numbers(a, b):
    keys = ("train_loss", "train_acc", "val_acc", "test_acc")
    return [[r[k] for k in keys] for r in rows(a)] == [[r[k] for k in keys] for r in rows(b)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = {}
    for rule in ("dfa", "wm"):
        folder = tmp_path_factory.mktemp("straight") / rule
        train(RunConfig(**SMALL, rule=rule, out=str(folder)), progress=False)
        out[rule] = folder
    return out


@pytest.mark.parametrize("rule", ["dfa", "wm"])
@pytest.mark.parametrize("step", [1, 5, 8])  # mid-epoch, the epoch's last step, inside epoch 2
def test_a_signal_stops_at_the_step_and_the_same_call_resumes_to_the_same_numbers(tmp_path, straight, rule, step):
    cfg = RunConfig(**SMALL, rule=rule, out=str(tmp_path / "run"))
    with pytest.raises(Preempted) as stopped:
        train(cfg, progress=False, callbacks=[SignalAt(step)])
    done = step + 1  # the step in progress when the signal came is finished first
    epoch, within = divmod(done, 6)
    where = f"the end of epoch {epoch}" if within == 0 else f"epoch {epoch + 1} step {within}/6"
    assert f"stopped by SIGTERM at {where}; checkpoint in {tmp_path / 'run'}" in str(stopped.value)
    assert stopped.value.exit_code == 143
    assert len(rows(tmp_path / "run")) == epoch  # only whole epochs have a metrics row
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
    train(cfg, progress=False)  # the same call again: resumes where the signal stopped it
    assert same_numbers(tmp_path / "run", straight[rule])


def test_sigint_is_a_stop_too_with_exit_code_130(tmp_path):
    with pytest.raises(Preempted) as stopped:
        train(RunConfig(**SMALL, rule="bp", out=str(tmp_path)), progress=False,
              callbacks=[SignalAt(2, signal.SIGINT)])
    assert stopped.value.exit_code == 130 and "stopped by SIGINT at epoch 1 step 3/6" in str(stopped.value)


def test_restart_starts_a_cut_run_over(tmp_path, straight):
    cfg = RunConfig(**SMALL, rule="dfa", out=str(tmp_path))
    with pytest.raises(Preempted):
        train(cfg, progress=False, callbacks=[SignalAt(3)])
    train(cfg, progress=False, restart=True)
    assert same_numbers(tmp_path, straight["dfa"])


CLI = [sys.executable, "-m", "creditflow.cli", "train", "--model", "mlp:784-64-10", "--epochs", "2",
       "--max-steps-per-epoch", "100", "--batch-size", "16", "--device", "cpu", "--augment", "flip"]


@pytest.mark.slow  # processes from outside, as a scheduler: .ci/run's preemption stage
def test_sigterm_from_outside_prints_one_line_exits_143_and_the_same_command_resumes(tmp_path):
    """As a scheduler preempts a job: SIGTERM from another process, mid-epoch, then the job requeued."""
    straight_out, out = tmp_path / "straight", tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*CLI, "--out", str(straight_out), "--quiet"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*CLI, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:  # inside epoch 2 by then
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("stopped by SIGTERM at epoch 2 step ", "stopped by SIGTERM at the end of epoch 1"))
    assert "run the same command again" in last
    again = subprocess.run([*CLI, "--out", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "holds an unfinished run of this config: resuming it (--restart starts it over)" in again.stderr
    assert same_numbers(out, straight_out)
    finished = subprocess.run([*CLI, "--out", str(out)], env=env, capture_output=True, text=True)
    assert finished.returncode == 0 and "holds a finished run (2 epochs): read back" in finished.stderr


STRATEGY_FLAGS = {
    "ddp": ["--rule", "bp", "--parallel", "ddp", "--nproc", "2"],
    "pipeline": ["--rule", "dfa", "--model", "mlp:784-64-32-10", "--parallel", "pipeline", "--stages", "2"],
}


@pytest.mark.slow  # processes from outside, as a scheduler: .ci/run's preemption stage
@pytest.mark.parametrize("strategy", sorted(STRATEGY_FLAGS))
def test_every_process_stops_after_the_same_step_and_the_requeued_command_resumes(tmp_path, strategy):
    """SIGTERM to the launcher goes on to every rank or stage; DDP's ranks agree every 10 steps,
    a pipeline's stages stop after the micro-batch whose header stage 0 marked last (their queues
    flushed); rank 0 writes the cut, the launch exits 143, and the same command resumes to the
    numbers of an uninterrupted run of that strategy."""
    cmd = [*CLI[:-4], "--max-steps-per-epoch", "80", *STRATEGY_FLAGS[strategy],
           "--device", "cpu", "--augment", "flip"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight_out, out = tmp_path / "straight", tmp_path / "cut"
    subprocess.run([*cmd, "--out", str(straight_out), "--quiet"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]  # mid-epoch 2, or at epoch 1's end if it came while evaluating
    assert last.startswith(("stopped by SIGTERM at epoch 2 step ", "stopped by SIGTERM at the end of epoch 1")), last
    again = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert same_numbers(out, straight_out)


def descendants(pid):
    """Every process whose parent chain reaches ``pid`` now (read from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def alive(pids):
    out = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(p)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("delay", [0.3, 2.0, 6.0])
def test_no_worker_outlives_a_launch_stopped_at_any_point_of_its_start(tmp_path, delay):
    """SIGTERM to a DDP launch while it imports, spawns, rendezvouses, loads data or trains."""
    cmd = [*CLI, "--epochs", "10", "--max-steps-per-epoch", "1000",  # still training when the signal comes
           "--parallel", "ddp", "--nproc", "2", "--out", str(tmp_path / "run"), "--quiet"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen, deadline = set(), time.time() + delay
    while time.time() < deadline:
        seen |= descendants(proc.pid)
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    deadline = time.time() + 15
    while alive(seen) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(seen), f"after SIGTERM at {delay}s: {sorted(alive(seen))} still running"
    assert proc.returncode != 0 and "leaked semaphore" not in err, err


REPRODUCE_PRESET = """
name: tiny-long
title: "A tiny table, long enough to be preempted"
paper: "nobody 2024"
rules: [bp, dfa]
cells:
  - {id: mini, dataset: fashion-mnist-mini, model: "mlp:784-32-10", paper: {bp: 0.8, dfa: 0.7}}
budgets:
  full: {seeds: 1, epochs: 1}
  quick: {seeds: 2, epochs: 2, max_steps_per_epoch: 80, batch_size: 16, lr: 0.001, jobs: 2, test_every: best}
"""


@pytest.mark.slow  # processes from outside, as a scheduler: .ci/run's preemption stage
def test_reproduce_side_by_side_stops_cleanly_and_the_same_command_finishes_it(tmp_path):
    """SIGTERM to `reproduce --jobs 2`: each worker cuts its run with a checkpoint, queued runs do not
    start, the parent exits 143 with one line and no warning, no worker survives; the same command
    then gives the numbers of an uninterrupted preset."""
    preset = tmp_path / "tiny-long.yaml"
    preset.write_text(REPRODUCE_PRESET)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "creditflow.cli", "reproduce", str(preset), "--device", "cpu", "--quiet"]
    subprocess.run([*cmd, "--out", str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    out = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen, deadline = set(), time.time() + 120
    while not list(out.glob("mini/*/seed*/metrics.jsonl")) and time.time() < deadline:
        seen |= descendants(proc.pid)
        time.sleep(0.05)
    seen |= descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("Error: stopped by SIGTERM") or \
        err.strip().splitlines()[-1].startswith("stopped by SIGTERM"), err
    assert "leaked" not in err and "Traceback" not in err, err
    time.sleep(1)
    assert not alive(seen - {proc.pid})
    again = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for rule in ("bp", "dfa"):
        for seed in (0, 1):
            assert same_numbers(out / "mini" / rule / f"seed{seed}", tmp_path / "straight" / "mini" / rule / f"seed{seed}")


@pytest.mark.parametrize("schedule", ["sync"])
def test_a_pipeline_cut_mid_epoch_resumes_to_the_same_numbers(tmp_path, schedule):
    """Deterministic: every stage sends itself SIGTERM before global step 8 (inside epoch 2); stage 0
    marks micro-batch 8 the last, every stage stops after it, and the resumed run equals a straight one."""
    base = dict(SMALL, rule="dfa", model="mlp:784-32-16-10", parallel="pipeline", stages=2, pipeline_schedule=schedule)
    straight_out = tmp_path / "straight"
    train(RunConfig(**base, out=str(straight_out)), progress=False)
    cfg = RunConfig(**base, out=str(tmp_path / "cut"))
    with pytest.raises(Preempted) as stopped:
        train(cfg, progress=False, callbacks=[SignalAt(8)])
    assert "at epoch 2 step 3/6" in str(stopped.value)
    train(cfg, progress=False)
    assert same_numbers(tmp_path / "cut", straight_out)
