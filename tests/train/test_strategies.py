"""One trainer, three strategies: every ``--parallel`` mode writes the same files with one metrics
schema, and a rule or stage count a mode cannot run is refused in one line, before training."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from creditflow.cli import main
from creditflow.train import RunConfig, train

TINY = dict(rule="dfa", model="mlp:784-32-16-10", epochs=1, batch_size=32, max_steps_per_epoch=3, lr=1e-3,
            eval_batch_size=1000, device="cpu", augment="none")


@pytest.mark.parametrize("mode", ["ddp", "pipeline"])
def test_every_mode_writes_the_same_files_with_one_schema(tmp_path, mode):
    single = train(RunConfig(**TINY, out=str(tmp_path / "none")), progress=False)
    other = train(RunConfig(**TINY, out=str(tmp_path / mode), parallel=mode), progress=False)
    names = {p.name for p in (tmp_path / "none").iterdir()}
    assert names == {p.name for p in (tmp_path / mode).iterdir()} >= {"config.yaml", "metrics.jsonl",
                                                                         "checkpoint.pt", "summary.json"}
    row = json.loads((tmp_path / "none" / "metrics.jsonl").read_text().splitlines()[0])
    row_other = json.loads((tmp_path / mode / "metrics.jsonl").read_text().splitlines()[0])
    assert row.keys() == row_other.keys()
    assert set(single) <= set(other)  # the summary adds how the run was split
    assert other[mode]
    if mode == "pipeline":
        assert len(row_other["stage_busy_s"]) == 2 and row["stage_busy_s"] is None


def run_cli(tmp_path, *flags):
    return CliRunner().invoke(main, ["train", "--quiet", "--out", str(tmp_path), "--epochs", "1",
                                     "--max-steps-per-epoch", "2", *flags])


def test_a_rule_that_cannot_be_pipelined_is_refused_in_one_line(tmp_path):
    result = run_cli(tmp_path, "--rule", "fa", "--parallel", "pipeline")
    assert result.exit_code != 0
    line = result.output.strip()
    assert line.startswith("Error: rule 'fa' cannot be pipelined: its layers are backward-locked") and "\n" not in line
    assert "the pipeline runs al, asfp-lc, dfa" in line and "use --parallel ddp" in line


def test_more_stages_than_the_model_allows_is_refused_in_one_line(tmp_path):
    result = run_cli(tmp_path, "--rule", "dfa", "--model", "mlp:784-16-10", "--parallel", "pipeline", "--stages", "3")
    assert result.exit_code != 0
    line = result.output.strip()
    assert "\n" not in line and "splits into at most 2 pipeline stages" in line and "use --stages 1..2" in line
