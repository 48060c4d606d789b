"""The leading table of docs/reproduction/README.md, from the committed reports' results.json.

Every cell of every ``docs/reproduction/<preset>-<budget>/`` folder whose budget is given (default
``cpu``): our test accuracy (mean ± sample std over seeds, at the best validation epoch) beside the
paper's number, the difference in points, and the command that made it. Numbers are read, never
typed: run this after committing a report and paste its output (or ``--write`` it in place
between the README's ``<!-- table -->`` markers).

    python scripts/reproduction_table.py [--folders cpu,cpu-long,cpu-he,cpu-100,cpu-head,cpu-w32,cpu-seeds] [--write]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from creditflow.jobs.reproduce import load_preset
from creditflow.report import fmt, fmt_mean_std, markdown_row, markdown_table

ROOT = Path(__file__).resolve().parents[1] / "docs" / "reproduction"
MARKERS = ("<!-- table -->", "<!-- /table -->")


def rows(suffixes: list[str]) -> list[str]:
    lines = markdown_table(["preset", "cell", "column", "ours", "paper", "ours - paper (points)", "command"], [])
    folders = sorted({f for suffix in suffixes for f in ROOT.glob(f"*-{suffix}") if (f / "results.json").is_file()})
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        preset = load_preset(results["preset"])
        columns = sorted({c for e in results["cells"].values() for c in e.get("summaries", {})},
                         key=preset.rules.index)
        # re-runs of some columns (-he), or of some columns with more seeds (-seeds), say so in the command
        only = f" --columns {','.join(columns)}" if folder.name.endswith(("-he", "-seeds")) else ""
        if folder.name.endswith("-seeds"):
            seeds = max(len(runs) for e in results["cells"].values() for runs in e.get("summaries", {}).values())
            only = f" --seeds {seeds}{only}"
        command = f"`creditflow reproduce {preset.name} --budget {results['budget']}{only} --data-dir DIR`"
        for cell in preset.cells:
            entry = results["cells"].get(cell.id, {})
            for column, runs in entry.get("summaries", {}).items():
                accs = [r["test_acc"] for r in runs if r.get("test_acc") is not None]
                if not accs:
                    continue
                paper = cell.paper.get(column)
                gap = "–" if paper is None else f"{100 * (statistics.fmean(accs) - paper):+.2f}"
                ours = fmt_mean_std(accs) + f" ({len(accs)} seed{'s' if len(accs) > 1 else ''})"
                lines.append(markdown_row([f"[{preset.name}]({folder.name}/report.md)", cell.id, column, ours,
                                           fmt(paper, ".4f"), gap, command]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", default="cpu,cpu-long,cpu-he,cpu-100,cpu-head,cpu-w32,cpu-seeds",
                        help="comma-separated endings of the report folders to list (<preset>-<ending>)")
    parser.add_argument("--write", action="store_true", help="replace the table in docs/reproduction/README.md")
    args = parser.parse_args()
    table = "\n".join(rows(args.folders.split(",")))
    if not args.write:
        print(table)
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    main()
