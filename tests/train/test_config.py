import pytest

from creditflow.train.config import (
    CompareConfig,
    ConfigError,
    RunConfig,
    load_yaml,
    validate,
)


def test_defaults_are_a_valid_run():
    cfg = validate(RunConfig, {})
    assert cfg.rule == "bp" and cfg.dataset == "fashion-mnist-mini" and cfg.val_fraction == 0.1


def test_unknown_key_names_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'; allowed: .*\blr\b"):
        validate(RunConfig, {"learning_rate": 0.1})


@pytest.mark.parametrize("key,value,match", [
    ("optimizer", "rmsprop", r"optimizer: Input should be 'adam' or 'sgd'"),
    ("rule", "dfaa", r"rule: unknown rule 'dfaa'; available: .* \(closest: dfa\)"),
    ("model", "mlpp:784-10", r"model: unknown model 'mlpp'"),
    ("dataset", "mnistt", r"dataset: unknown dataset 'mnistt'"),
    ("val_fraction", 1.5, r"val_fraction: Input should be less than 1"),
    ("lr", -1, r"lr: Input should be greater than 0"),
])
def test_bad_values_name_what_is_allowed(key, value, match):
    with pytest.raises(ConfigError, match=match):
        validate(RunConfig, {key: value})


def test_compare_rules_parse_and_validate():
    assert validate(CompareConfig, {"rules": "bp, dfa"}).rules == ["bp", "dfa"]
    with pytest.raises(ConfigError, match="unknown rule 'xx'"):
        validate(CompareConfig, {"rules": "bp,xx"})


def test_compare_run_configs_share_everything_but_rule_and_seed():
    cfg = validate(CompareConfig, {"rules": "bp,fa", "lr": 0.01, "out": "o"})
    run = cfg.run("fa", 3)
    assert isinstance(run, RunConfig) and run.rule == "fa" and run.seed == 3 and run.lr == 0.01
    assert run.out.replace("\\", "/") == "o/fa/seed3"


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
