"""One error path: every expected failure is one line on stderr and a non-zero exit; --debug shows the traceback."""

import errno
import os

import pytest
from click.testing import CliRunner

from creditflow.cli import main
from creditflow.train import Callback

TINY = ["--model", "mlp:784-32-10", "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "32",
        "--device", "cpu", "--quiet"]


def fails_in_one_line(*args, code=None, env=None):
    result = CliRunner().invoke(main, list(args), env=env)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and (code is None or result.exit_code == code), result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--out", str(out), *TINY]).exit_code == 0
    return out


def test_bad_config_files(tmp_path):
    assert "config file not found" in fails_in_one_line("train", "--config", str(tmp_path / "no.yaml"), code=2)
    (tmp_path / "bad.yaml").write_text("lr: [0.1\n")
    assert "is not valid YAML" in fails_in_one_line("train", "--config", str(tmp_path / "bad.yaml"), code=2)
    (tmp_path / "list.yaml").write_text("- lr\n")
    assert "must hold a mapping" in fails_in_one_line("train", "--config", str(tmp_path / "list.yaml"), code=2)
    (tmp_path / "key.yaml").write_text("epochs: many\n")
    assert "epochs" in fails_in_one_line("train", "--config", str(tmp_path / "key.yaml"), code=2)


def test_bad_flag_values_name_what_is_allowed(tmp_path):
    line = fails_in_one_line("train", "--optimizer", "rmsprop", code=2)
    assert "'adam'" in line and "'sgd'" in line
    assert "Did you mean '--lr'" in fails_in_one_line("train", "--lrr", "0.1", code=2)
    line = fails_in_one_line("train", "--rule", "dfa", "--rule-option", "feedback_scale=abc",
                             "--out", str(tmp_path / "o"), *TINY)
    assert "feedback_scale must be a number (default 1.0), got 'abc'" in line
    line = fails_in_one_line("train", "--model-option", "activation=3", "--out", str(tmp_path / "o"), *TINY)
    assert "activation must be a string" in line
    assert "expected key=value" in fails_in_one_line("train", "--rule-option", "oops", code=2)


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    import creditflow.files

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(creditflow.files.os, "fsync", full)
    line = fails_in_one_line("train", "--out", str(tmp_path / "run"), *TINY)
    assert line.startswith(f"Error: cannot write {tmp_path / 'run'}/") and line.endswith("No space left on device")
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_corrupt_checkpoint_and_metrics_on_resume_name_the_file(finished):
    metrics = finished / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20] + "\n")
    line = fails_in_one_line("train", "--resume", "--out", str(finished), *TINY)
    assert f"{metrics} line 1 is not JSON" in line
    (finished / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a zip")
    assert f"cannot read checkpoint {finished / 'checkpoint.pt'}" in fails_in_one_line(
        "train", "--resume", "--out", str(finished), *TINY)


def test_nan_loss_is_one_line(tmp_path, monkeypatch):
    from creditflow.rules.base import Rule, StepResult

    real = Rule.step
    monkeypatch.setattr(Rule, "step", lambda self, x, y: StepResult(real(self, x, y).loss * float("nan"),
                                                                     real(self, x, y).logits))
    line = fails_in_one_line("train", "--out", str(tmp_path / "run"), *TINY)
    assert "training loss is nan" in line and "no checkpoint was written" in line


def test_a_dead_worker_is_one_line(tmp_path, monkeypatch):
    from creditflow.parallel import ddp
    from creditflow.parallel.launch import WorkerFailed

    def dies(*args, **kwargs):
        raise WorkerFailed("rank 1 failed: MemoryError: boom; the other ranks were stopped\n\nrank 1 traceback:\n"
                           "Traceback (most recent call last):\n  ...", rank=1)

    monkeypatch.setattr(ddp, "launch", dies)
    line = fails_in_one_line("train", "--parallel", "ddp", "--out", str(tmp_path / "run"), *TINY)
    assert line == "Error: rank 1 failed: MemoryError: boom; the other ranks were stopped"


def test_an_unexpected_error_is_one_line_that_says_how_to_see_more(tmp_path, monkeypatch):
    import creditflow.train.trainer as trainer

    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(trainer, "build_rule", bug)
    line = fails_in_one_line("train", "--out", str(tmp_path / "run"), *TINY)
    assert "internal error, KeyError" in line and "--debug" in line


@pytest.mark.parametrize("how", ["flag", "group flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    args = ["train", "--config", str(tmp_path / "no.yaml")]
    args = {"flag": [*args, "--debug"], "group flag": ["--debug", *args], "env": args}[how]
    result = CliRunner().invoke(main, args, env={"CREDITFLOW_DEBUG": "1"} if how == "env" else None)
    assert result.exit_code == 1 and type(result.exception).__name__ == "ConfigError"


def test_a_missing_data_dir_stops_the_run_naming_it(tmp_path):
    line = fails_in_one_line("train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "run"), *TINY)
    assert line.startswith(f"Error: dataset 'mnist' not in --data-dir {tmp_path / 'nowhere'}: looked in")
    assert "train-images-idx3-ubyte" in line and not (tmp_path / "run").exists()


def test_the_run_records_the_files_it_read(finished):
    import hashlib
    import json
    from pathlib import Path

    files = json.loads((finished / "summary.json").read_text())["data"]["files"]
    assert len(files) == 1 and files[0]["sha256"] == hashlib.sha256(Path(files[0]["path"]).read_bytes()).hexdigest()
    assert f"# data read: {files[0]['path']} (1 file" in (finished / "config.yaml").read_text()


@pytest.mark.parametrize("mode", [["--parallel", "ddp"], ["--parallel", "pipeline", "--rule", "dfa"]])
def test_divergence_under_ddp_and_pipeline_is_one_line(tmp_path, mode):
    line = fails_in_one_line("train", *mode, "--lr", "1e6", "--out", str(tmp_path / "run"), *TINY[:5], "3",
                             *TINY[6:])
    assert "epoch 1 step 2: training loss" in line and "no checkpoint was written" in line


class LastStep(Callback):
    """Writes the last step each process started (a module-level class: spawned stages import it)."""

    def __init__(self, folder):
        self.folder = folder

    def on_step_start(self, trainer, step):
        (self.folder / f"last-step-{os.getpid()}").write_text(str(step))


def test_a_pipeline_stage_stops_the_run_at_its_divergence_check_not_at_epoch_end(tmp_path):
    """A stage checks its own part of the loss every DIVERGENCE_CHECK_EVERY steps: a run diverging at
    step 2 of a 400-step epoch stops by step 50 or so, not at the epoch's end, with the one line."""
    from creditflow.train import Diverged, RunConfig, train
    from creditflow.train.trainer import DIVERGENCE_CHECK_EVERY

    cfg = RunConfig(parallel="pipeline", rule="dfa", lr=1e6, model="mlp:784-32-10", epochs=1, max_steps_per_epoch=400,
                    batch_size=32, device="cpu", out=str(tmp_path / "run"))
    with pytest.raises(Exception) as failure:
        train(cfg, progress=False, callbacks=[LastStep(tmp_path)])
    error = getattr(failure.value, "error", failure.value)  # the stage's own, inside WorkerFailed
    assert isinstance(error, Diverged) and str(error).startswith("epoch 1 step 2: training loss")
    last = [int(p.read_text()) for p in tmp_path.glob("last-step-*")]
    assert len(last) == 2 and max(last) < 2 * DIVERGENCE_CHECK_EVERY  # the next stage may run ahead a little


BAD_INPUTS = [  # (arguments, what the one line must say); every one exits 2
    (["train", "--model", "mlp:100-32-10", *TINY[2:]], "784"),  # does not fit the data
    (["train", "--rule", "fa", "--rule-option", "no_such=1", *TINY], "no_such"),
    (["train", "--model", "mlp:784-x-10", *TINY[2:]], "mlp"),
    (["train", "--rule", "nope", *TINY], "nope"),
    (["train", "--lr", "-1", *TINY], "lr"),
    (["compare", "--rules", "bp,nope", *TINY], "nope"),
    (["reproduce", "las-fc", "--budget", "huge", "--quiet"], "no budget 'huge'"),
    (["reproduce", "las-xx", "--quiet"], "unknown preset 'las-xx'"),
]


@pytest.mark.parametrize("args,says", BAD_INPUTS, ids=[" ".join(a[:3]) for a, _ in BAD_INPUTS])
def test_every_bad_input_is_one_line_and_exit_code_2(args, says):
    assert says in fails_in_one_line(*args, code=2)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine with CUDA runs on it")
@pytest.mark.parametrize("command", [["train", *TINY[:-3], "--quiet"], ["memory", "--model", "mlp:784-8-10"]])
def test_cuda_without_cuda_is_one_line_and_exit_code_2(command):
    assert "cuda" in fails_in_one_line(*command, "--device", "cuda", code=2).lower()


def test_a_folder_in_use_is_one_line_and_exit_code_2(tmp_path):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as another creditflow process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "is in use by another creditflow run" in fails_in_one_line("train", "--out", str(out), *TINY, code=2)
