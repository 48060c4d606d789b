import json

import pytest

from creditflow.data import sources
from creditflow.jobs.reproduce import (
    ReproduceOptions,
    available,
    budget_names,
    cell_runs,
    load_preset,
    reproduce,
)

TINY_PRESET = """
name: tiny
title: "A tiny table"
paper: "nobody 2024"
rules: [bp, shallow, dfa, dfa-product]
columns:
  dfa-product: {rule: dfa, rule_options: {feedback_init: product}}
cells:
  - {id: mini, dataset: fashion-mnist-mini, model: "mlp:784-16-16-10", paper: {bp: 0.8, dfa: 0.7, dfa-product: 0.75},
     settings: {bp: {lr: 0.01}}}
  - {id: absent, dataset: svhn, model: "mlp:3072-16-10", paper: {bp: 0.9}}
budgets:
  full: {seeds: 3, epochs: 100}
  quick: {seeds: 2, epochs: 1, max_steps_per_epoch: 3, batch_size: 32, lr: 0.001}
  cpu: {seeds: 2, cells: [mini], epochs: 3, max_steps_per_epoch: 4, batch_size: 32, lr: 0.001, test_every: best,
        jobs: 2, minutes: 1}
  cpu_overrides:
    mini: {epochs: 2}
"""


@pytest.mark.parametrize("name", available())
def test_packaged_presets_validate_and_name_only_reported_rules(name):
    preset = load_preset(name)
    assert preset.cells and set(preset.budgets) >= {"quick", "full"}
    for cell in preset.cells:
        assert set(cell.paper) <= set(preset.rules)
        for budget in budget_names(preset):
            columns, runs = cell_runs(preset, cell, ReproduceOptions(budget=budget))
            covered = preset.budgets[budget].get("columns", preset.rules)  # a budget may cover some columns
            assert columns == [r for r in preset.rules if r in cell.paper and r in covered]
            assert all(c.download == (budget == "full") for _, c in runs)


def test_a_budget_covers_its_columns_unless_the_command_names_others():
    preset = load_preset("asap-table-5.2")
    cell = next(c for c in preset.cells if c.id == "cifar10-resnet18")
    columns, runs = cell_runs(preset, cell, ReproduceOptions(budget="cpu-long"))
    assert columns == ["bp", "kp", "asap"] and {c.epochs for _, c in runs} == {20}
    assert cell_runs(preset, cell, ReproduceOptions(budget="cpu-long", columns="fa"))[0] == ["fa"]
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['xx'\]"):
        cell_runs(preset, cell, ReproduceOptions(budget="cpu-long", columns="xx"))


def test_las_presets_use_the_papers_protocol():
    for name in ("las-fc", "las-cnn"):
        preset = load_preset(name)
        for cell in preset.cells:
            _, runs = cell_runs(preset, cell, ReproduceOptions(budget="full"))
            assert all(c.batch_size == 64 and c.optimizer == "adam" for _, c in runs)


def test_las_presets_hold_the_papers_numbers():
    fc = {c.id: c.paper for c in load_preset("las-fc").cells}
    assert fc["mnist"]["las"] == 0.9871 and fc["cifar100"]["bp"] == 0.3376
    cnn = {c.id: c.paper for c in load_preset("las-cnn").cells}
    assert cnn["cifar10-flip-conv3"]["shallow"] == 0.6668 and cnn["tiny-imagenet-rand-resnet18"]["las"] == 0.4678


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'las-xx'; available: .*las-cnn, las-fc"):
        load_preset("las-xx")


