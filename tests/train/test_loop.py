import json

import pytest
import torch

from creditflow.train import Callback, NonFiniteLoss, RunConfig, train
from creditflow.train.metrics import select_best

TINY = dict(model="mlp:784-32-10", epochs=3, batch_size=32, max_steps_per_epoch=6, lr=1e-3,
            eval_batch_size=500, device="cpu", augment="none")


def config(tmp_path, **overrides):
    return RunConfig(**{**TINY, "out": str(tmp_path), **overrides})


def weights(path):
    return torch.load(path / "checkpoint.pt", weights_only=False)["rule"]


def test_run_writes_its_files(tmp_path):
    summary = train(config(tmp_path, rule="dfa"), progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the curves are written only where matplotlib is installed
        assert not (tmp_path / "curves.png").exists()
    else:
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["seconds_per_step"] > 0 for r in rows)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_acc"] == select_best(rows)["test_acc"]


def test_test_accuracy_is_taken_at_the_best_validation_epoch():
    rows = [{"epoch": 1, "val_acc": 0.5, "test_acc": 0.9}, {"epoch": 2, "val_acc": 0.7, "test_acc": 0.6},
            {"epoch": 3, "val_acc": 0.7, "test_acc": 0.95}]
    assert select_best(rows)["epoch"] == 2  # not the best test epoch, and the earliest on ties
    assert select_best([{"epoch": 1, "val_acc": None, "test_acc": 0.3},
                        {"epoch": 2, "val_acc": None, "test_acc": 0.2}])["epoch"] == 2


def test_test_every_best_reads_the_test_set_only_where_the_summary_may(tmp_path):
    every = train(config(tmp_path / "every", epochs=5, lr=0.3, optimizer="sgd"), progress=False)
    best = train(config(tmp_path / "best", epochs=5, lr=0.3, optimizer="sgd", test_every="best"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "best" / "metrics.jsonl").read_text().splitlines()]
    for k, row in enumerate(rows):
        new_best = all(row["val_acc"] > r["val_acc"] for r in rows[:k])
        assert (row["test_acc"] is not None) == (new_best or row["epoch"] == 5)
    assert sum(r["test_acc"] is None for r in rows) == 2  # validation fell after epoch 2: two test passes saved
    assert best["test_acc"] == every["test_acc"] and best["final_test_acc"] == every["final_test_acc"]


@pytest.mark.parametrize("rule", ["bp", "dfa"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch, rule):
    straight = tmp_path / "straight"
    train(config(straight, rule=rule, augment="flip"), progress=False)

    killed = tmp_path / "killed"

    class DiesInEpoch2(Callback):
        def on_step_start(self, trainer, step):
            if step == 8:  # the 3rd step of epoch 2 (6 steps an epoch)
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(killed, rule=rule, augment="flip"), progress=False, callbacks=[DiesInEpoch2()])
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"] == 1
    train(config(killed, rule=rule, augment="flip"), resume=True, progress=False)

    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b, strict=True):
        for key in ("epoch", "train_loss", "train_acc", "val_acc", "test_acc"):
            assert ra[key] == rb[key], key
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(killed)[k]), k


def test_resume_refuses_a_different_config(tmp_path):
    train(config(tmp_path, epochs=1), progress=False)
    with pytest.raises(ValueError, match="config differs in lr 0.001 -> 0.5; use the saved config.yaml"):
        train(config(tmp_path, epochs=1, lr=0.5), resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from creditflow.rules.base import Rule, StepResult

    real_step = Rule.step
    calls = {"n": 0}

    def step(self, x, y):
        calls["n"] += 1
        out = real_step(self, x, y)
        return StepResult(out.loss * float("nan"), out.logits) if calls["n"] > 6 else out

    monkeypatch.setattr(Rule, "step", step)
    with pytest.raises(NonFiniteLoss, match="epoch 2 step 1: training loss is nan; stopped, the checkpoint of epoch 1 is kept"):
        train(config(tmp_path), progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1


@pytest.mark.parametrize("killed_at", ["write_jsonl", "save_checkpoint", "write_summary"])
def test_a_kill_between_the_metrics_and_the_checkpoint_loses_and_repeats_nothing(tmp_path, monkeypatch, killed_at):
    """The two files are one commit: metrics first, then the checkpoint; resume drops a row it never saw."""
    import creditflow.train.trainer as trainer

    straight = tmp_path / "straight"
    train(config(straight), progress=False)
    killed = tmp_path / "killed"
    real = getattr(trainer, killed_at)
    calls = []

    def dies_at_epoch_2(path, *args):
        calls.append(path)
        if len(calls) == 2 or killed_at == "write_summary":  # the second epoch's write (the summary: once)
            raise KeyboardInterrupt  # what SIGKILL leaves: this write and everything after it never happen
        return real(path, *args)

    monkeypatch.setattr(trainer, killed_at, dies_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(config(killed), progress=False)
    monkeypatch.undo()
    train(config(killed), resume=True, progress=False)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, killed)]
    assert [r["epoch"] for r in rows[1]] == [1, 2, 3]
    assert [(r["train_loss"], r["val_acc"], r["test_acc"]) for r in rows[0]] == \
        [(r["train_loss"], r["val_acc"], r["test_acc"]) for r in rows[1]]
    assert json.loads((killed / "summary.json").read_text())["test_acc"] == \
        json.loads((straight / "summary.json").read_text())["test_acc"]


def test_a_loss_that_grows_far_beyond_its_start_stops_at_the_step_it_happened(tmp_path, monkeypatch):
    from creditflow.rules.base import Rule, StepResult
    from creditflow.train import Diverged
    from creditflow.train.trainer import DIVERGENCE_CHECK_EVERY

    real_step = Rule.step
    calls = []

    def step(self, x, y):
        calls.append(1)
        out = real_step(self, x, y)
        return StepResult(out.loss * 1e5, out.logits) if len(calls) == 5 else out  # the 5th step blows up

    monkeypatch.setattr(Rule, "step", step)
    with pytest.raises(Diverged, match=r"epoch 1 step 5: training loss .* is over 10000 times the first step's .*; "
                                       "stopped, no checkpoint was written"):
        train(config(tmp_path, epochs=1, max_steps_per_epoch=3 * DIVERGENCE_CHECK_EVERY), progress=False)
    assert len(calls) == DIVERGENCE_CHECK_EVERY  # seen at the first check, not at the end of the epoch
    calls.clear()
    train(config(tmp_path / "off", epochs=1, divergence_factor=0), progress=False)  # 0: only NaN/Inf stop it


def test_epoch_log_lines_name_rule_and_seed_with_rounded_accuracies(tmp_path, caplog):
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="creditflow.train.trainer"):
        train(config(tmp_path, rule="dfa", seed=2, epochs=1), progress=False)
    line = next(r.getMessage() for r in caplog.records if "epoch 1/1" in r.getMessage())
    assert re.fullmatch(r"dfa seed 2 epoch 1/1: loss \d+\.\d{4}, accuracy train 0\.\d{3} val 0\.\d{3} test 0\.\d{3}",
                        line), line
