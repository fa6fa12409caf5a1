"""Format v2's trajectory: θ_s, Δθ_s and the optimizer state, rebuilt by replaying torch.optim.

A v2 run stores the gradient each step consumed, the per-step hyperparameters, and at every
checkpoint θ with the optimizer's whole state. Stepping the recorded optimizer class (same
flags, hence the same kernels) from a checkpoint with those gradients repeats training's float
arithmetic, so θ, Δθ and every moment come back bit for bit where the implementation is the same.
Where it isn't (a GPU-trained run replayed on the CPU, fused kernels), each checkpoint interval
starts again from its stored checkpoint, and the stored θ minus the replayed one there is the
step's *replay gap*: Δθ_s still ends at the stored θ, so sums over steps stay complete, and
analyses name the gap as its own term.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from attrib.schemas import format as fmt

if TYPE_CHECKING:
    from attrib.analyzer.run import Run

# recorder.optimizers.SUPPORTED inverted; not imported from there: importing attrib.recorder
# imports the recorder, which imports the reader (analyzer.run), which imports this module
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class TrajectoryError(KeyError, ValueError):
    """A part of the trajectory the run did not record: gradients it did not keep
    (`record_grads=False`, or tensors left out by `Recorder(trajectory=...)`)."""

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


@dataclass
class Window:
    """Steps [start, stop) of the trajectory; tensors in the storage dtype."""

    start: int
    stop: int
    theta: dict[str, torch.Tensor]  # (n + 1, *shape): θ_start … θ_stop
    state: dict[str, dict[str, torch.Tensor]]  # param → state name → (n, *shape), after step s
    _deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    def deltas(self, name: str) -> torch.Tensor:
        """Δθ_s = θ_{s+1} − θ_s for the window's steps, (n, *shape)."""
        if name not in self._deltas:
            self._deltas[name] = self.theta[name][1:] - self.theta[name][:-1]
        return self._deltas[name]


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def build_optimizer(run: Run, params: list[torch.Tensor]) -> tuple[torch.optim.Optimizer,
                                                                    list[int]]:
    """A fresh optimizer of the recorded class, groups and implementation flags, and the
    recorded group index of each of its groups (groups without parameters are left out)."""
    kind = run.optimizer["kind"]
    groups_of = run.params.column("group").to_pylist()
    hp = run.hparams(0, 1) if run.n_steps else {}
    groups, indices = [], []
    for g, flags in enumerate(run.optimizer["groups"]):
        members = [p for p, i in zip(params, groups_of) if i == g]
        if not members:
            continue
        group = {"params": members, **flags}
        if kind == "sgd" and group.get("nesterov"):  # torch checks momentum > 0 at construction
            group["momentum"] = float(hp["momentum"][0, g]) if hp else 0.9
        groups.append(group)
        indices.append(g)
    return OPTIMIZERS[kind](groups, lr=1.0), indices


def set_hparams(optimizer: torch.optim.Optimizer, group_index: list[int],
                hparams: dict[str, np.ndarray], s: int) -> None:
    """Give each of `optimizer`'s groups the hyperparameters its recorded group used at step s
    (`group_index`: the recorded index of each group, as build_optimizer returns)."""
    for group, g in zip(optimizer.param_groups, group_index):
        h = {k: float(v[s, g]) for k, v in hparams.items()}
        group["lr"], group["weight_decay"] = h["lr"], h["weight_decay"]
        if group.get("lr_dtype"):  # trained with a tensor lr: torch's arithmetic differs
            group["lr"] = torch.tensor(h["lr"], dtype=getattr(torch, group["lr_dtype"]))
        if isinstance(optimizer, torch.optim.SGD):
            group["momentum"], group["dampening"] = h["momentum"], h["dampening"]
        else:
            group["betas"], group["eps"] = (h["beta1"], h["beta2"]), h["eps"]


