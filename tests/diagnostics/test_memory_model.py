import pytest
from click.testing import CliRunner

import creditflow as cf
from creditflow.cli import main
from creditflow.diagnostics.memory_model import external_memory_access, memory_table


def rule(name, spec="mlp:784-64-32-10"):
    return cf.rules.build(name, cf.models.build(spec), num_classes=10)


def test_access_model_counts_params_and_weight_gradient_inputs():
    access = external_memory_access(rule("bp"), (784,), batch_size=4)
    params = 784 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert access.params == params
    assert access.activations == 4 * (784 + 64 + 32)  # each weight layer's input, once
    assert access.total == 3 * params + 2 * access.activations  # eqs. 6.1 + 6.2
    # Shallow's frozen first block neither trains parameters nor keeps its input.
    shallow = external_memory_access(rule("shallow"), (784,), batch_size=4)
    assert shallow.params == 64 * 32 + 32 + 32 * 10 + 10 and shallow.activations == 4 * (64 + 32)


def test_memory_table_measures_and_models_every_rule():
    rows = memory_table("mlp:784-64-32-10", ["bp", "dfa", "shallow"], batch_size=8, model_options={})
    by = {r["rule"]: r for r in rows}
    assert by["bp"]["saved_vs_bp"] == 1.0 and by["bp"]["access_vs_bp"] == 1.0
    assert by["shallow"]["saved_for_backward_bytes"] < by["bp"]["saved_for_backward_bytes"]
    assert by["shallow"]["access_vs_bp"] < 1.0
    assert by["bp"]["device_peak_bytes"] is None  # CPU: no allocator peak


def test_memory_command_prints_both_tables(tmp_path):
    plot = tmp_path / "access.svg"
    result = CliRunner().invoke(main, ["memory", "--model", "mlp:784-32-10", "--rules", "bp,fa", "--batch-size", "4",
                                       "--plot", str(plot), "--out", str(tmp_path / "rows.json")])
    assert result.exit_code == 0, result.output
    assert "saved for backward MiB" in result.output and "Modelled external memory accesses" in result.output
    assert plot.read_text().lstrip().startswith("<?xml") and (tmp_path / "rows.json").exists()
    result = CliRunner().invoke(main, ["memory", "--rules", "bp,asapp"])
    assert result.exit_code == 2 and "unknown rule 'asapp'" in result.output
