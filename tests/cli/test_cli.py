import json

from click.testing import CliRunner

import creditflow as cf
from creditflow.cli import main

TINY = ["--model", "mlp:784-32-10", "--epochs", "1", "--max-steps-per-epoch", "3", "--batch-size", "32",
        "--device", "cpu", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_listings_name_every_registered_entry():
    for command, names in (("rules", cf.rules.available()), ("models", cf.models.available()),
                           ("datasets", cf.data.available())):
        result = run(command)
        assert result.exit_code == 0
        lines = result.output.strip().split("\n\n")[0].splitlines()  # datasets: presence follows
        assert [line.split()[0] for line in lines] == names


def test_train_flags_and_yaml_share_one_schema(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("rule: dfa\nlr: 0.002\nrule_options: {feedback_scale: 0.5}\n")
    out = tmp_path / "out"
    result = run("train", "--config", str(cfg), "--lr", "0.001", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    saved = (out / "config.yaml").read_text()
    assert "rule: dfa" in saved and "lr: 0.001" in saved and "feedback_scale: 0.5" in saved
    assert json.loads((out / "summary.json").read_text())["rule"] == "dfa"


def test_bad_flag_value_names_what_is_allowed():
    result = CliRunner().invoke(main, ["train", "--optimizer", "rmsprop"])
    assert result.exit_code == 2 and "'adam'" in result.output and "'sgd'" in result.output
    result = CliRunner().invoke(main, ["train", "--rule", "dfaa"])
    assert result.exit_code == 2 and "closest: dfa" in result.output
    result = CliRunner().invoke(main, ["train", "--lrr", "0.1"])
    assert result.exit_code == 2 and "--lr" in result.output


def test_unknown_yaml_key_is_an_error(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(cfg)])
    assert result.exit_code == 2 and "unknown key 'learning_rate'" in result.output


def test_compare_writes_a_table(tmp_path):
    result = run("compare", "--rules", "bp,dfa", "--seeds", "2", "--out", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["rule"] for r in rows] == ["bp", "dfa"] and rows[0]["step_time_vs_bp"] == 1.0
    assert all(r["seeds"] == 2 for r in rows)
    assert rows[0]["saved_vs_bp"] == 1.0 and 0 < rows[1]["saved_vs_bp"] <= 1.0  # saved-for-backward bytes
    assert rows[0]["peak_vs_bp"] is None and "peak vs BP" not in result.output  # no allocator peak on CPU
    assert "| dfa |" in (tmp_path / "results.md").read_text() and "| dfa |" in result.output
    assert (tmp_path / "results.csv").read_text().startswith("rule,seeds,test_acc_mean")


def test_compare_never_sets_one_memory_measure_against_the_other():
    from creditflow.jobs.compare import table_rows

    def run_of(saved, peak):
        return [{"test_acc": 0.5, "val_acc": 0.5, "seconds_per_step": 0.1, "saved_for_backward_bytes": saved,
                 "peak_memory_bytes": peak}]

    # a CUDA run: BP with both; a pipelined rule without saved bytes (stages step apart)
    rows = table_rows({"bp": run_of(100, 1000), "dfa": run_of(None, 800), "fa": run_of(50, None)})
    assert [(r["saved_vs_bp"], r["peak_vs_bp"]) for r in rows] == [(1.0, 1.0), (None, 0.8), (0.5, None)]


def test_reproduce_command_rejects_unknown_presets_and_budgets():
    result = CliRunner().invoke(main, ["reproduce", "las-xx", "--quiet"])
    assert result.exit_code == 2 and "unknown preset 'las-xx'" in result.output
    result = CliRunner().invoke(main, ["reproduce", "las-fc", "--budget", "huge"])
    assert result.exit_code == 2 and "no budget 'huge'; its budgets: full, quick, cpu" in result.output
    listed = CliRunner().invoke(main, ["reproduce", "--list"])
    assert listed.exit_code == 0 and "| las-fc |" in listed.output and "cpu (3 seeds, ~47 min)" in listed.output


def test_feedback_init_is_a_rule_option_like_any_other(tmp_path):
    out = tmp_path / "dfa"
    result = run("train", "--rule", "dfa", "--rule-option", "feedback_init=product", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    assert "feedback_init: product" in (out / "config.yaml").read_text()
    result = CliRunner().invoke(main, ["train", "--rule", "bp", "--rule-option", "feedback_init=product", "--out",
                                       str(tmp_path / "bp"), *TINY])
    assert result.exit_code != 0 and "feedback_init" in result.output
    result = CliRunner().invoke(main, ["train", "--feedback-init", "product"])
    assert result.exit_code == 2  # no such flag: the option belongs to the rules that take it


def test_datasets_says_which_are_present_and_where(tmp_path, monkeypatch):
    from creditflow.data import sources

    monkeypatch.setattr(sources, "SYSTEM_DIRS", [tmp_path / "system"])
    monkeypatch.setenv("CREDITFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CREDITFLOW_DATA", raising=False)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # presence only: nothing is read
        (tmp_path / "data" / "mnist").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "mnist" / f"{stem}.gz").write_bytes(b"")
        (tmp_path / "system" / "fashion-mnist").mkdir(parents=True, exist_ok=True)
        (tmp_path / "system" / "fashion-mnist" / stem).write_bytes(b"")
    result = CliRunner().invoke(main, ["datasets", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[-7:]}
    assert f"present: {tmp_path / 'data' / 'mnist'} (data_dir)" in lines["mnist"]
    assert (f"not in --data-dir; present at {tmp_path / 'system' / 'fashion-mnist'} (system), which runs read when "
            "--data-dir is left out") in lines["fashion-mnist"]
    assert "present: embedded" in lines["fashion-mnist-mini"]
    assert "absent (downloaded on first use); to get it:" in lines["cifar10"]


def test_every_subcommand_shows_its_defaults_in_one_style_and_shared_options_agree():
    import re

    for name in sorted(main.commands):
        text = CliRunner().invoke(main, [name, "--help"], terminal_width=200).output
        flat = " ".join(text.split())
        assert not re.search(r"\[default: [^(]", flat), (name, re.findall(r"\[default: [^\]]*\]", flat))
        if "--device" in flat:  # one device choice, one default, everywhere
            assert "auto, cpu, cuda or cuda:N" in flat and "[default: (auto)]" in flat, name
        if "--rule " in flat or "--rules " in flat:  # the most used options come first
            first = flat.split("Options:", 1)[1].split()[0]
            assert first in ("--rule", "--rules", "--model"), (name, first)


def test_compare_takes_rules_with_options_as_align_and_memory_do(tmp_path):
    result = run("compare", "--rules", "bp,dfa:feedback_init=product", "--seeds", "1", "--out", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["rule"] for r in rows] == ["bp", "dfa:feedback_init=product"]
    import yaml

    saved = yaml.safe_load((tmp_path / "dfa-feedback_init=product" / "seed0" / "config.yaml").read_text())
    assert saved["rule"] == "dfa" and saved["rule_options"] == {"feedback_init": "product"}
    bad = run("compare", "--rules", "bp,dfa:feedback_init", "--out", str(tmp_path / "bad"), *TINY)
    assert bad.exit_code == 2 and "expected name:key=value" in bad.output


def test_compare_side_by_side_gives_the_numbers_of_one_at_a_time(tmp_path):
    import torch

    args = ["--rules", "bp,dfa", "--seeds", "2", *TINY]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same order of floating-point sums
    try:
        assert run("compare", "--out", str(tmp_path / "one"), *args).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    result = run("compare", "--out", str(tmp_path / "two"), "--jobs", "2", *args)
    assert result.exit_code == 0, result.output
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("one", "two"))
    assert [(r["rule"], r["test_acc_mean"]) for r in one] == [(r["rule"], r["test_acc_mean"]) for r in two]