class Replay:
    """The recorded optimizer, stepped through a v2 run's gradients from its checkpoints."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.names = run.param_names
        self.kind = run.optimizer["kind"]
        self.amsgrad = bool(run.optimizer.get("amsgrad", False))
        dtypes = [getattr(torch, d) for d in run.params.column("dtype").to_pylist()]
        self.params = [torch.nn.Parameter(torch.zeros(run.param_shapes[n], dtype=d))
                       for n, d in zip(self.names, dtypes)]
        self.storage = [_storage_dtype(d) for d in dtypes]
        self.optimizer, self.group_index = build_optimizer(run, self.params)
        self.checkpoints = {s: i for i, s in enumerate(run.checkpoint_steps)}
        stored = set(run.trajectory_params)
        # tensors without recorded gradients stand still between checkpoints in the replay:
        # their θ is only read at checkpoints, and they take no part in the gaps
        self.recorded = [n in stored for n in self.names]
        self.position: int | None = None  # the step whose θ the parameters hold
        self.gaps: dict[int, dict[str, torch.Tensor]] = {}  # step → stored − replayed θ_{s+1}
        # step → stored − replayed momentum buffer / first moment after step s (it carries into
        # the later updates; Adam's v needs no term: analyses read the replayed one)
        self.buffer_gaps: dict[int, dict[str, torch.Tensor]] = {}
        self.mismatch: dict[int, float] = {}  # step → largest relative gap of θ or any state
        self._grads: tuple[int, int, dict[str, torch.Tensor]] | None = None
        self._window: Window | None = None
        self._intervals: OrderedDict[int, Window] = OrderedDict()  # checkpoint index → its
        # whole interval's window (_from_intervals)
        self._snapshots: dict[int, Snapshot] = {}  # step → θ and state, in one interval

    @cached_property
    def hparams(self) -> dict[str, np.ndarray]:
        return self.run.hparams()

    @cached_property
    def active(self) -> np.ndarray:
        return self.run.active()

    @cached_property
    def counts(self) -> np.ndarray:
        """The optimizer's step count after each step (read only past step 0: a run with no
        committed step has no step arrays, and its checkpoint 0 still reads)."""
        return self.run.step_counts()

    # -- positioning ------------------------------------------------------------------------
    def load(self, index: int) -> None:
        """θ and the optimizer state of the `index`-th checkpoint."""
        run = self.run
        step = run.checkpoint_steps[index]
        theta = run.checkpoint(index)
        state, present = run.checkpoint_state(index)
        counts = (self.counts[step - 1] if step > 0
                  else run.meta.get("initial_step_count") or [0] * len(self.params))
        self.optimizer.state.clear()
        with torch.no_grad():
            for j, (name, p) in enumerate(zip(self.names, self.params)):
                p.copy_(theta[name])
                if not present[j]:
                    continue
                entry = {k: v.to(p.dtype).clone() for k, v in state[name].items()}
                if self.kind != "sgd":
                    entry["step"] = torch.tensor(float(counts[j]), dtype=_scalar_dtype())
                self.optimizer.state[p] = entry
        self.position = step

    def seek(self, step: int) -> None:
        """Hold θ_step: continue from where the replay is, or from the last checkpoint before
        `step` when that is nearer (or the replay is past `step`)."""
        index = int(np.searchsorted(self.run.checkpoint_steps, step, side="right")) - 1
        if index < 0:
            raise IndexError(f"{self.run.dir} has no checkpoint at or before step {step}")
        start = self.run.checkpoint_steps[index]
        if self.position is None or self.position > step or self.position < start:
            held = [s for s in self._snapshots if start <= s <= step]
            if held:
                restore(self.params, self.optimizer, self._snapshots[max(held)])
                self.position = max(held)
            else:
                self._snapshots.clear()  # another interval
                self.load(index)
        if self.position < step and not any(self.recorded):
            self.run.require_trajectory(f"θ at step {step}")
        while self.position < step:
            self.advance()
            self._snapshot(start)

    def _snapshot(self, start: int) -> None:
        """Keep θ and the optimizer state at chunk boundaries passed on the way to a seek's
        step, within SNAPSHOT_BUDGET_BYTES, for the checkpoint interval starting at `start`:
        analyses that walk a run backwards (the path kernel's blocks) seek to ever earlier
        steps of one interval, and each seek replayed from the interval's start (3.6 replayed
        steps per step on the demo)."""
        if self.position % self._chunk_steps or self.position in self.checkpoints:
            return
        self._snapshots = {s: kept for s, kept in self._snapshots.items() if s >= start}
        if (len(self._snapshots) + 1) * self._snapshot_bytes() <= SNAPSHOT_BUDGET_BYTES:
            self._snapshots[self.position] = snapshot(self.params, self.optimizer)

    def _snapshot_bytes(self) -> int:
        """What a snapshot now holds: θ and every state tensor (at least what any earlier one
        of the interval holds: state only appears as steps go on)."""
        tensors = [*self.params, *(v for entry in self.optimizer.state.values()
                                   for v in entry.values() if isinstance(v, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)

    @cached_property
    def _chunk_steps(self) -> int:
        """Steps per stored chunk: gradients are read, and snapshots kept, that many at once."""
        return int(self.run.meta.get("steps_per_chunk") or 1)

    def advance(self) -> None:
        """One optimizer step from θ_position with the recorded gradient and settings, then
        the stored checkpoint if one follows."""
        self._step()
        self._meet_checkpoint()

    def _step(self) -> None:
        s = self.position
        grads = self._grads_of(s)
        set_hparams(self.optimizer, self.group_index, self.hparams, s)
        for j, (name, p) in enumerate(zip(self.names, self.params)):
            p.grad = grads[name].to(p.dtype) if self.active[s, j] and self.recorded[j] else None
        self.optimizer.step()
        self.position = s + 1

    def _meet_checkpoint(self) -> None:
        """At a stored checkpoint the replay always goes on from the stored θ and state, so
        θ_s never depends on where a read started, and errors never accumulate across
        intervals. What the replay had differently becomes the last step's gaps: θ, and the
        momentum buffer / first moment that carries into later updates; `mismatch` keeps the
        largest relative difference of θ or any state tensor, for `verify`."""
        index = self.checkpoints.get(self.position)
        if index is None:
            return
        s = self.position - 1
        theta = self.theta()
        state = [{k: v.detach().clone() for k, v in self.optimizer.state.get(p, {}).items()
                  if isinstance(v, torch.Tensor) and v.dim() > 0} for p in self.params]
        self.load(index)
        key = "momentum_buffer" if self.kind == "sgd" else "exp_avg"
        worst = 0.0
        for name, p, dtype, before, recorded in zip(self.names, self.params, self.storage,
                                                    state, self.recorded):
            if not recorded:
                continue
            now = {k: v for k, v in self.optimizer.state.get(p, {}).items()
                   if isinstance(v, torch.Tensor) and v.dim() > 0}
            stored = p.detach().to(dtype)
            pairs = [(None, stored, theta[name])]
            pairs += [(k, now.get(k, torch.zeros_like(p)), before.get(k, torch.zeros_like(p)))
                      for k in {*now, *before}]
            for k, stored_value, replayed_value in pairs:
                gap = stored_value.to(dtype) - replayed_value.to(dtype)
                if not gap.any():
                    continue
                worst = max(worst, float(gap.double().norm()
                                         / stored_value.double().norm().clamp_min(1e-30)))
                if k is None:
                    self.gaps.setdefault(s, {})[name] = gap
                elif k == key:
                    self.buffer_gaps.setdefault(s, {})[name] = gap
        if worst:
            self.mismatch[s] = worst

    def _grads_of(self, s: int) -> dict[str, torch.Tensor]:
        """Step s's consumed gradients, read a chunk of steps at a time."""
        if self._grads is None or not self._grads[0] <= s < self._grads[1]:
            depth = self._chunk_steps
            first = s - s % depth
            stop = min(self.run.n_steps, first + depth)
            self._grads = (first, stop, {n: self.run.grads(n, first, stop)
                                         for n, kept in zip(self.names, self.recorded) if kept})
        first, _, values = self._grads
        return {n: v[s - first] for n, v in values.items()}

    # -- reading ----------------------------------------------------------------------------
    def theta(self) -> dict[str, torch.Tensor]:
        """Copies of the parameters the replay holds, in the storage dtype (every tensor's:
        off a checkpoint, only a run that recorded every tensor's gradients has them)."""
        if not all(self.recorded) and self.position not in self.checkpoints:
            self.run.require_trajectory(f"θ of every tensor at step {self.position}")
        return {n: p.detach().to(d, copy=True)
                for n, p, d in zip(self.names, self.params, self.storage)}

    def state_after(self, name: str, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The per-step state v1 stored (Adam's v, AMSGrad's running max), zeros if none."""
        key = fmt.AMSGRAD_STATE if self.amsgrad and name == "exp_avg_sq" else name
        value = self.optimizer.state.get(p, {}).get(key)
        return torch.zeros(p.shape, dtype=dtype) if value is None else value.detach().to(dtype)

    def window(self, start: int, stop: int) -> Window:
        """θ, Δθ and per-step state of steps [start, stop) of the tensors whose gradients were
        recorded; the last window is kept, so per-parameter reads of one range replay it once."""
        cached = self._window
        if cached is not None and (cached.start, cached.stop) == (start, stop):
            return cached
        self._window = None
        self._window = self._from_intervals(start, stop) or self._replayed(start, stop)
        return self._window

    def _from_intervals(self, start: int, stop: int) -> Window | None:
        """[start, stop) cut from whole checkpoint intervals, each replayed once and kept
        while they fit WINDOW_BUDGET_BYTES; None when the range's intervals don't. Analyses
        read ranges that neither start nor end at checkpoints (chunks; the path kernel's
        blocks, backwards), and replaying each range from its interval's checkpoint made the
        demo's path kernel replay 3.2 steps per step."""
        steps = self.run.checkpoint_steps
        if stop <= start or not steps or start < steps[0]:
            return None
        bounds = [*steps, self.run.n_steps] if steps[-1] < self.run.n_steps else list(steps)
        first = int(np.searchsorted(steps, start, side="right")) - 1
        last = int(np.searchsorted(steps, stop - 1, side="right")) - 1
        needed = range(first, last + 1)
        if sum(self._interval_bytes(bounds[i + 1] - bounds[i]) for i in needed) \
                > WINDOW_BUDGET_BYTES:
            return None
        for i in needed:  # (a live run's last interval grows)
            if i not in self._intervals or self._intervals[i].stop != bounds[i + 1]:
                self._intervals[i] = self._replayed(bounds[i], bounds[i + 1])
            self._intervals.move_to_end(i)  # most recently used last
        while sum(self._interval_bytes(w.stop - w.start) for w in self._intervals.values()) \
                > WINDOW_BUDGET_BYTES:
            self._intervals.popitem(last=False)  # never one of `needed`: they fit together
        return _cut([self._intervals[i] for i in needed], start, stop)

    def _interval_bytes(self, steps: int) -> int:
        """What a window of `steps` steps holds: θ at steps + 1 points, the state at `steps`."""
        per_point = sum(p.numel() * d.itemsize for p, d, r in
                        zip(self.params, self.storage, self.recorded) if r)
        return per_point * (steps + 1 + steps * len(fmt.STEP_STATE[self.kind]))

    def _replayed(self, start: int, stop: int) -> Window:
        """The window replayed from θ_start (seek)."""
        self.seek(start)
        n = stop - start
        kept = [(name, p, d) for name, p, d, r in zip(self.names, self.params, self.storage,
                                                      self.recorded) if r]
        theta = {name: torch.empty((n + 1, *p.shape), dtype=d) for name, p, d in kept}
        state_names = fmt.STEP_STATE[self.kind]
        state = {name: {k: torch.empty((n, *p.shape), dtype=d) for k in state_names}
                 for name, p, d in kept}
        with torch.no_grad():
            for name, p, _ in kept:
                theta[name][0] = p
            for i in range(n):
                self._step()
                for name, p, d in kept:
                    for k in state_names:  # the state step s used, before any checkpoint
                        state[name][k][i] = self.state_after(k, p, d)
                self._meet_checkpoint()
                for name, p, _ in kept:
                    theta[name][i + 1] = p
        return Window(start, stop, theta, state)


def _cut(parts: list[Window], start: int, stop: int) -> Window:
    """Steps [start, stop) of consecutive windows: views of one, joined copies of several
    (a window's last θ is the next one's first)."""
    thetas, states = [], []
    for index, w in enumerate(parts):
        lo, hi = max(start, w.start) - w.start, min(stop, w.stop) - w.start
        end = hi + 1 if index == len(parts) - 1 else hi
        thetas.append({n: t[lo:end] for n, t in w.theta.items()})
        states.append({n: {k: v[lo:hi] for k, v in per.items()} for n, per in w.state.items()})
    if len(parts) == 1:
        return Window(start, stop, thetas[0], states[0])
    return Window(start, stop, {n: torch.cat([t[n] for t in thetas]) for n in thetas[0]},
                  {n: {k: torch.cat([s[n][k] for s in states]) for k in states[0][n]}
                   for n in states[0]})


WINDOW_BUDGET_BYTES = 256 << 20  # whole checkpoint intervals' windows kept (window)
SNAPSHOT_BUDGET_BYTES = 256 << 20  # θ and optimizer state kept inside one interval (seek)


Snapshot = tuple[list[torch.Tensor], dict]  # parameter values, optimizer state_dict


def snapshot(params, optimizer) -> Snapshot:
    """A copy of a replay's state: parameter values and the optimizer's state."""
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def restore(params, optimizer, saved: Snapshot) -> None:
    """Put a snapshot back (into these or other parameters of the same layout)."""
    values, state = saved
    with torch.no_grad():
        for p, value in zip(params, values):
            p.copy_(value)
    optimizer.load_state_dict(copy.deepcopy(state))


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives a fresh `step` tensor on the CPU."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
