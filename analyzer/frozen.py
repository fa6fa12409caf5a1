"""Frozen-gradient stage estimator (METHODS.md §4): later gradients held at their recorded
values, the optimizer's own dynamics propagated exactly from the counterfactual state.

No forward or backward pass: one walk over the stored gradients advances, for every stage at
once, a copy of θ and the optimizer buffers that skipped the stage. Momentum / Nesterov,
coupled and decoupled weight decay, the learning-rate schedule and Adam's first moment follow
the counterfactual state; Adam's normaliser D_s is held at its recorded value while the first
moment's bias correction uses the skip-shifted step count. It ignores how later gradients
respond to the changed parameters, which is exactly where it fails: early stages, whose
effects later training heals.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from attrib.analyzer.dynamics import Dynamics, initial_buffers, optimizer_update, predicted_updates
from attrib.analyzer.run import Run
from attrib.analyzer.stage_spec import Stage


def frozen_effects(run: Run, stages: list[Stage], evaluate: Callable[[dict], np.ndarray],
                   dtype: torch.dtype = torch.float64) -> np.ndarray:
    """(n_stages, n_test): f(θ_N^{−S}) − f(θ_N) with θ_N^{−S} from held gradients."""
    dynamics = Dynamics(run)
    skipped = [dynamics.active[s.start:s.stop].sum(0) for s in stages]
    runs: dict[int, tuple[dict, dict]] = {}  # stage → (θ', buffers') once the stage began

    def begin(k: int, buffers: dict) -> None:
        theta = {n: t.to(dtype) for n, t in run.reconstruct(stages[k].start).items()}
        runs[k] = (theta, dict(buffers))

    buffers = initial_buffers(run, dtype)
    for k, stage in enumerate(stages):
        if stage.start == 0:
            begin(k, buffers)
    for check in predicted_updates(run, dtype, buffers=buffers):
        s = check.step
        for k, stage in enumerate(stages):
            if k not in runs or s < stage.stop:
                continue
            theta, held = runs[k]
            for j, name in enumerate(run.param_names):
                if not dynamics.active[s, j]:
                    continue
                rule = dynamics.rule(s, j)
                theta[name] = theta[name] + optimizer_update(
                    rule, check.grads[name], theta[name], check.v.get(name), held, name,
                    moment_count=rule.count - int(skipped[k][j]))
        for k, stage in enumerate(stages):
            if stage.start == s + 1:
                begin(k, check.buffers)
    final = evaluate({n: t.to(dtype) for n, t in run.reconstruct(run.n_steps).items()})
    return np.stack([evaluate(runs[k][0]) - final for k in range(len(stages))])
