import csv
import json
import shutil
import sys

import pytest
from click.testing import CliRunner

from creditflow.cli import main
from creditflow.train import RunConfig, train
from creditflow.train.metrics import read_jsonl, write_jsonl

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--samples", "60", "--tsne-samples", "30", "--perplexity", "5", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run whose metrics carry a family ``assoc_loss/<i>``, as AL reports it."""
    out = tmp_path_factory.mktemp("runs") / "bp-tiny"
    train(RunConfig(model="mlp:784-16-12-10", epochs=1, max_steps_per_epoch=3, batch_size=32, device="cpu",
                    eval_batch_size=1000, out=str(out)), progress=False)
    rows = read_jsonl(out / "metrics.jsonl")
    write_jsonl(out / "metrics.jsonl", [{**r, "assoc_loss/0": 0.5, "assoc_loss/1": 0.25} for r in rows])
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    """A private copy: each test writes its own analysis/."""
    return shutil.copytree(finished, tmp_path / "run")


def analyze(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)], catch_exceptions=False)


def test_analyze_writes_distances_curves_and_tsne(run_dir):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    result = analyze(run_dir, *SMALL)
    assert result.exit_code == 0, result.output
    out = run_dir / "analysis"
    report = json.loads((out / "analysis.json").read_text())
    assert [r["layer"] for r in report["layers"]] == ["input", "block0", "block1", "head"]
    assert [r["dim"] for r in report["layers"]] == [784, 16, 12, 10]
    assert report["samples"] == 60 and report["classes"] == 10
    assert all(r["ratio"] == pytest.approx(r["inter"] / r["intra"]) for r in report["layers"])
    assert report["metric_families"]["assoc_loss"]["last"] == {"0": 0.5, "1": 0.25}
    with open(out / "distances.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["layer"] for r in table] == ["input", "block0", "block1", "head"]
    assert float(table[-1]["ratio"]) == pytest.approx(report["layers"][-1]["ratio"])
    for name in ("tsne-input", "tsne-block0", "tsne-block1", "tsne-head", "tsne", "assoc_loss"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name
    assert report["tsne"]["samples"] == 30 and report["tsne"]["perplexity"] == 5
    assert len((out / "tsne.csv").read_text().splitlines()) == 1 + 4 * 30
    assert "| head | 10 |" in result.output and "| assoc_loss | 0.5 | 0.25 |" in result.output
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_no_tsne_and_no_plot_skip_them_cleanly(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # not even needed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = analyze(run_dir, "--no-tsne", "--no-plot", "--layers", "block1,head", *SMALL)
    assert result.exit_code == 0, result.output
    out = run_dir / "analysis"
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "distances.csv"]
    report = json.loads((out / "analysis.json").read_text())
    assert report["tsne"] is None and [r["layer"] for r in report["layers"]] == ["block1", "head"]


def test_missing_extras_name_them(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import fails as if not installed
    result = analyze(run_dir, "--no-plot", *SMALL)
    assert result.exit_code == 1 and "creditflow[analysis]" in result.output and "--no-tsne" in result.output
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = analyze(run_dir, "--no-tsne", *SMALL)
    assert result.exit_code == 1 and "creditflow[plot]" in result.output and "--no-plot" in result.output
    assert not (run_dir / "analysis").exists()  # failed before any work


def test_unknown_layer_lists_the_layers(run_dir):
    result = analyze(run_dir, "--no-tsne", "--no-plot", "--layers", "block7", *SMALL)
    assert result.exit_code == 2 and "available: input, block0, block1, head" in result.output


def test_not_a_finished_run_is_a_clear_error(run_dir, tmp_path):
    result = analyze(tmp_path / "nowhere", *SMALL)
    assert result.exit_code == 1 and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = analyze(tmp_path / "empty", *SMALL)
    assert result.exit_code == 2 and "not a training run: no config.yaml" in result.output
    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "config.yaml").write_text("rules: [bp, dfa]\nevery: 5\n")
    result = analyze(tmp_path / "align", *SMALL)
    assert result.exit_code == 2 and "not a training run's config" in result.output
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace("lr: 0.0001", "lr: 0.5"))
    result = analyze(run_dir, *SMALL)
    assert result.exit_code == 2 and "describe different runs" in result.output
    (run_dir / "config.yaml").write_text(config)
    (run_dir / "summary.json").unlink()  # killed before the end
    result = analyze(run_dir, *SMALL)
    assert result.exit_code == 2 and "is not finished" in result.output and "--resume" in result.output
    (run_dir / "checkpoint.pt").unlink()
    result = analyze(run_dir, *SMALL)
    assert result.exit_code == 2 and "no checkpoint.pt" in result.output
    assert CliRunner().invoke(main, ["analyze"]).exit_code == 2  # RUN_DIR is required


def test_several_runs_side_by_side(run_dir, tmp_path):
    other = shutil.copytree(run_dir, tmp_path / "other")
    result = analyze(run_dir, other, "--no-tsne", "--no-plot", *SMALL)
    assert result.exit_code == 0, result.output
    assert "| | run | other |" in result.output and "| assoc_loss/1 | 0.25 | 0.25 |" in result.output
    assert "| layers (input excluded) | 3 | 3 |" in result.output
