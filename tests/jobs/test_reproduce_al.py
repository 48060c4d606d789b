"""Reproduce's column models, model options and extra report tables (used by the al-table-* presets)."""

import json

import pytest
import yaml

from creditflow.jobs.reproduce import (
    ReproduceOptions,
    cell_runs,
    load_preset,
    reproduce,
)

TINY_AL = """
name: tiny-al
title: "A tiny AL table"
paper: "nobody 2024"
rules: [bp, al, al-1]
columns:
  al: {rule: al, local_lr: 0.002}
  al-1: {rule: al, model: "al-mlp:784-16-10", model_options: {width: 8}}
cells:
  - {id: mini, dataset: fashion-mnist-mini, model: "al-mlp:784-16-16-10",
     settings: {bp: {model: "mlp:784-16-16-80-16-16-10"}}, paper: {bp: 0.8, al: 0.7, al-1: 0.6}}
extras:
  - {key: assoc_loss/1, title: "Loss of component 1", paper: {mini: {al: 1.5e-5}}}
  - {key: assoc_loss/2, title: "Loss of component 2"}
  - {key: ratio, source: analysis, title: "Inter/intra", paper: {mini: {bp: 0.58, al: 1.11}}}
budgets:
  full: {seeds: 3, epochs: 100}
  quick: {seeds: 1, epochs: 2, max_steps_per_epoch: 3, batch_size: 32, lr: 0.001}
  quick_model_options:
    al-mlp: {bridge_width: 12}
  quick_analysis: {samples: 50, tsne: false, plot: false}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny-al.yaml"
    path.write_text(TINY_AL)
    return str(path)


def test_a_column_trains_its_own_model_with_merged_options(tiny):
    preset = load_preset(tiny)
    _, runs = cell_runs(preset, preset.cells[0], ReproduceOptions(budget="quick"))
    cfg = {column: c for column, c in runs}
    assert cfg["bp"].model == "mlp:784-16-16-80-16-16-10" and cfg["bp"].model_options == {}
    assert cfg["al"].model == "al-mlp:784-16-16-10" and cfg["al"].model_options == {"bridge_width": 12}
    assert cfg["al"].local_lr == 0.002 and cfg["bp"].local_lr is None
    # budget options by model name (before ':'), updated by the column's own
    assert cfg["al-1"].model == "al-mlp:784-16-10" and cfg["al-1"].model_options == {"bridge_width": 12, "width": 8}
    _, full = cell_runs(preset, preset.cells[0], ReproduceOptions(budget="full"))
    assert {c.model_options.get("bridge_width") for _, c in full} == {None}  # quick options stay in quick


def test_extras_are_checked(tmp_path):
    bad = TINY_AL.replace("paper: {mini: {al: 1.5e-5}}", "paper: {nope: {al: 1.5e-5}}")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ValueError, match="unknown cell"):
        load_preset(str(tmp_path / "bad.yaml"))
    (tmp_path / "bad3.yaml").write_text(TINY_AL.replace("{mini: {al: 1.5e-5}}", "{mini: {dfa: 1.5e-5}}"))
    with pytest.raises(ValueError, match="unknown column"):
        load_preset(str(tmp_path / "bad3.yaml"))
    (tmp_path / "bad2.yaml").write_text(TINY_AL.replace("key: ratio", "key: ratios"))
    with pytest.raises(ValueError, match="one of ratio, inter, intra"):
        load_preset(str(tmp_path / "bad2.yaml"))


def test_quick_run_reports_metrics_and_analysis_extras(tiny, tmp_path):
    out = tmp_path / "out"
    results = reproduce(tiny, ReproduceOptions(budget="quick", out=str(out), device="cpu"), progress=False)
    runs = results["cells"]["mini"]["summaries"]
    al = runs["al"][0]
    best = al["best_epoch"]
    row = next(json.loads(line) for line in (out / "mini/al/seed0/metrics.jsonl").read_text().splitlines()
               if json.loads(line)["epoch"] == best)
    assert al["metrics"] == {"assoc_loss/1": row["assoc_loss/1"], "assoc_loss/2": row["assoc_loss/2"]}
    assert runs["al-1"][0]["metrics"]["assoc_loss/2"] is None  # one component only
    assert runs["bp"][0]["metrics"] == {"assoc_loss/1": None, "assoc_loss/2": None}
    # the analysis is creditflow analyze's, on the finished run
    analysis = json.loads((out / "mini/al/seed0/analysis/analysis.json").read_text())
    assert al["layers"] == [{k: layer[k] for k in ("layer", "dim", "ratio", "inter", "intra")}
                            for layer in analysis["layers"]]
    assert analysis["samples"] == 50 and al["layers"][0]["layer"] == "input"
    assert [x["layer"] for x in al["layers"]][1:3] == ["s1", "s2"]
    assert yaml.safe_load((out / "mini/al-1/seed0/config.yaml").read_text())["model"] == "al-mlp:784-16-10"

    report = (out / "report.md").read_text()
    assert "Loss of component 1: ours" in report and "(1.5e-05)" in report
    line = next(x for x in report.splitlines() if x.startswith("| mini | ") and "e-" in x)
    assert line.count("|") == 5 and "–" not in line
    assert "Inter/intra: `ratio`" in report and "| paper | 0.58 | 1.11 | n/a |" in report
    assert f"({al['layers'][1]['layer']})" in report
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"]["mini"]["summaries"]["al"][0]["layers"] == al["layers"]

    # a rerun resumes every finished run and reuses its analysis: the same report (the wall time, summed
    # over the invocations, grows by the rerun's seconds)
    again = reproduce(tiny, ReproduceOptions(budget="quick", out=str(out), device="cpu"), progress=False)
    import re

    def timeless(text):
        return re.sub(r"Wall time [0-9.]+ min", "Wall time", text)

    assert timeless(again["report"]) == timeless(report)
    assert again["wall_seconds"] >= saved["wall_seconds"]


AL_PRESETS = ("al-table-2", "al-table-3", "al-table-4", "al-table-5-6", "al-table-7")


@pytest.mark.parametrize("name", AL_PRESETS)
def test_al_presets_use_the_authors_protocol_and_matched_bp_models(name):
    preset = load_preset(name)
    for cell in preset.cells:
        for budget in ("quick", "full"):
            _, runs = cell_runs(preset, cell, ReproduceOptions(budget=budget))
            for column, cfg in runs:
                assert cfg.batch_size == 32 and cfg.optimizer == "adam"
                if column.startswith("al"):
                    assert cfg.rule == "al" and cfg.model.startswith("al-") and cfg.local_lr == 2 * cfg.lr
                else:  # BP and DTP train the matched twin, never the folded network
                    assert not cfg.model.startswith("al-") and cfg.model.split(":")[0] in cell.model.removeprefix("al-")
                if budget == "full":
                    # He-normal init (Sec. 5.1): the AL models' default, an option of the MLP twin
                    twin_he = {"init": "he-normal"} if cfg.model.startswith("mlp") else {}
                    assert cfg.epochs == 200 and cfg.max_steps_per_epoch is None and cfg.model_options == twin_he
                    assert cfg.augment == ("crop" if cell.dataset.startswith("cifar") else "none")
                    assert cfg.lr == (0.001 if "resnet" in cell.model else 0.0001)
                    if "vgg" in cell.model:
                        assert cfg.weight_decay == 0.0005


def test_al_presets_hold_the_papers_numbers():
    cells = {(name, c.id): c.paper for name in AL_PRESETS for c in load_preset(name).cells}
    assert cells["al-table-2", "mnist-mlp"] == {"bp": 0.985, "al": 0.986, "dtp": 0.9643}
    assert cells["al-table-3", "cifar10-resnet32"] == {"bp": 0.920, "al": 0.887}
    assert cells["al-table-3", "cifar10-mlp"]["dtp"] == 0.582
    assert cells["al-table-4", "cifar100-vgg"] == {"bp": 0.658, "al": 0.671}
    assert cells["al-table-5-6", "mnist-mlp"] == {"al-1": 0.9849, "al-2": 0.9860, "al-3": 0.9871}
    extras = {e.key: e.paper for e in load_preset("al-table-5-6").extras}
    assert extras["assoc_loss/3"] == {"mnist-mlp": {"al-3": 6.7192e-10}}
    table7 = {e.key: e.paper for e in load_preset("al-table-7").extras}
    assert table7["ratio"]["cifar10-vanilla-cnn"] == {"bp": 1.56, "al": 3.25}
    assert table7["intra"]["cifar100-mlp"] == {"bp": 342.65, "al": 0.28}


def test_matched_mlp_has_the_al_inference_path_s_parameters():
    from creditflow import models

    al = models.build("al-mlp:784-1024-1024-10", input_shape=(1, 28, 28), num_classes=10)
    bp = models.build("mlp:784-1024-1024-5120-1024-1024-10", input_shape=(1, 28, 28), num_classes=10)
    shapes = sorted(p.shape for p in al.inference_model().parameters())
    assert shapes == sorted(p.shape for p in bp.parameters())


def test_layers_line_up_by_feature_size():
    from creditflow.jobs.preset_report import align_layers

    al = [{"dim": d} for d in (3072, 32768, 4096, 1280, 256, 256, 10)]  # input, s1, s2, b2.1, b2, h2, h1
    bp = [{"dim": d} for d in (3072, 32768, 4096, 256, 256, 10)]  # the BP twin's bridge is one block
    assert align_layers(al, bp) == {0: 0, 1: 1, 2: 2, 4: 3, 5: 4, 6: 5}
    assert align_layers(al, al) == {i: i for i in range(7)}


def test_report_names_the_budget_s_overrides_and_model_options():
    from creditflow.jobs.reproduce import budget_notes

    quick = budget_notes(load_preset("al-table-3"), "quick")
    assert "Per-cell overrides: cifar10-resnet20: max_steps_per_epoch=300;" in quick
    assert "Model options: al-vanilla-cnn: bridge_pool=2;" in quick
    assert budget_notes(load_preset("las-fc"), "full") == (". Per-cell overrides: mnist: epochs=100; "
                                                            "cifar10: epochs=300; cifar100: epochs=500")
