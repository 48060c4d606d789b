import csv
import json
import sys

import pytest
from click.testing import CliRunner

from creditflow.cli import main

# 2 epochs x 3 steps, measured before steps 0, 2, 4 and after the last (step 6): 4 measurements.
TINY = ["--model", "mlp:784-16-16-10", "--epochs", "2", "--max-steps-per-epoch", "3", "--every", "2",
        "--batch-size", "16", "--eval-batch-size", "500", "--device", "cpu", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_align_writes_one_jsonl_line_per_rule_measurement_and_block(tmp_path):
    result = run("align", "--rules", "bp,dfa,dfa:feedback_init=product", "--no-plot", "--out", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "alignment.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 * 2  # one line per (rule, measurement, block)
    assert sorted({r["step"] for r in rows}) == [0, 2, 4, 6]
    assert {(r["rule"], r["block"]) for r in rows} == {
        (rule, b) for rule in ("bp", "dfa", "dfa:feedback_init=product") for b in (0, 1)}
    assert all(abs(r["cosine"] - 1) < 1e-5 for r in rows if r["rule"] == "bp")
    assert all(r["cosine"] < 0.99 for r in rows if r["rule"] == "dfa" and r["block"] == 0)
    first = next(r for r in rows if r["rule"] == "dfa:feedback_init=product")
    assert first["weight_angle_deg"]["block0"] < 1e-3  # B_0 = W_2 W_1 at step 0
    with open(tmp_path / "alignment.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["rule"] == "bp" and "weight_angle_deg.block0" in table[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["rules"]) == ["bp", "dfa", "dfa:feedback_init=product"]
    assert "| dfa |" in result.output and "alignment.jsonl" in result.output
    assert not (tmp_path / "alignment.png").exists()


def test_align_plots_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")  # the `plot` extra
    result = run("align", "--rules", "bp,fa", "--out", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    for name in ("alignment", "alignment-weights"):  # weights: FA has feedback matrices
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (tmp_path / f"{name}.svg").read_bytes()[:1000]
    assert "alignment.png" in result.output


def test_every_rule_starts_from_the_same_weights_and_batches(tmp_path):
    result = run("align", "--rules", "bp,fa", "--no-plot", "--out", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "alignment.jsonl").read_text().splitlines()]
    assert all(r["cosine"] == 1.0 or r["rule"] != "bp" for r in rows)
    again = tmp_path / "again"
    assert run("align", "--rules", "fa", "--no-plot", "--out", str(again), *TINY).exit_code == 0
    fa = [r for r in rows if r["rule"] == "fa"]
    assert fa == [json.loads(line) for line in (again / "alignment.jsonl").read_text().splitlines()]


def test_bad_rule_names_and_specs_are_usage_errors(tmp_path):
    result = CliRunner().invoke(main, ["align", "--rules", "bp,dfaa", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown rule 'dfaa'" in result.output and "closest: dfa" in result.output
    result = CliRunner().invoke(main, ["align", "--rules", "dfa:feedback_init", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "expected name:key=value" in result.output
    result = CliRunner().invoke(main, ["align", "--rules", "dfa,dfa", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "rules must differ" in result.output
    result = CliRunner().invoke(main, ["align", "--resume"])
    assert result.exit_code == 2 and "--resume" in result.output


def test_bad_rule_options_fail_before_any_training(tmp_path):
    result = CliRunner().invoke(main, ["align", "--rules", "bp,fa:feedback_init=product", "--out", str(tmp_path),
                                       *TINY])
    assert result.exit_code == 2 and "bad options for rule 'fa'" in result.output
    assert not (tmp_path / "alignment.jsonl").exists()


def test_missing_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    result = CliRunner().invoke(main, ["align", "--out", str(tmp_path), *TINY])
    assert result.exit_code == 1 and "pip install 'creditflow[plot]'" in result.output
    assert "--no-plot" in result.output


def test_align_refuses_parallel_runs():
    from click.testing import CliRunner

    from creditflow.cli import main

    result = CliRunner().invoke(main, ["align", "--parallel", "ddp"])
    assert result.exit_code != 0 and "align runs in one process" in result.output


def test_sharing_prints_the_plan_and_refuses_other_rules():
    from creditflow.cli import main

    result = CliRunner().invoke(main, ["sharing", "--model", "resnet18", "--rule", "asap:k=4",
                                       "--model-option", "width=4"])
    assert result.exit_code == 0, result.output
    assert "| 3.conv2 | 3 | input of 3.conv1 | 8x16x16 | 4x32x32 | max | W and B |" in result.output
    result = CliRunner().invoke(main, ["sharing", "--rule", "dfa"])
    assert result.exit_code != 0 and "rules that do: as, asap, asfp, asfp-lc" in result.output


def test_a_killed_probe_resumes_with_every_measurement_once(tmp_path):
    """The probe's rows live in the run folder: a kill mid-epoch 2, or after epoch 2's rows are written
    but before its checkpoint, then a resume, give the rows of an uninterrupted run; the final
    measurement is flagged and kept out of the per-epoch means."""
    from creditflow.jobs.align import AlignmentProbe, epoch_means
    from creditflow.train import Callback, RunConfig, train

    def cfg(folder):
        return RunConfig(rule="dfa", model="mlp:784-16-16-10", epochs=3, max_steps_per_epoch=4, batch_size=16,
                         eval_batch_size=500, device="cpu", out=str(folder))

    def probe(folder):
        return AlignmentProbe("dfa", 3, "pre-activation", folder)

    train(cfg(tmp_path / "straight"), progress=False, callbacks=[probe(tmp_path / "straight")])

    class DiesInEpoch2(Callback):
        def on_step_start(self, trainer, step):
            if step == 6:
                raise KeyboardInterrupt

    class DiesBeforeCheckpoint2(Callback):  # after the probe has written epoch 2's rows
        def on_epoch_end(self, trainer, row):
            if row["epoch"] == 2:
                raise KeyboardInterrupt

    def rows(folder):
        return [json.loads(line) for line in (folder / "alignment.jsonl").read_text().splitlines()]

    straight = rows(tmp_path / "straight")
    for killer in (DiesInEpoch2(), DiesBeforeCheckpoint2()):
        folder = tmp_path / type(killer).__name__
        with pytest.raises(KeyboardInterrupt):
            train(cfg(folder), progress=False, callbacks=[probe(folder), killer])
        resumed = probe(folder)
        train(cfg(folder), resume=True, progress=False, callbacks=[resumed])
        assert rows(folder) == straight == resumed.rows
    assert max(r["epoch"] for r in rows(tmp_path / "straight")) == 3
    assert sorted({r["step"] for r in straight}) == [0, 3, 6, 9, 12]  # 12: after the last step
    assert [r["step"] for r in straight if r.get("final")] == [12, 12]
    means = epoch_means(straight)
    assert sorted((m["epoch"], m["block"], m["n"]) for m in means) == [
        (1, 0, 2), (1, 1, 2), (2, 0, 1), (2, 1, 1), (3, 0, 1), (3, 1, 1)]  # steps 0,3 | 6 | 9

    # a resume with other probe settings, or of a run trained without the probe, is refused (runs
    # without their summary: a finished run is read back and measures nothing)
    (tmp_path / "straight" / "summary.json").unlink()
    with pytest.raises(ValueError, match="measured with every=3, at=pre-activation, not every=5"):
        train(cfg(tmp_path / "straight"), resume=True, progress=False,
              callbacks=[AlignmentProbe("dfa", 5, "pre-activation", tmp_path / "straight")])
    train(cfg(tmp_path / "plain"), progress=False)
    (tmp_path / "plain" / "summary.json").unlink()
    with pytest.raises(ValueError, match="trained without the alignment probe"):
        train(cfg(tmp_path / "plain"), resume=True, progress=False, callbacks=[probe(tmp_path / "plain")])
