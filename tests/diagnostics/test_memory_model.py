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
                                       "--plot", str(plot), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "saved for backward MiB" in result.output and "Modelled external memory accesses" in result.output
    assert plot.read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "out" / "memory.json").exists() and "| fa |" in (tmp_path / "out" / "memory.md").read_text()
    result = CliRunner().invoke(main, ["memory", "--rules", "bp,asapp"])
    assert result.exit_code == 2 and "unknown rule 'asapp'" in result.output


def test_trained_feedback_counts_as_parameters_unless_the_thesis_accounting_is_asked_for():
    bp = external_memory_access(rule("bp"), (784,), batch_size=4)
    kp = external_memory_access(rule("kp"), (784,), batch_size=4)
    weights = 784 * 64 + 64 * 32 + 32 * 10
    assert kp.feedback_params == weights and kp.params == bp.params + weights
    assert kp.total == bp.total + 3 * weights  # Param appears 3 times in eqs. 6.1-6.2
    assert kp.total_forward_weights_only == bp.total
    assert bp.feedback_params == 0 and bp.total_forward_weights_only == bp.total


def test_memory_command_compares_networks_in_one_figure(tmp_path):
    plot = tmp_path / "networks.svg"
    result = CliRunner().invoke(main, ["memory", "--model", "mlp:784-32-10,mlp:784-16-16-10", "--rules",
                                       "bp,asap:k=2", "--batch-size", "4", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert result.output.count("Measured on") == 2 and "B not counted" in result.output
    assert plot.read_text().count("mlp:784-16-16-10") >= 1
    result = CliRunner().invoke(main, ["memory", "--rules", "bp,asap:k"])
    assert result.exit_code != 0 and "expected name:key=value" in result.output
