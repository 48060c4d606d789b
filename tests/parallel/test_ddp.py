"""Data parallelism: 2 processes equal one process on the concatenated batch; every rule runs; resume."""

import json
import multiprocessing
import time

import pytest
import torch
from click.testing import CliRunner

import creditflow as cf
from creditflow.cli import main
from creditflow.diagnostics import AlignmentProbe, measure
from creditflow.parallel import WorkerFailed, launch
from creditflow.parallel.ddp import DataParallel
from creditflow.registry import RULES
from creditflow.train import Callback, RunConfig, train
from tests.reference import tiny_associated, tiny_cnn, tiny_mlp

#: the rules that do not equal one process on the whole batch, each with its documented reason (docs/parallel.md)
NOT_EXACT = {"dtp": "the top target uses the gradient of the shard's mean loss, and the noise is drawn per shard"}
#: every other registered rule: the same parameters as one process on the whole batch (float64: to 1e-12)
EXACT = [name for name in cf.rules.available() if name not in NOT_EXACT]
#: every registered rule, and the variants that train tensors outside the optimizer
SPECS = [*cf.rules.available(), "ltas:update_first=true", "las:update_first=true", "dtp:inverse_first=true"]
SIZES = (8, 8, 7)  # global batches; 7 is cut 4 + 3: shard-size weighting


def build(spec, kind="mlp"):
    name, options = cf.rules.parse_spec(spec)
    associated = RULES.get(name).builder.model_refusal(tiny_mlp()) is not None and name != "dtp"
    if associated:
        model = tiny_associated("mlp" if kind == "mlp" else "cnn", batch_norm=kind == "cnn-bn")
    else:
        model = tiny_mlp() if kind == "mlp" else tiny_cnn(batch_norm=kind == "cnn-bn")
    rule = cf.rules.build(name, model, num_classes=3, **options)
    opt = torch.optim.SGD(rule.param_groups(local_lr=0.05), lr=0.1, momentum=0.9)
    return rule, opt


def global_batches(shape):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in SIZES]


def state(rule):
    return {k: v.detach().clone() for k, v in rule.state_dict().items() if isinstance(v, torch.Tensor)}


def ddp_steps(rank, world_size, runs):
    """Each (rule, model kind): 3 data-parallel steps (DFA also measures alignment); every rank's state."""
    torch.set_num_threads(1)
    sync = DataParallel()
    results = {}
    for spec, kind in runs:
        rule, opt = build(spec, kind)
        sync.prepare(rule)
        sync.seed(0)
        for i, (x, y) in enumerate(global_batches(rule.model.input_shape)):
            x, y = sync.shard(x, y)
            if i == 0 and spec == "dfa":  # the probe records this rank's signals; the sync is outside it
                with AlignmentProbe(rule) as probe:
                    rule.step(x, y)
                probe_result = probe.alignment(x, y)
            else:
                rule.step(x, y)
            sync.after_step()
            opt.step()
            opt.zero_grad()
        sync.sync_buffers()
        results[spec if kind == "mlp" else f"{spec}/{kind}"] = state(rule)
        if spec == "dfa" and kind == "mlp":
            results["dfa/probe"] = probe_result.block_cosine
            results["dfa/measure"] = measure(rule, x, y).block_cosine  # after DDP steps, on the trained rule
    return results


def one_process(spec, kind):
    rule, opt = build(spec, kind)
    for x, y in global_batches(rule.model.input_shape):
        rule.step(x, y)
        opt.step()
        opt.zero_grad()
    return state(rule)


@pytest.fixture(scope="module")
def mlp_runs():  # one launch for every test of rules (process start-up is most of the time)
    runs = [(spec, "mlp") for spec in SPECS] + [("bp", "cnn-bn"), ("dfa", "cnn-bn")]
    return launch(ddp_steps, 2, (runs,), timeout_s=60)


def test_two_processes_equal_one_process_on_the_whole_batch(mlp_runs):
    rank0, _ = mlp_runs
    for spec in EXACT:
        ref = one_process(spec, "mlp")
        assert ref.keys() == rank0[spec].keys()
        for k, v in ref.items():
            torch.testing.assert_close(rank0[spec][k], v, rtol=1e-10, atol=1e-12, msg=f"{spec}: {k}")


def test_every_rule_runs_and_ranks_stay_identical(mlp_runs):
    rank0, rank1 = mlp_runs
    assert set(SPECS) <= rank0.keys()
    for spec in SPECS:
        for k, v in rank0[spec].items():
            assert torch.isfinite(v.double()).all(), f"{spec}: {k}"
            assert torch.equal(v, rank1[spec][k]), f"{spec}: {k} differs between ranks"
        init = state(build(spec)[0])
        assert any(not torch.equal(v, init[k]) for k, v in rank0[spec].items()), f"{spec} did not train"


def test_alignment_tools_work_under_ddp(mlp_runs):
    for rank in mlp_runs:  # the probe on each rank's step; measure() on the trained rule
        for key in ("dfa/probe", "dfa/measure"):
            cosines = rank[key]
            assert len(cosines) == 2 and all(-1 <= c <= 1 for c in cosines), (key, cosines)


def test_batchnorm_statistics_are_averaged_and_ranks_agree(mlp_runs):
    rank0, rank1 = mlp_runs
    for spec in ("bp/cnn-bn", "dfa/cnn-bn"):
        for k, v in rank0[spec].items():
            assert torch.equal(v, rank1[spec][k]), f"{spec}: {k}"
        assert any("running_mean" in k for k in rank0[spec])


TINY = dict(model="mlp:784-32-10", epochs=2, batch_size=32, max_steps_per_epoch=5, lr=1e-3,
            eval_batch_size=1000, device="cpu", augment="flip")


class KillRank1InEpoch2(Callback):
    """Rank 1 is killed (SIGKILL) when epoch 2 starts, after rank 0's checkpoint of epoch 1."""

    def on_epoch_start(self, trainer, epoch):
        import os

        import torch.distributed as dist

        if epoch == 1:
            dist.barrier()  # rank 0 has written epoch 1's files
            if trainer.strategy.rank == 1:
                os.kill(os.getpid(), 9)


def test_killed_run_fails_fast_and_resumes_to_the_single_process_result(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    one = train(RunConfig(**TINY, out=str(straight)), progress=False)
    cfg = RunConfig(**TINY, out=str(killed), parallel="ddp", nproc=2)
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match="rank 1 was killed by signal SIGKILL"):
        train(cfg, progress=False, callbacks=[KillRank1InEpoch2()])
    assert time.monotonic() - start < 60 and not multiprocessing.active_children()
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not list(killed.glob(".*.tmp"))  # no half-written file

    result = CliRunner().invoke(main, ["train", "--config", str(killed / "config.yaml"), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for a, b in zip(rows, ref, strict=True):
        for key in ("train_loss", "train_acc", "val_acc", "test_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    a = torch.load(killed / "checkpoint.pt", weights_only=False)["rule"]
    b = torch.load(straight / "checkpoint.pt", weights_only=False)["rule"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["test_acc"] == pytest.approx(one["test_acc"], abs=1e-3)


def test_batch_size_must_split_evenly(tmp_path):
    with pytest.raises(ValueError, match="divisible by --nproc 2"):
        train(RunConfig(**{**TINY, "batch_size": 33}, out=str(tmp_path), parallel="ddp", nproc=2))