def test_quick_run_writes_report_and_skips_absent_data(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [])
    monkeypatch.setenv("CREDITFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CREDITFLOW_DATA", raising=False)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    out = tmp_path / "out"
    results = reproduce(str(preset), ReproduceOptions(budget="quick", out=str(out), device="cpu"), progress=False)
    report = (out / "report.md").read_text()
    assert "| mini | " in report and "(0.8000)" in report and "(0.7000)" in report
    assert "| absent | skipped (0.9000) | – | – | – |" in report and "dataset 'svhn' not found" in report
    runs = results["cells"]["mini"]["summaries"]
    assert set(runs) == {"bp", "dfa", "dfa-product"} and all(len(v) == 2 for v in runs.values())  # no shallow
    import yaml
    saved = yaml.safe_load((out / "mini" / "dfa-product" / "seed0" / "config.yaml").read_text())
    assert saved["rule"] == "dfa" and saved["rule_options"] == {"feedback_init": "product"} and saved["lr"] == 0.001
    assert yaml.safe_load((out / "mini" / "bp" / "seed0" / "config.yaml").read_text())["lr"] == 0.01
    assert (out / "mini" / "dfa" / "seed1" / "config.yaml").exists()
    assert json.loads((out / "results.json").read_text())["budget"] == "quick"


def test_asap_presets_carry_table_5_1_learning_rates_and_columns():
    preset = load_preset("asap-table-5.2")
    cell = next(c for c in preset.cells if c.id == "cifar10-resnet34")
    columns, runs = cell_runs(preset, cell, ReproduceOptions(budget="full"))
    assert columns == ["bp", "kp", "fa", "dfa", "asap", "asap-k4"]
    cfg = {column: c for column, c in runs if c.seed == 0}
    assert cfg["asap"].lr == 0.03 and cfg["fa"].lr == 0.003 and cfg["asap-k4"].rule_options["k"] == 4
    assert cfg["kp"].rule_options == {"kp_decay": 0.0} and cfg["bp"].schedule == "cosine"
    assert all(c.optimizer == "sgd" and c.weight_decay == 0.0005 and c.batch_size == 128 for c in cfg.values())
    assert cell.paper["asap-k4"] == 0.939
    sweep = load_preset("asap-table-5.4")
    _, runs = cell_runs(sweep, next(c for c in sweep.cells if c.id == "wd-5e-3"), ReproduceOptions(budget="quick"))
    assert {c.weight_decay for _, c in runs} == {0.005}
    assert load_preset("asap-dim-match").cells[0].paper["match-3"] is None
    for name in ("asap-table-5.2", "asap-dim-match"):  # the authors' AlexNet: BatchNorm after every layer
        alexnets = [c for c in load_preset(name).cells if c.model == "alexnet-asap"]
        assert alexnets and all(c.model_options == {"batch_norm": True} for c in alexnets)


def test_cpu_budget_runs_side_by_side_and_equals_one_at_a_time(tmp_path, monkeypatch):
    """A budget beyond quick/full: its cells, overrides and test_every reach the runs; two 1-thread
    worker processes give exactly the numbers of the same runs one after another on one thread."""
    import torch

    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = reproduce(str(preset), ReproduceOptions(budget="cpu", out=str(tmp_path / "one"), device="cpu", jobs=1,
                                                      columns="bp,dfa"), progress=False)
    finally:
        torch.set_num_threads(threads)
    two = reproduce(str(preset), ReproduceOptions(budget="cpu", out=str(tmp_path / "two"), device="cpu",
                                                  columns="bp,dfa"), progress=False)
    assert set(one["cells"]) == {"mini"} and two["jobs"] == 2  # the budget's cells and jobs
    for column in ("bp", "dfa"):
        a, b = one["cells"]["mini"]["summaries"][column], two["cells"]["mini"]["summaries"][column]
        assert [s["seed"] for s in b] == [0, 1] and [s["epochs"] for s in b] == [2, 2]  # cpu_overrides
        assert [s["test_acc"] for s in a] == [s["test_acc"] for s in b]
    assert (tmp_path / "two" / "mini" / "curves.png").exists() == _has_matplotlib()
    assert "2 run(s) side by side" in (tmp_path / "two" / "report.md").read_text()


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


