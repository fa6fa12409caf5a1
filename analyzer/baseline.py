"""The run as trained, for the counterfactual replays (replay, hybrid) to start from and end on.

A stage's effect compares training with the stage skipped against training without the skip,
from states that share everything before the stage. Retraining that baseline costs a forward
and backward pass per step. Where the training replay retraces the recording bit for bit, the
baseline *is* the recording, and the trajectory replay (`run.replay`: one optimizer step per
step, from the recorded gradients, no forward pass) rebuilds any of its states exactly. So the
baseline is retrained over a verification window from the first state asked for; when the
window ends on the recorded θ and optimizer state bit for bit, the recording serves every later
state. Otherwise (another dtype, device or kernel, nondeterminism) the baseline stays retrained
throughout, and the drift between replay and recording cancels between a stage's two ends.
"""

from __future__ import annotations

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
                 points: set[int], bar=None) -> None:
        self.run, self.batches, self.threshold, self.bar = run, batches, threshold, bar
        self.dynamics = Dynamics(run)
        named = dict(batches.model.named_parameters())
        self.params = [named[n].detach().clone().requires_grad_(True) for n in run.param_names]
        self.optimizer = build_optimizer(run, self.params)
        self.exact = _replayable_exactly(run, batches.dtype)
        if self.exact:  # the recorded state, bit for bit, for the window to start from
            run.replay.seek(first)
            restore(self.params, self.optimizer[0], snapshot(run.replay.params,
                                                             run.replay.optimizer))
        else:
            load_state(run, self.optimizer[0], self.params, first, batches.dtype)
        self.position, self.points, self.kept = first, points, {}
        self.verify_until = min(first + VERIFY_STEPS, run.n_steps)
        self.recorded = False  # whether the recording stands in (after a verified window)
        self.verified_steps = 0

    def state(self, t: int) -> Snapshot:
        """θ and the optimizer state before step t."""
        if self.recorded:
            self.run.replay.seek(t)
            return snapshot(self.run.replay.params, self.run.replay.optimizer)
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
        if self.recorded:
            self.run.replay.seek(self.run.n_steps)
            values = self.run.replay.params
        else:
            values = self.params
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
                self.verified_steps = self.position
                self.recorded = self._matches_recording()
                if self.recorded and self.bar is not None and self.bar.total:
                    self.bar.total -= self.run.n_steps - self.position
                    self.bar.refresh()

    def _matches_recording(self) -> bool:
        """Whether the retrained θ and optimizer state equal the recorded ones bit for bit."""
        self.run.replay.seek(self.position)
        recorded = snapshot(self.run.replay.params, self.run.replay.optimizer)
        retrained = snapshot(self.params, self.optimizer[0])
        return _equal(recorded, retrained)


def _replayable_exactly(run: Run, dtype: torch.dtype) -> bool:
    """Whether the recording can stand in at all: format v2 with every tensor's exact
    gradients (the trajectory replay rebuilds each state) in the replay's dtype."""
    if run.format_version < 2 or not run.exact_gradients or not run.n_steps:
        return False
    replay = run.replay
    return all(replay.recorded) and all(p.dtype == dtype for p in replay.params)


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
