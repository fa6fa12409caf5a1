"""Figures of analysis results (matplotlib, rendered off-screen to PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def stage_effects_chart(table: pa.Table, path: str | Path, title: str | None = None) -> Path:
    """Grouped bars: per stage, the mean effect over test points of each method, with the
    standard error as whiskers. Returns the PNG path."""
    plt = _pyplot()
    rows = table.to_pylist()
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(stages)), 3.6), dpi=120)
    for k, method in enumerate(methods):
        values = [[r["effect"] for r in rows if r["method"] == method and r["stage"] == s]
                  for s in stages]
        means = [float(np.mean(v)) if v else np.nan for v in values]
        errors = [float(np.std(v) / np.sqrt(len(v))) if len(v) > 1 else 0.0 for v in values]
        ax.bar(np.arange(len(stages)) + (k - (len(methods) - 1) / 2) * width, means, width,
               yerr=errors, capsize=2, label=method)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(np.arange(len(stages)), stages, rotation=30, ha="right")
    ax.set_ylabel("Δf if the stage had not run\n(mean over test points)")
    ax.set_title(title or "Stage accountability")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