PROBED = """
name: probed
title: "Alignment while training"
paper: "nobody 2024"
rules: [dfa, dfa-product]
columns:
  dfa-product: {rule: dfa, rule_options: {feedback_init: product}}
cells:
  - {id: mini, dataset: fashion-mnist-mini, model: "mlp:784-16-16-10", paper: {dfa: null, dfa-product: null}}
probe: {every: 1, at: pre-activation}
budgets:
  full: {seeds: 1, epochs: 100}
  quick: {seeds: 2, epochs: 2, max_steps_per_epoch: 4, batch_size: 16, lr: 0.001, probe_every: 2}
"""


def test_a_probed_preset_reports_per_epoch_alignment_over_seeds(tmp_path):
    from creditflow.jobs.align import epoch_means
    from creditflow.train.metrics import read_jsonl

    preset = tmp_path / "probed.yaml"
    preset.write_text(PROBED)
    out = tmp_path / "out"
    results = reproduce(str(preset), ReproduceOptions(budget="quick", out=str(out), device="cpu"), progress=False)
    rows = results["cells"]["mini"]["alignment"]
    assert {(r["rule"], r["epoch"], r["block"]) for r in rows} == {
        (c, e, b) for c in ("dfa", "dfa-product") for e in (1, 2) for b in (0, 1)}
    # the mean over the two seeds of each run's own epoch means (steps 0, 2 | 4, 6: probe_every 2)
    runs = [epoch_means(read_jsonl(out / "mini" / "dfa" / f"seed{s}" / "alignment.jsonl")) for s in (0, 1)]
    assert all(len([m for m in run if m["n"] == 2]) == 4 for run in runs)
    first = next(r for r in rows if (r["rule"], r["epoch"], r["block"]) == ("dfa", 1, 0))
    values = [next(m["cosine"] for m in run if (m["epoch"], m["block"]) == (1, 0)) for run in runs]
    assert first["seeds"] == 2 and first["cosine"] == pytest.approx(sum(values) / 2)
    report = (out / "report.md").read_text()
    assert "cosine at each block's pre-activation, measured every 2 steps" in report and "| dfa-product |" in report
    assert (out / "mini" / "alignment-epochs.csv").read_text().startswith("rule,epoch,block,cosine,std,seeds")


FAILING = """
name: failing
title: "One run fails"
paper: "nobody 2024"
rules: [broken, bp]
columns:
  broken: {rule: dfa, rule_options: {no_such_option: 1}}
cells:
  - {id: mini, dataset: fashion-mnist-mini, model: "mlp:784-16-16-10", paper: {broken: null, bp: null}}
budgets:
  full: {seeds: 1, epochs: 100}
  quick: {seeds: 6, epochs: 2, max_steps_per_epoch: 30, batch_size: 16, jobs: 2}
"""


def test_a_failing_run_stops_the_side_by_side_workers_instead_of_draining_the_queue(tmp_path):
    preset = tmp_path / "failing.yaml"
    preset.write_text(FAILING)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no_such_option"):
        reproduce(str(preset), ReproduceOptions(budget="quick", out=str(out), device="cpu"), progress=False)
    finished = list(out.glob("mini/bp/seed*/summary.json"))
    assert len(finished) < 6  # the queued BP runs were never started


def test_a_budget_starts_the_columns_it_names_first(tmp_path):
    from creditflow.jobs.reproduce import run_order

    (tmp_path / "tiny.yaml").write_text(TINY_PRESET)
    preset = load_preset(str(tmp_path / "tiny.yaml"))
    cell = next(c for c in preset.cells if c.id == "mini")
    planned = {"mini": cell_runs(preset, cell, ReproduceOptions(budget="quick"))}
    order = [(column, cfg.seed) for _, column, cfg in run_order(planned, ["dfa-product"], preset)]
    assert order[:2] == [("dfa-product", 0), ("dfa-product", 1)]
    assert order[2:] == [(c, s) for c, s in
                         [(column, cfg.seed) for _, column, cfg in run_order(planned, [], preset)] if c != "dfa-product"]
    with pytest.raises(ValueError, match="unknown column"):
        run_order(planned, ["nope"], preset)
    with pytest.raises(ValueError, match="must be a list of columns"):
        run_order(planned, "dfa", preset)  # not read as the columns d, f, a
