"""benchmarks/step_time.py runs end to end on a tiny budget and refuses bad options."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_time.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_time_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_tiny_run_writes_json_and_markdown(bench, tmp_path):
    result = CliRunner().invoke(bench.main, [
        "--models", "mlp", "--rules", "bp,dfa", "--warmup", "0", "--rounds", "2",
        "--steps-per-round", "1", "--malloc", "default", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| `mlp:784-1024-1024-10` | dfa |" in result.output
    # --malloc default: leave this test process's allocator alone (and name the files so)
    data = json.loads((tmp_path / "step_time_cpu_default-malloc.json").read_text())
    assert (tmp_path / "step_time_cpu_default-malloc.md").read_text().startswith("# Step time (cpu)")
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    rows = {r["rule"]: r for r in data["results"]}
    assert rows["bp"]["step_vs_bp"] == 1.0 and len(rows["bp"]["step_samples_ms"]) == 2
    assert 0.99 < rows["dfa"]["saved_vs_bp"] < 1.0  # same activations less the loss graph; see test_memory
    assert rows["dfa"]["params_trained"] == rows["bp"]["params_trained"] == 1_863_690
    assert all(0 < r["fwd_bwd_ms"] <= r["step_ms"] for r in rows.values())
    assert data["machine"]["torch_threads"] >= 1 and data["settings"]["optimizer"] == "adam"
    assert data["settings"]["malloc"] == "default"


@pytest.mark.parametrize("args,message", [
    (["--rules", "bp,dfaa"], "unknown rule 'dfaa'; available: "),
    (["--rules", "bp,dfaa"], "(closest: dfa)"),
    (["--models", "resnet"], "unknown model 'resnet'; available: mlp, conv3, resnet18"),
    (["--optimizer", "lamb"], "'lamb' is not one of"),
])
def test_bad_options_name_what_is_allowed(bench, tmp_path, args, message):
    result = CliRunner().invoke(bench.main, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output
    assert not any(tmp_path.iterdir())
