"""``--precision`` in the trainer: bf16 autocast, fp16 with a GradScaler (CPU: torch's CPU scaler)."""

import json

import pytest
import torch
from click.testing import CliRunner

from creditflow.cli import main
from creditflow.train.checkpoint import load_checkpoint
from creditflow.train.precision import Precision

TINY = ["--model", "mlp:784-32-10", "--epochs", "2", "--max-steps-per-epoch", "5", "--batch-size", "32",
        "--device", "cpu", "--quiet", "--lr", "1e-3"]


def train(*args):
    return CliRunner().invoke(main, ["train", *args, *TINY])


@pytest.mark.parametrize("rule", ["dfa", "fa", "las", "kp"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_run_trains_in_lower_precision_and_resumes(tmp_path, rule, precision):
    out = tmp_path / "run"
    result = train("--rule", rule, "--precision", precision, "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["train_loss"] == r["train_loss"] for r in rows)  # finite
    ckpt = load_checkpoint(out / "checkpoint.pt")
    scaler = ckpt["processes"][0]["scaler"]
    assert (scaler is not None) == (precision == "fp16")
    # the same run in fp32 differs (autocast did act), and an fp16 run keeps its scaler state
    ref = tmp_path / "fp32"
    assert train("--rule", rule, "--precision", "fp32", "--out", str(ref)).exit_code == 0
    assert json.loads((ref / "metrics.jsonl").read_text().splitlines()[0])["train_loss"] != rows[0]["train_loss"]


def test_the_pipeline_refuses_lower_precision_in_one_line():
    result = CliRunner().invoke(main, ["train", "--rule", "dfa", "--parallel", "pipeline", "--precision", "bf16",
                                       *TINY])
    assert result.exit_code == 2 and "runs with --parallel none or ddp" in result.output


def test_fp16_scale_is_a_tensor_and_a_skipped_step_leaves_the_weights():
    p = Precision("fp16", torch.device("cpu"))
    s = p.scale()
    assert isinstance(s, torch.Tensor) and s.item() == 65536.0
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    w.grad = torch.tensor([float("inf"), 1.0, 1.0])
    p.step(opt)  # inf gradient: the scaler skips the step and halves the scale
    assert torch.equal(w.detach(), torch.ones(3)) and p.scale().item() == 32768.0
