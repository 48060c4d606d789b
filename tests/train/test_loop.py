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
    assert all(0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["seconds_per_step"] > 0 for r in rows)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_acc"] == select_best(rows)["test_acc"]


def test_test_accuracy_is_taken_at_the_best_validation_epoch():
    rows = [{"epoch": 1, "val_acc": 0.5, "test_acc": 0.9}, {"epoch": 2, "val_acc": 0.7, "test_acc": 0.6},
            {"epoch": 3, "val_acc": 0.7, "test_acc": 0.95}]
    assert select_best(rows)["epoch"] == 2  # not the best test epoch, and the earliest on ties
    assert select_best([{"epoch": 1, "val_acc": None, "test_acc": 0.3},
                        {"epoch": 2, "val_acc": None, "test_acc": 0.2}])["epoch"] == 2


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
    with pytest.raises(NonFiniteLoss, match="epoch 2: training loss is nan"):
        train(config(tmp_path), progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1
