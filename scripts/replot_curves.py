"""Redraw every committed training-curve figure from the committed metrics, in the current style.

    PYTHONPATH=src python scripts/replot_curves.py [docs/reproduction]

A cell folder (``<preset report>/<cell>/``) holds ``<column>/seed<k>/metrics.jsonl``: its
``curves.png`` gets one colour per column, seeds as mean and band; each run folder's own
``curves.png`` is redrawn from its ``metrics.jsonl``. Nothing is re-trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

from creditflow.report import plot_curves
from creditflow.train.metrics import read_jsonl


def main(root: Path) -> None:
    redrawn = 0
    for figure in sorted(root.rglob("curves.png")):
        folder = figure.parent
        own = folder / "metrics.jsonl"
        if own.is_file():  # a run folder
            config = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
            rule = next((line.split(":", 1)[1].strip() for line in config.splitlines() if line.startswith("rule:")),
                        folder.parent.name)
            plot_curves({rule: read_jsonl(own)}, figure, f"{rule}, {folder.parent.name}/{folder.name}")
        else:  # a cell: columns of seeds
            runs = {c.name: [read_jsonl(s / "metrics.jsonl") for s in sorted(c.glob("seed*"))
                             if (s / "metrics.jsonl").is_file()]
                    for c in sorted(folder.iterdir()) if c.is_dir()}
            runs = {k: v for k, v in runs.items() if v}
            if not runs:
                continue
            report = folder.parent.name
            plot_curves(runs, figure, f"{report} {folder.name}")
        redrawn += 1
    print(f"redrew {redrawn} figures under {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reproduction"))
