"""Figures of analysis results (matplotlib, rendered off-screen to PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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


def training_curves(steps: pa.Table, stages: list[tuple[str, int, int]], path: str | Path,
                    title: str = "Training") -> Path:
    """Loss (log scale) and every logged norm metric against the step, with the stages
    shaded; accuracies get a panel of their own below, drawn only when some are logged.
    `stages`: (name, first step, last step)."""
    plt = _pyplot()
    rows = steps.sort_by("step").to_pylist()
    step = np.array([r["step"] for r in rows])
    metrics = sorted({k for r in rows for k, _ in (r["metrics"] or [])})
    accuracies = [m for m in metrics if "accuracy" in m]
    if accuracies:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), dpi=120, sharex=True)
        bottom.set_ylabel("accuracy")
    else:
        fig, top = plt.subplots(figsize=(7, 3), dpi=120)
        bottom = None
    panels = [ax for ax in (top, bottom) if ax is not None]
    loss = np.array([np.nan if r["loss"] is None else r["loss"] for r in rows])
    top.semilogy(step, loss, color="black", linewidth=1, label="training loss")
    top.set_ylabel("loss")
    other = top.twinx() if len(accuracies) < len(metrics) else None
    for k, name in enumerate(metrics):
        values = np.array([dict(r["metrics"] or []).get(name, np.nan) for r in rows])
        axis = bottom if name in accuracies else other
        axis.plot(step, values, linewidth=1, label=name, color=f"C{k + 1}")
        if axis is other:
            other.set_ylabel(name)
    panels[-1].set_xlabel("step")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, first, last) in enumerate(stages):
        for ax in panels:
            ax.axvspan(first, last + 1, color=colors[k % len(colors)], alpha=0.12, linewidth=0)
        panels[-1].text((first + last) / 2, 0.02, name, ha="center", va="bottom", fontsize=8,
                        transform=panels[-1].get_xaxis_transform())
    top.legend(fontsize=8, loc="upper left")
    if other is not None:
        other.legend(fontsize=8, loc="upper right")
    if bottom is not None:
        bottom.legend(fontsize=8, loc="center right")
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def similarity_heatmaps(table: pa.Table, path: str | Path, title: str) -> Path:
    """Heatmaps of the normalised similarity of test points (in test_id order): one column
    per layer, one row for the whole run and one per stage when the table has stages."""
    plt = _pyplot()
    layers = list(dict.fromkeys(table["layer"].to_pylist()))
    stages = list(dict.fromkeys(table["stage"].to_pylist())) if "stage" in \
        table.column_names else [None]
    fig, axes = plt.subplots(len(stages), len(layers), squeeze=False, dpi=120,
                             figsize=(2.3 * len(layers), 2.4 * len(stages) + 0.4))
    for i, stage in enumerate(stages):
        for ax, layer in zip(axes[i], layers):
            where = pc.field("layer") == layer
            if "stage" in table.column_names:
                where = where & (pc.field("stage").is_null() if stage is None
                                 else pc.field("stage") == stage)
            part = table.filter(where).sort_by([("test_id", "ascending"),
                                                ("other_id", "ascending")])
            n = int(np.sqrt(part.num_rows))
            ax.imshow(part["normalized"].to_numpy().reshape(n, n), cmap="RdBu_r", vmin=-1,
                      vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(layer, fontsize=9)
            if ax is axes[i][0]:
                ax.set_ylabel(stage or "whole run", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def bar_chart(labels: list[str], values: list[float], path: str | Path, title: str,
              ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(labels) + 1), 3.2), dpi=120)
    ax.bar(np.arange(len(labels)), values, color="#4c72b0")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
