"""Checkpoints and messages between ranks load tensors and plain data only: a pickle cannot run code."""

import os
import pickle

import pytest
import torch
from click.testing import CliRunner

from creditflow.cli import main
from creditflow.parallel.messages import pack, unpack
from creditflow.train import RunConfig, train
from creditflow.train.checkpoint import CheckpointError, load_checkpoint

TINY = ["--model", "mlp:784-32-10", "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "32",
        "--device", "cpu", "--quiet"]


class Payload:
    """What an attacker puts in a shared run folder: unpickling it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def plant(run, marker):
    """Replace ``run``'s checkpoint by one whose pickle would create ``marker``."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["rule"] = {"weight": Payload(marker)}
    torch.save(state, run / "checkpoint.pt")


@pytest.fixture
def run(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", "--out", str(out), *TINY]).exit_code == 0
    return out


def test_everything_the_trainer_saves_loads_with_weights_only(run, tmp_path):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["processes"][0]["cuda_rng"] is None
    # optimizer, scheduler and the pipeline's plan too
    train(RunConfig(model="mlp:784-32-10", rule="dfa", epochs=1, max_steps_per_epoch=2, device="cpu",
                    schedule="cosine", out=str(tmp_path / "cos")), progress=False)
    assert load_checkpoint(tmp_path / "cos" / "checkpoint.pt")["processes"][0]["scheduler"]["T_max"] == 1


@pytest.mark.parametrize("command", [["train", "--resume"], ["analyze"]])
def test_a_malicious_checkpoint_is_refused_in_one_line_and_runs_nothing(run, tmp_path, command):
    marker = tmp_path / "pwned"
    plant(run, marker)
    if command[0] == "train":  # unfinished (no summary): resuming must read the checkpoint
        (run / "summary.json").unlink()
    args = [*command, "--out", str(run), *TINY] if command[0] == "train" else [*command, str(run), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == [
        f"Error: refusing to load checkpoint {run / 'checkpoint.pt'}: it holds more than tensors and plain data "
        "(Trying to load unsupported GLOBAL posix.mkdir whose module posix is blocked.); creditflow never writes "
        "such a file"]
    assert not marker.exists()


def test_a_torn_checkpoint_names_the_file(run):
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {run / 'checkpoint.pt'}"):
        load_checkpoint(run / "checkpoint.pt")


def test_messages_between_ranks_refuse_objects(tmp_path):
    plain = {"state": {"w": torch.ones(2)}, "plan": [[0, 2], [2, 3]], "stats": (1.5, None, "x")}
    back = unpack(pack(plain))
    assert torch.equal(back["state"]["w"], torch.ones(2)) and back["plan"] == plain["plan"]
    with pytest.raises(pickle.UnpicklingError):
        unpack(pack({"state": Payload(tmp_path / "pwned")}))
    assert not (tmp_path / "pwned").exists()
