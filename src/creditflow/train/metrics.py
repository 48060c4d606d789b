"""Per-epoch metrics (JSONL) and the run summary chosen on validation accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import write_json, write_text


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file ([] if there is none); a line that is not a JSON object names the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n} is not JSON ({err.msg}); the file is damaged: restore it, or "
                             "start the run again with --overwrite") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n} holds a {type(row).__name__}, expected one row object")
        rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole file atomically: a killed run never leaves half a line."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def select_best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch with the best validation accuracy (earliest on ties); the last epoch if no val split.

    Test accuracy is reported at that epoch, never at the best test epoch.
    """
    if not rows:
        raise ValueError("no epochs recorded")
    if rows[0].get("val_acc") is None:
        return rows[-1]
    return max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))


def summarize(rows: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    best = select_best(rows)
    steady = rows[1:] or rows  # epoch 1 carries warm-up costs
    return {
        "rule": config["rule"], "model": config["model"], "dataset": config["dataset"], "seed": config["seed"],
        "epochs": len(rows),
        "best_epoch": best["epoch"],
        "val_acc": best.get("val_acc"),
        "test_acc": best["test_acc"],
        "final_test_acc": rows[-1]["test_acc"],
        "seconds_per_step": sum(r["seconds_per_step"] for r in steady) / len(steady),
        "saved_for_backward_bytes": rows[-1].get("saved_for_backward_bytes"),
        "peak_memory_bytes": max((r.get("peak_memory_bytes") or 0) for r in rows) or None,
        "selection": "best validation epoch" if best.get("val_acc") is not None else "last epoch (no validation split)",
    }


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    write_json(path, summary)
