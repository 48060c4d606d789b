"""Run folders are claimed by one run at a time and never overwritten by another run."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from creditflow.cli import main
from creditflow.jobs.compare import compare
from creditflow.train import CompareConfig, RunConfig, Strategy, train

TINY = ["--model", "mlp:784-32-10", "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "32",
        "--device", "cpu", "--quiet"]
SMALL = dict(model="mlp:784-32-10", max_steps_per_epoch=3, batch_size=32, device="cpu", lr=1e-3)


def cli(*args):
    return CliRunner().invoke(main, list(args))


def one_line(result):
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_second_run_into_a_busy_folder_refuses_and_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom creditflow.train.runfolder import claim\n"
         f"with claim({str(out)!r}, None):\n    print('held', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line(cli("train", "--out", str(out), *TINY))
        assert f"run folder {out} is in use by another creditflow run (pid {holder.pid})" in line
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli("train", "--out", str(out), *TINY).exit_code == 0  # killed: its lock went with it


def test_another_config_is_refused_naming_the_ways_out(tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--out", str(out), *TINY).exit_code == 0
    before = (out / "checkpoint.pt").read_bytes()
    line = one_line(cli("train", "--out", str(out), *TINY, "--lr", "0.01"))
    assert f"{out} holds another run: its config differs in lr 0.0001 -> 0.01" in line
    assert "--resume" in line and "another --out" in line and "--overwrite" in line
    assert (out / "checkpoint.pt").read_bytes() == before
    line = one_line(cli("train", "--out", str(out), *TINY[:2], "--epochs", "2", *TINY[4:]))
    assert "epochs 1 -> 2" in line and "--extend" in line
    assert cli("train", "--out", str(out), *TINY, "--lr", "0.01", "--overwrite").exit_code == 0
    assert "lr: 0.01" in (out / "config.yaml").read_text()


def test_default_folders_separate_runs_that_differ():
    base = RunConfig(**SMALL)
    assert base.out_dir() == RunConfig(**SMALL).out_dir() == RunConfig(**SMALL, stages=3).out_dir()
    others = [RunConfig(**{**SMALL, "lr": 0.5}), RunConfig(**SMALL, epochs=3), RunConfig(**{**SMALL, "model": "mlp:784-64-10"})]
    assert len({base.out_dir(), *(c.out_dir() for c in others)}) == 4
    assert base.out_dir().name.startswith("bp-fashion-mnist-mini-s0-")
    # an option added in a later version (modelled by a schema with one more field), at its default,
    # keeps an older command's folder, so re-running that command resumes its run

    class Later(RunConfig):
        new_option: int = 7

    assert Later(**SMALL).out_dir() == base.out_dir() != Later(**SMALL, new_option=8).out_dir()


def test_a_failed_start_leaves_no_folder_and_stale_temporaries_go(tmp_path):
    out = tmp_path / "run"
    assert "feedback_scale" in one_line(cli("train", "--rule", "dfa", "--rule-option", "feedback_scale=abc",
                                            "--out", str(out), *TINY))
    assert not out.exists()
    out.mkdir()
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"torn")
    assert cli("train", "--out", str(out), *TINY).exit_code == 0
    assert not list(out.glob(".*.tmp"))


def test_out_that_is_a_file_or_under_one(tmp_path):
    (tmp_path / "f").write_text("x")
    assert one_line(cli("train", "--out", str(tmp_path / "f"), *TINY)) == \
        f"Error: --out {tmp_path / 'f'} is a file, not a folder; choose another --out"
    assert one_line(cli("train", "--out", str(tmp_path / "f" / "run"), *TINY)) == \
        f"Error: cannot create run folder {tmp_path / 'f' / 'run'}: {tmp_path / 'f'} is a file; choose another --out"


def test_extend_continues_a_finished_run_as_if_it_had_been_longer(tmp_path):
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    train(RunConfig(**SMALL, epochs=2, out=str(straight)), progress=False)
    train(RunConfig(**SMALL, epochs=1, out=str(extended)), progress=False)
    with pytest.raises(ValueError, match="cannot resume .*: its config differs in epochs 1 -> 2; .*--extend"):
        train(RunConfig(**SMALL, epochs=2, out=str(extended)), resume=True, progress=False)
    train(RunConfig(**SMALL, epochs=2, out=str(extended)), extend=True, progress=False)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, extended)]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]] and len(rows[1]) == 2
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True)["rule"] for d in (straight, extended))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--extend needs more epochs than the run in .* has \\(2\\), got 2"):
        train(RunConfig(**SMALL, epochs=2, out=str(extended)), extend=True, progress=False)


def test_compare_resume_reads_finished_runs_back_without_training(tmp_path, monkeypatch):
    cfg = CompareConfig(**SMALL, epochs=1, rules=["bp", "dfa"], seeds=1, out=str(tmp_path))
    first = compare(cfg, progress=False)
    trained = []
    real = Strategy.run_epoch
    monkeypatch.setattr(Strategy, "run_epoch", lambda self, *a: trained.append(1) or real(self, *a))
    assert compare(cfg, resume=True, progress=False) == first and trained == []
    line = one_line(cli("compare", "--out", str(tmp_path), "--rules", "bp", "--seeds", "1", *TINY))
    assert "holds another run: its config differs in" in line and "rules ['bp', 'dfa'] -> ['bp']" in line


def test_a_run_made_before_an_option_existed_resumes_when_the_option_is_at_its_default(tmp_path):
    """A key the saved config lacks (an option added since) is no difference while the run asks for
    its default; any other value is named as one."""
    import yaml

    out = tmp_path / "run"
    assert cli("train", "--out", str(out), *TINY).exit_code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["test_every"]  # as written by a version without the option
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["config"]["test_every"]
    torch.save(ckpt, out / "checkpoint.pt")
    line = one_line(cli("train", "--out", str(out), *TINY, "--resume", "--test-every", "best"))
    assert "differs in test_every None -> 'best'" in line
    assert cli("train", "--out", str(out), *TINY, "--resume").exit_code == 0


def test_a_finished_run_is_read_back_even_without_its_checkpoint(tmp_path, monkeypatch, caplog):
    """Committed reports keep no checkpoint: resuming a preset over them must not train them again."""
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, epochs=2, out=str(out))
    first = train(cfg, progress=False)
    (out / "checkpoint.pt").unlink()
    trained = []
    real = Strategy.run_epoch
    monkeypatch.setattr(Strategy, "run_epoch", lambda self, *a: trained.append(1) or real(self, *a))
    with caplog.at_level("INFO", logger="creditflow"):
        assert train(cfg, resume=True, progress=False) == first and trained == []
    assert "holds a finished run (2 epochs): read back" in caplog.text
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(rows[0] + "\n")  # cut after epoch 1: not finished, trained afresh
    train(cfg, resume=True, progress=False)
    assert trained and len((out / "metrics.jsonl").read_text().splitlines()) == 2
