"""The run as trained, for the counterfactual replays (replay, hybrid) to start from and end on.

A stage's effect compares training with the stage skipped against training without the skip,
from states that share everything before the stage. Retraining that baseline costs a forward
and backward pass per step. Where the training replay retraces the recording bit for bit, the
baseline *is* the recording, and the trajectory replay (`run.replay`: one optimizer step per
step, from the recorded gradients, no forward pass) rebuilds any of its states exactly.

So the recording stands in only when everything says the retraining would retrace it: the
rebuilt gradients equal the recorded ones bit for bit at the checked steps (first, middle,
last: the caller's gradient check), no parameter was changed outside the optimizer (the
recorded fingerprints), no step after the first window was clipped or would be clipped by
the threshold given, and two windows of VERIFY_STEPS retrained steps, one from the first state
asked for and one ending at the run's last step, end on the recorded θ and optimizer state bit
for bit. Otherwise (another dtype, device, kernel, data or threshold; nondeterminism) the
baseline stays retrained throughout, and drift between replay and recording cancels between a
stage's two ends.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch

from attrib.analyzer.dynamics import Dynamics
from attrib.analyzer.retraining import load_state, replay_step
from attrib.analyzer.run import Run
from attrib.analyzer.training import TrainingBatches
from attrib.analyzer.trajectory import Snapshot, build_optimizer, restore, snapshot

VERIFY_STEPS = 64  # training steps retrained before the recording may stand in for them


class Baseline:
    """The baseline's state before any step t ≥ `first`, asked for in any order among
    `points` (kept when the baseline is retrained) or in increasing order otherwise. `bar`
    counts the retrained steps: N − first, less what the recording stands in for."""

    def __init__(self, run: Run, batches: TrainingBatches, threshold: float | None, first: int,
                 points: set[int], bar=None, gradients_exact: bool = False) -> None:
        self.run, self.batches, self.threshold, self.bar = run, batches, threshold, bar
        self.dynamics = Dynamics(run)
        named = dict(batches.model.named_parameters())
        self.params = [named[n].detach().clone().requires_grad_(True) for n in run.param_names]
        self.optimizer = build_optimizer(run, self.params)
        self.verify_until = min(first + VERIFY_STEPS, run.n_steps)
        self.exact = (gradients_exact and _replayable_exactly(run, batches.dtype)
                      and not _edited(run, first)
                      and not _clipped(run, self.verify_until, threshold))
        if self.exact:  # the recorded state, bit for bit, for the window to start from
            restore(self.params, self.optimizer[0], self._recorded(first))
        else:
            load_state(run, self.optimizer[0], self.params, first, batches.dtype)
        self.position, self.points, self.kept = first, points, {}
        self.recorded = False  # whether the recording stands in (after a verified window)

    def state(self, t: int) -> Snapshot:
        """θ and the optimizer state before step t."""
        if self.recorded:
            return self._recorded(t)
        self._retrain_to(t)
        if self.recorded:
            return self.state(t)
        if t == self.position:
            self.kept.setdefault(t, snapshot(self.params, self.optimizer[0]))
        return self.kept[t]

    def final(self) -> dict[str, torch.Tensor]:
        """θ_N of the baseline."""
        if not self.recorded:
            self._retrain_to(self.run.n_steps)
        values = self._recorded(self.run.n_steps)[0] if self.recorded else self.params
        return {n: p.detach().clone() for n, p in zip(self.run.param_names, values)}

    def _retrain_to(self, t: int) -> None:
        while self.position < t and not self.recorded:
            if self.position in self.points:
                self.kept.setdefault(self.position, snapshot(self.params, self.optimizer[0]))
            replay_step(self.run, self.batches, self.dynamics, self.optimizer, self.params,
                        self.position, self.threshold)
            self.position += 1
            if self.bar is not None:
                self.bar.update(1)
            if self.exact and self.position == self.verify_until:
                self.recorded = (_equal(self._recorded(self.position),
                                        snapshot(self.params, self.optimizer[0]))
                                 and self._last_window_matches())
                if self.recorded and self.bar is not None and self.bar.total:
                    self.bar.total -= self.run.n_steps - self.position
                    self.bar.refresh()

    def _recorded(self, t: int) -> Snapshot:
        """The recording's θ and optimizer state before step t (the trajectory replay's)."""
        self.run.replay.seek(t)
        return snapshot(self.run.replay.params, self.run.replay.optimizer)

    def _last_window_matches(self) -> bool:
        """The last VERIFY_STEPS steps retrained from the recorded state before them end on
        the recorded state after the last step (what a late difference would change)."""
        n = self.run.n_steps
        start = max(self.position, n - VERIFY_STEPS)
        if start >= n:
            return True
        params = [p.detach().clone().requires_grad_(True) for p in self.params]
        optimizer = build_optimizer(self.run, params)
        restore(params, optimizer[0], self._recorded(start))
        for s in range(start, n):
            replay_step(self.run, self.batches, self.dynamics, optimizer, params, s,
                        self.threshold)
        return _equal(self._recorded(n), snapshot(params, optimizer[0]))


def _replayable_exactly(run: Run, dtype: torch.dtype) -> bool:
    """Whether the recording can stand in at all: format v2 with every tensor's exact
    gradients (the trajectory replay rebuilds each state) in the replay's dtype."""
    if run.format_version < 2 or not run.exact_gradients or not run.n_steps:
        return False
    replay = run.replay
    return all(replay.recorded) and all(p.dtype == dtype for p in replay.params)


def _edited(run: Run, first: int) -> bool:
    """Whether θ changed outside the optimizer between any two steps from `first` on: the
    fingerprint training took after a step differs from the one before the next."""
    prints = run.fingerprints(first)
    after, before = prints[:-1, 1], prints[1:, 0]
    both = ~(np.isnan(after) | np.isnan(before))
    return bool((after[both] != before[both]).any())


def _clipped(run: Run, start: int, threshold: float | None) -> bool:
    """Whether a step from `start` on was clipped, or would be under `threshold`: clipping
    rescales by a threshold the analysis may only know to rounding, and a clipped step the
    windows did not cover is where the retraining could leave the recording."""
    steps = run.steps.filter(pc.greater_equal(run.steps["step"], start))
    clipped = steps.column("clip_factor").to_numpy(zero_copy_only=False) < 1
    if threshold is not None:
        norms = steps.column("grad_norm").to_numpy(zero_copy_only=False)
        clipped |= norms > threshold * (1 - 1e-6)
    return bool(clipped.any())


def _equal(a: Snapshot, b: Snapshot) -> bool:
    (values_a, state_a), (values_b, state_b) = a, b
    if not all(torch.equal(x, y) for x, y in zip(values_a, values_b)):
        return False
    entries_a, entries_b = state_a["state"], state_b["state"]
    if entries_a.keys() != entries_b.keys():
        return False
    for key, entry in entries_a.items():
        other = entries_b[key]
        if entry.keys() != other.keys():
            return False
        for name, value in entry.items():
            same = torch.equal(value, other[name]) if isinstance(value, torch.Tensor) \
                else value == other[name]
            if not same:
                return False
    return True
