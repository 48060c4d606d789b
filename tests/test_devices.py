"""One device choice for every command (creditflow.devices)."""

import pytest
import torch
from click.testing import CliRunner

from creditflow.cli import main
from creditflow.devices import check_device_name, resolve_device


def test_names_and_what_they_resolve_to():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ValueError, match=r"unknown device .*; use auto, cpu, cuda or cuda:N"):
            check_device_name(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line_everywhere():
    with pytest.raises(ValueError, match=r"device 'cuda:1' requested but CUDA is not available here"):
        resolve_device("cuda:1")
    for args in (["memory", "--device", "cuda", "--model", "mlp:784-8-10", "--rules", "bp"],
                 ["train", "--device", "cuda", "--epochs", "1"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and "CUDA is not available" in result.output, result.output
        assert "internal error" not in result.output and "Traceback" not in result.output


def test_train_refuses_a_bad_device_name_as_bad_input():
    result = CliRunner().invoke(main, ["train", "--device", "gpu"])
    assert result.exit_code == 2 and "use auto, cpu, cuda or cuda:N" in result.output
