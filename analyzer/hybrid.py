"""Hybrid stage estimator: a replay window, then the adjoint (METHODS.md §4).

Linear response maps the state perturbation a skipped stage S = [a, e) leaves at e to the final
f with one adjoint λ_e; it fails where later training heals or amplifies that perturbation
nonlinearly (early stages, large learning rates, Adam near zero loss). The hybrid replays the W
steps after the stage exactly (the real torch.optim, the recorded batches, learning rates and
clipping, the stage skipped) and applies the adjoint only from e + W on:

    Δf_S ≈ λ_{e+W} · (z^{−S}_{e+W} − z_{e+W}) + (Adam's step-count sources from e + W on)

with z = (θ, buffers, Adam's v) before the step and z_{e+W} from the baseline that shares
everything before the stage (analyzer/baseline.py), as in "replay". W = 0 is linear response;
W = N − e is replay (its exact f difference is used there, so for a stage that ends at the
run's end every window, 0 included, gives replay's value). One adjoint sweep keeps λ at the
candidate points of every stage; `window="auto"` doubles W (0, 1, 2, 4, …) until two successive
estimates agree within `tol` (relative, over the test points) while the linearisation check
passes, so each stage replays only as far as its nonlinearity reaches. The checks come first
(replay alone), so λ is kept only where an estimate can be used, and not swept at all when no
window of any stage passes its check before the run's end.

The linearisation check (per candidate, in the diagnostics): `perturbation` = ‖Δθ‖ / ‖θ‖,
and for Adam `update_change` = ‖Δ(m / (√v + ε))‖ / ‖m / (√v + ε)‖, how much of the update
direction the perturbation changes (near zero loss √v ~ ε and a small Δm swings it); the auto
window doesn't stop where first order is not trusted, past UPDATE_CHANGE_LIMIT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

from attrib.analyzer.baseline import Baseline
from attrib.analyzer.linear_response import Adjoint, AdjointSweep
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.retraining import clip_threshold, replay_step, state_norm
from attrib.analyzer.run import Run
from attrib.analyzer.stage_spec import Stage
from attrib.analyzer.training import TrainingBatches
from attrib.analyzer.trajectory import Snapshot, build_optimizer, restore, snapshot

UPDATE_CHANGE_LIMIT = 0.5  # Adam: beyond this the update direction is not a small change
AUTO_TOL = 0.05  # successive auto-window estimates agreeing this closely (relative) stop it


@dataclass
class HybridResult:
    effects: np.ndarray  # (n_stages, n_test)
    diagnostics: list[dict]  # per stage: window, converged, change, perturbation, …


def check_window(window, tol: float) -> None:
    """Refuse a window that is not a step count ≥ 0 or "auto", and a tolerance that is not
    a positive number (a negative or NaN one silently turned every stage into a replay)."""
    if window != "auto" and (isinstance(window, bool) or not isinstance(window, Integral)
                             or window < 0):
        raise ValueError(f"window={window!r}: a number of steps ≥ 0, or 'auto'")
    if not (isinstance(tol, Real) and 0 < tol < math.inf):
        raise ValueError(f"window_tol={tol!r}: a relative tolerance > 0, e.g. {AUTO_TOL}")


def candidate_windows(stage: Stage, n_steps: int, window: int | str) -> list[int]:
    """The windows tried for a stage: [W] (capped at the run's end) or 0, 1, 2, 4, … up to
    the run's end ("auto")."""
    room = n_steps - stage.stop
    if window != "auto":
        return [min(int(window), room)]
    out, w = [0], 1
    while w < room:
        out.append(w)
        w *= 2
    return [*out, room] if room > 0 else out


def hybrid_effects(run: Run, batches: TrainingBatches, stages: list[Stage],
                   adjoint: dict[str, torch.Tensor], evaluate: Callable[[dict], np.ndarray],
                   window: int | str = "auto", tol: float = AUTO_TOL,
                   max_grad_norm: float | str | None = "recorded",
                   progress: bool = True, gradients_exact: bool = False) -> HybridResult:
    """Δf_S for every stage by the hybrid estimator (see the module docstring). `adjoint`:
    ∇f at θ_N per test point; `evaluate(θ)`: f at the test points; `gradients_exact`: see
    replay_effects.

    The auto window can only stop at a window whose linearisation check passes, so λ is kept
    from the window before the first such one on; a stage where none passes before the run's
    end is its replay and needs no λ, and when no stage needs one the adjoint sweep (the
    costly part: Hessian-vector products per test point and step) is not run at all. (On the
    grokking demo's run some windows pass the check without their estimates converging, so
    the sweep still runs there.) Such a stage's notes say window = N − e, converged False and
    change None (no estimate to compare). The memory check counts only the points kept, so it
    comes after the checks' replays; it refuses nothing that fits, where it used to count
    every candidate up front."""
    check_window(window, tol)
    n = run.n_steps
    windows = [candidate_windows(s, n, window) for s in stages]
    threshold = clip_threshold(run) if max_grad_norm == "recorded" else max_grad_norm
    replay = _Replays(run, batches, threshold, min(s.start for s in stages),
                      {s.start for s in stages} | {s.stop + w for s, ws in zip(stages, windows)
                                                   for w in ws}, gradients_exact)
    done: dict[int, tuple[np.ndarray, dict]] = {}
    if window == "auto":
        with progress_bar(total=sum(ws[-1] for ws in windows), progress=progress,
                          desc="hybrid (linearisation checks)", unit="step") as bar:
            for k, (stage, tried) in enumerate(zip(stages, windows)):
                first, replayed = replay.first_trusted(stage, tried, evaluate, bar)
                windows[k] = tried[max(first - 1, 0):]
                if replayed is not None:
                    done[k] = replayed
    points = frozenset(s.stop + w for k, (s, ws) in enumerate(zip(stages, windows))
                       if k not in done for w in ws if s.stop + w < n)
    _check_memory(adjoint, len(points))
    kept: dict[int, Adjoint] = {}
    if points:  # no window ends before the run's end: replay alone, no adjoint needed
        # an explicit window 0 is linear response: its refusals (SGD's nonlinear first
        # momentum step under dampening) apply; a replayed window runs such a step exactly
        sweep = AdjointSweep(run, batches, stages, adjoint, None, batches.dtype, keep=points,
                             stage_effects=window == 0)
        sweep.sweep(progress)
        kept = sweep.kept
    with progress_bar(total=sum(ws[-1] for k, ws in enumerate(windows) if k not in done),
                      progress=progress, desc="hybrid (replay windows)", unit="step") as bar:
        for k, (stage, tried) in enumerate(zip(stages, windows)):
            if k not in done:
                done[k] = replay.stage(k, stage, tried, kept, evaluate, tol, bar)
    return HybridResult(np.stack([done[k][0] for k in range(len(stages))]),
                        [{"stage": stage.name, **done[k][1]} for k, stage in enumerate(stages)])


KEPT_BUDGET_BYTES = 4 << 30  # adjoints the auto window may keep (λ per candidate point)


def _check_memory(adjoint: dict[str, torch.Tensor], points: int) -> None:
    """λ at a point is θ's, the buffers' and v's cotangents per test point: refuse a number of
    points whose λ would not fit, before sweeping, with what to change."""
    one = sum(a.numel() * a.element_size() for a in adjoint.values())
    if 3 * one * points > KEPT_BUDGET_BYTES:
        raise ValueError(
            f"the hybrid would keep the adjoint at {points} points, {3 * one * points / 2**30:.1f}"
            f" GiB (3 × {one / 2**20:.0f} MiB each: test points × parameters), over "
            f"{KEPT_BUDGET_BYTES / 2**30:.0f} GiB; pass a fixed window=W (one point per stage), "
            "fewer test points or fewer stages")


class _Replays:
    """The baseline (analyzer/baseline.py), and the skipped-stage replays that start from its
    state before each stage."""

    def __init__(self, run: Run, batches: TrainingBatches, threshold: float | None, first: int,
                 points: set[int], gradients_exact: bool) -> None:
        self.run, self.batches, self.threshold = run, batches, threshold
        self.base = Baseline(run, batches, threshold, first, points,
                             gradients_exact=gradients_exact)
        self.dynamics = self.base.dynamics
        named = dict(batches.model.named_parameters())
        self.skip = [named[n].detach().clone().requires_grad_(True) for n in run.param_names]
        self.skip_optimizer = build_optimizer(run, self.skip)
        order = [id(p) for group in self.skip_optimizer[0].param_groups for p in group["params"]]
        # name → its index in the optimizer's state_dict (groups may reorder the tensors)
        self.index = {name: order.index(id(p)) for name, p in zip(run.param_names, self.skip)}

    def _windows(self, stage: Stage, tried: list[int], bar):
        """(window, baseline state, skipped state) at each window of `tried`, replaying the
        run from before the stage with the stage skipped."""
        restore(self.skip, self.skip_optimizer[0], self.base.state(stage.start))
        s = stage.stop
        for w in tried:
            while s < stage.stop + w:
                replay_step(self.run, self.batches, self.dynamics, self.skip_optimizer,
                            self.skip, s, self.threshold)
                s += 1
                bar.update(1)
            yield w, _state(self.base.state(s), self.index), _state(
                snapshot(self.skip, self.skip_optimizer[0]), self.index)

    def first_trusted(self, stage: Stage, tried: list[int], evaluate: Callable[[dict], np.ndarray],
                      bar) -> tuple[int, tuple[np.ndarray, dict] | None]:
        """The index of the first window whose linearisation check passes, or of the run's
        end; there, with replay's estimate and notes (no adjoint involved)."""
        for i, (w, base, skipped) in enumerate(self._windows(stage, tried, bar)):
            if stage.stop + w == self.run.n_steps:
                return i, (evaluate(skipped[0]) - evaluate(base[0]), {
                    "window": w, "converged": False, "change": None, "perturbation": None,
                    "update_change": None})
            if _trusted(linearisation(self.run, base, skipped)):
                return i, None
        raise AssertionError("auto windows end at the run's end")

    def stage(self, k: int, stage: Stage, tried: list[int], kept: dict[int, Adjoint],
              evaluate: Callable[[dict], np.ndarray], tol: float, bar) -> tuple[np.ndarray, dict]:
        """Replay with the stage skipped through its candidate windows; the estimate at the
        first window that agrees with the previous one (auto), or at the one window given."""
        previous, notes = None, {}
        for w, base, skipped in self._windows(stage, tried, bar):
            t = stage.stop + w
            if t == self.run.n_steps:  # the replay itself: f exactly
                estimate = evaluate(skipped[0]) - evaluate(base[0])
                check = {"perturbation": None, "update_change": None}
            else:
                estimate = kept[t].source[k] + _dot(kept[t], skipped, base)
                check = linearisation(self.run, base, skipped)
            change = None if previous is None else float(
                np.linalg.norm(estimate - previous) / max(np.linalg.norm(estimate), 1e-300))
            notes = {"window": w, "converged": change is not None and change <= tol,
                     "change": change, **check}
            if len(tried) == 1 or (notes["converged"] and _trusted(check)) or t == self.run.n_steps:
                return estimate, notes
            previous = estimate
        return estimate, notes


def _trusted(check: dict) -> bool:
    """Whether first order can be trusted from a window on (SGD: always; Adam: while the
    perturbation changes the update direction by at most UPDATE_CHANGE_LIMIT)."""
    return check["update_change"] is None or check["update_change"] <= UPDATE_CHANGE_LIMIT


State = tuple[dict, dict, dict]  # θ, buffers, Adam's v by name (_state)


def _state(saved: Snapshot, index: dict[str, int]) -> State:
    """θ, buffers (momentum_buffer or exp_avg; zero where absent) and Adam's v by name;
    `index`: each name's position in the parameters and the optimizer's state_dict."""
    values, state = saved
    theta, m, v = {}, {}, {}
    per_param = state["state"]
    for j, name in enumerate(index):
        entry = per_param.get(index[name], {})
        theta[name] = values[j].detach()
        buffer = entry.get("momentum_buffer", entry.get("exp_avg"))
        m[name] = torch.zeros_like(theta[name]) if buffer is None else buffer
        v[name] = entry.get("exp_avg_sq", torch.zeros_like(theta[name]))
    return theta, m, v


def _dot(adjoint: Adjoint, skipped: State, base: State) -> np.ndarray:
    """λ · (z^{−S} − z) over θ, buffers and v, per test point."""
    total = 0
    for part, new, old in zip((adjoint.theta, adjoint.m, adjoint.v), skipped, base):
        for name in new:
            if name in part:
                a = part[name]
                diff = (new[name] - old[name]).to(a.dtype).reshape(-1)
                total = total + a.reshape(a.shape[0], -1) @ diff
    return total.cpu().numpy()


def linearisation(run: Run, base: State, skipped: State) -> dict:
    """How far the skip moved the state: ‖Δθ‖ / ‖θ‖, and for Adam the relative change of the
    update direction m / (√v + ε)."""
    (theta, m, v), (new_theta, new_m, new_v) = base, skipped
    names = list(theta)
    out = {"perturbation": state_norm({n: new_theta[n] - theta[n] for n in names}) / max(
        state_norm(theta), 1e-300), "update_change": None}
    if run.optimizer["kind"] != "sgd":
        eps = float(run.hparams(0, 1)["eps"][0, 0])
        before = {n: m[n] / (v[n].sqrt() + eps) for n in names}
        after = {n: new_m[n] / (new_v[n].sqrt() + eps) for n in names}
        out["update_change"] = state_norm({n: after[n] - before[n] for n in names}) / max(
            state_norm(before), 1e-300)
    return out

