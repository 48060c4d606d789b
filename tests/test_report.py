import pytest

from creditflow.report import csv_text, fmt, fmt_mean_std, markdown_table, save_figure


def test_markdown_table_keeps_an_empty_corner_cell_and_formats_values():
    assert markdown_table(["", "a", 1], [["x", fmt(None), fmt(0.123456)], ["y", fmt(2.0, ".2f", suffix="x"), 0]]) == [
        "| | a | 1 |", "|---|---|---|", "| x | n/a | 0.1235 |", "| y | 2.00x | 0 |"]


def test_mean_std_skips_missing_values():
    assert fmt_mean_std([0.5, None, 0.7]) == "0.6000 ± 0.1414"
    assert fmt_mean_std([0.5], ".4g", ".2g") == "0.5"  # one value: no spread claimed
    assert fmt_mean_std([None]) == "n/a"
    assert csv_text(["a", "b"], [[1, None]]) == "a,b\r\n1,\r\n"


def test_save_figure_is_atomic_and_the_same_bytes_every_time(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    files = []
    for name in ("a.svg", "b.svg", "a.png", "b.png"):
        fig = Figure(figsize=(2, 2))
        fig.subplots().plot([0, 1], [1, 0])
        save_figure(fig, tmp_path / "out" / name)
        files.append((tmp_path / "out" / name).read_bytes())
    assert files[0] == files[1] and files[2] == files[3] and files[2][:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "a.svg", "b.png", "b.svg"]


def test_curves_take_seeds_as_one_rule_mean_and_band(tmp_path):
    from creditflow.report import _across_seeds, plot_curves

    seed0 = [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_acc": 0.4, "test_acc": None},
             {"epoch": 2, "train_loss": 0.5, "train_acc": 0.7, "val_acc": 0.6, "test_acc": 0.6}]
    seed1 = [{"epoch": 1, "train_loss": 3.0, "train_acc": 0.3, "val_acc": 0.2, "test_acc": 0.2}]
    assert _across_seeds([seed0, seed1], "train_loss") == ([1], [2.0], [1.0], [3.0])  # epochs both reached
    assert _across_seeds([seed0, seed1], "test_acc") == ([], [], [], [])  # no epoch with a test of both
    assert plot_curves({"bp": [seed0, seed1], "dfa": seed0}, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 0
