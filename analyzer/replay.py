"""Replay: the ground truth of stage accountability (METHODS.md §4).

Training re-runs (analyzer/retraining.py) with each stage skipped (no update, no state change,
no step-count tick), from the baseline's state before the stage (analyzer/baseline.py: the
recording itself where the retraining retraces it bit for bit, else a retrained baseline that
shares everything before the stage). Δf_S = f(θ_N^{−S}) − f(θ_N^{baseline}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from attrib.analyzer.baseline import Baseline
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.retraining import clip_threshold, replay_step, state_norm
from attrib.analyzer.run import Run
from attrib.analyzer.stage_spec import Stage
from attrib.analyzer.training import TrainingBatches
from attrib.analyzer.trajectory import build_optimizer, restore


@dataclass
class ReplayResult:
    effects: np.ndarray  # (n_stages, n_test)
    drift: float  # ‖θ_N^{baseline} − θ_N‖ / ‖θ_N − θ_start‖: how faithfully the replay retrains
    max_grad_norm: float | None  # the clipping threshold applied
    baseline: str  # "recorded" (verified bit for bit over the first steps) or "retrained"


def replay_effects(run: Run, batches: TrainingBatches, stages: list[Stage],
                   evaluate: Callable[[dict], np.ndarray], max_grad_norm: float | str | None
                   = "recorded", progress: bool = True, gradients_exact: bool = False
                   ) -> ReplayResult:
    """Δf_S for every stage by retraining (see the module docstring). `gradients_exact`: the
    rebuilt gradients matched the recorded ones bit for bit where checked (a condition for the
    recording to stand in for the baseline)."""
    model = batches.model
    named = dict(model.named_parameters())
    params = [named[n] for n in run.param_names]
    threshold = clip_threshold(run) if max_grad_norm == "recorded" else max_grad_norm
    first, n = min(s.start for s in stages), run.n_steps
    optimizer, groups = build_optimizer(run, params)
    total = sum(n - s.stop for s in stages) + n - first
    with torch.random.fork_rng(devices=[]), progress_bar(total=total, progress=progress,
                                                         desc="replay", unit="step") as bar:
        baseline = Baseline(run, batches, threshold, first, {s.start for s in stages}, bar,
                            gradients_exact)
        dynamics = baseline.dynamics  # the run's optimizer settings, read once
        skipped = []
        for stage in stages:
            restore(params, optimizer, baseline.state(stage.start))
            for s in range(stage.stop, n):
                replay_step(run, batches, dynamics, (optimizer, groups), params, s, threshold)
                bar.update(1)
            skipped.append(evaluate({name: p.detach().clone()
                                     for name, p in zip(run.param_names, params)}))
        final = baseline.final()
    f_baseline = evaluate(final)
    recorded, start = run.reconstruct(n), run.reconstruct(first)
    drift = state_norm({k: final[k] - recorded[k].to(final[k].dtype) for k in final}) / max(
        state_norm({k: recorded[k] - start[k] for k in recorded}), 1e-300)
    return ReplayResult(np.stack(skipped) - f_baseline, drift, threshold,
                        "recorded" if baseline.recorded else "retrained")
