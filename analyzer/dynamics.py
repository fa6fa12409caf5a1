"""The optimizer's update as a function of recorded gradients and state (METHODS.md §1).

Replays SGD (momentum, dampening, Nesterov, L2), Adam (L2) and AdamW (decoupled decay,
AMSGrad) from what the run stores: the consumed gradient G̃_s, per-step hyperparameters, the
optimizer's step count and (Adam) the second moment that fixes D_s. Comparing the prediction
with the recorded Δθ_s checks that the format holds everything the linear split needs; the
same recursions carry the frozen-gradient stage estimator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attrib.analyzer.run import Run
from attrib.analyzer.stream import iter_steps
from attrib.recorder.optimizers import adam_update_scale, momentum_intake


@dataclass
class UpdateCheck:
    """One step's recorded update beside the one METHODS.md §1 predicts (both per param).

    Tensors are reused or replaced by the iterator: clone what you keep past the next step.
    """

    step: int
    theta: dict[str, torch.Tensor]  # θ_s as reconstructed
    predicted: dict[str, torch.Tensor]
    recorded: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]  # the consumed gradient G̃_s, in the prediction dtype
    v: dict[str, torch.Tensor]  # Adam: the second moment v_s after the step (empty for SGD)
    buffers: dict[str, torch.Tensor | None]  # momentum buffer b_s or first moment m_s after it


@dataclass(frozen=True)
class StepRule:
    """How one parameter's update at one step is formed: the run's optimizer settings."""

    kind: str
    hparams: dict[str, float]
    nesterov: bool
    count: int  # the optimizer's step count t_s (Adam's bias correction)


class Dynamics:
    """The run's optimizer, per step and parameter, from its recorded settings."""

    def __init__(self, run: Run) -> None:
        self.kind = run.optimizer["kind"]
        self.groups = run.params.column("group").to_pylist()
        self.nesterov = [g.get("nesterov", False) for g in run.optimizer["groups"]]
        self.hparams = run.hparams()
        self.counts, self.active = run.step_counts(), run.active()

    def rule(self, step: int, index: int) -> StepRule:
        group = self.groups[index]
        return StepRule(self.kind, {k: float(v[step, group]) for k, v in self.hparams.items()},
                        self.nesterov[group], int(self.counts[step, index]))


def initial_buffers(run: Run, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Momentum buffer / first moment before step 0: the carry-in state, else none."""
    key = "momentum_buffer" if run.optimizer["kind"] == "sgd" else "exp_avg"
    carry = run.initial_state()
    return {name: carry[name][key].to(dtype) if key in carry.get(name, {}) else None
            for name in run.param_names}


def predicted_updates(run: Run, dtype: torch.dtype = torch.float64, start: int = 0,
                      stop: int | None = None,
                      buffers: dict[str, torch.Tensor | None] | None = None
                      ) -> Iterator[UpdateCheck]:
    """Yield the predicted and recorded Δθ_s for steps [start, stop), computed in `dtype`.

    `buffers` are the momentum buffers / first moments before `start` (default: the carry-in
    state, valid for start = 0); the dict is updated in place as steps go by.
    """
    dynamics = Dynamics(run)
    if buffers is None:
        if start != 0:
            raise ValueError("predicted_updates from a later step needs the buffers before it")
        buffers = initial_buffers(run, dtype)
    fields = ("grads",) if dynamics.kind == "sgd" else ("grads", "state:exp_avg_sq")
    for view in iter_steps(run, start, stop, fields=fields):
        s = view.step
        predicted: dict[str, torch.Tensor] = {}
        grads = {n: g.to(dtype) for n, g in view.values["grads"].items()}
        v = {n: x.to(dtype) for n, x in view.values.get("state:exp_avg_sq", {}).items()}
        for index, name in enumerate(run.param_names):
            theta = view.theta[name].to(dtype)
            if not dynamics.active[s, index]:
                predicted[name] = torch.zeros_like(theta)
                continue
            predicted[name] = optimizer_update(dynamics.rule(s, index), grads[name], theta,
                                               v.get(name), buffers, name)
        yield UpdateCheck(s, view.theta, predicted, view.values["deltas"], grads, v, buffers)


def optimizer_update(rule: StepRule, grad: torch.Tensor, theta: torch.Tensor,
                     v: torch.Tensor | None, buffers: dict, name: str,
                     moment_count: int | None = None) -> torch.Tensor:
    """Δθ of one parameter at one step (torch semantics); updates buffers[name].

    Adam's D_s comes from the given second moment v with the step count t_s; `moment_count`
    overrides the count in the first moment's bias correction only (a skipped stage shifts it
    while the frozen-gradient estimator holds the normaliser: METHODS.md §4).
    """
    if rule.kind == "sgd":
        return _sgd(grad, theta, rule.hparams, rule.nesterov, buffers, name)
    return _adam(grad, theta, v, rule.hparams, rule.count, rule.kind == "adamw", buffers, name,
                 rule.count if moment_count is None else moment_count)


def _sgd(grad, theta, h, nesterov: bool, buffers, name) -> torch.Tensor:
    d = grad + h["weight_decay"] * theta if h["weight_decay"] else grad
    mu = h["momentum"]
    if mu == 0:
        return -h["lr"] * d
    previous = buffers[name]
    buffer = momentum_intake(h, previous is None) * d
    if previous is not None:
        buffer = mu * previous + buffer
    buffers[name] = buffer
    return -h["lr"] * (d + mu * buffer if nesterov else buffer)


def _adam(grad, theta, v, h, t: int, decoupled: bool, buffers, name, moment_t: int
          ) -> torch.Tensor:
    beta1 = h["beta1"]
    d = grad if decoupled or not h["weight_decay"] else grad + h["weight_decay"] * theta
    previous = buffers[name]
    m = (1 - beta1) * d if previous is None else beta1 * previous + (1 - beta1) * d
    buffers[name] = m
    step = adam_update_scale(h, v, t) * m
    if moment_t != t:
        step = step * ((1 - beta1**t) / (1 - beta1**moment_t))
    if decoupled:
        step = step - h["lr"] * h["weight_decay"] * theta
    return step


def update_split_error(run: Run) -> float:
    """Largest split error relative to the step's largest update, beyond float round-off.

    A recorded Δθ_s can't be finer than the float grid of θ_{s+1} it was taken from, and AdamW
    rounds θ twice per step (decay, then update), so two ulps of |θ_{s+1}| (elementwise) are
    forgiven before comparing: what remains is modelling error.
    """
    worst = 0.0
    for check in predicted_updates(run):
        scale = max(float(r.abs().max()) for r in check.recorded.values())
        for name, predicted in check.predicted.items():
            recorded = check.recorded[name]
            ulp = 2 * torch.finfo(recorded.dtype).eps * (check.theta[name] + recorded).abs()
            excess = ((predicted - recorded.to(predicted.dtype)).abs() - ulp).clamp(min=0)
            worst = max(worst, float(excess.max()) / scale if scale > 0 else float(excess.max()))
    return worst
