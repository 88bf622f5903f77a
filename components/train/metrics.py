"""A stage's metrics.jsonl (one JSON line per step, written by components/train/engine.py):
cut back to a resumed step, summarized, drawn (loss.png) and written as CSV for `dvc plots`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def cut(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` (what the resumed checkpoint had seen)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def summarize(metrics_path: Path, params: int, val_loss: float | None) -> dict[str, Any]:
    """The stage's summary: steps, the mean loss and tokens/s of the last 10 steps, the newest
    validation loss, the parameter count."""
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    tail = rows[-10:]
    if val_loss is None:  # resumed after the last evaluation (or at the end): the logged one
        val_loss = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
    return {"steps": rows[-1]["step"] if rows else 0, "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "val_loss": val_loss, "params": params,
            "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / len(tail)}


def plot_data(metrics_path: Path, folder: Path) -> None:
    """The training curves as data files that `dvc plots show` / `dvc plots diff` draw and compare
    across runs (dvc.yaml's `plots:`): train.csv (every step: loss, lr, tokens/s and the stage's
    own numbers, such as GRPO's reward) and val.csv (the steps with a validation loss)."""
    import csv

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k != "val_loss" and all(isinstance(r.get(k, 0.0), (int, float)) for r in rows)]
    for name, cols, chosen in (("train.csv", keys, rows),
                               ("val.csv", ["step", "val_loss"], [r for r in rows if "val_loss" in r])):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: (int(v) if isinstance(v, bool) else v) for k, v in r.items()} for r in chosen)


def plot_losses(metrics_path: Path, png: Path) -> None:
    """loss.png: training loss per step, validation loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
