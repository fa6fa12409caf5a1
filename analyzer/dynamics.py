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
    """One step's recorded update beside the one METHODS.md §1 predicts (both per param)."""

    step: int
    theta: dict[str, torch.Tensor]  # θ_s as reconstructed (reused by the iterator)
    predicted: dict[str, torch.Tensor]
    recorded: dict[str, torch.Tensor]


def predicted_updates(run: Run, dtype: torch.dtype = torch.float64) -> Iterator[UpdateCheck]:
    """Yield the predicted and recorded Δθ_s for every step; predictions computed in `dtype`."""
    kind = run.optimizer["kind"]
    groups = run.table("params").column("group").to_pylist()
    nesterov = [g.get("nesterov", False) for g in run.optimizer["groups"]]
    hparams = run.hparams()
    counts, active = run.step_counts(), run.active()
    carry = run.initial_state()
    buffers: dict[str, torch.Tensor | None] = {}
    for name in run.param_names:
        initial = carry.get(name, {})
        key = "momentum_buffer" if kind == "sgd" else "exp_avg"
        buffers[name] = initial[key].to(dtype) if key in initial else None
    fields = ("grads",) if kind == "sgd" else ("grads", "state:exp_avg_sq")
    for view in iter_steps(run, fields=fields):
        s = view.step
        predicted: dict[str, torch.Tensor] = {}
        for index, name in enumerate(run.param_names):
            theta = view.theta[name].to(dtype)
            if not active[s, index]:
                predicted[name] = torch.zeros_like(theta)
                continue
            h = {k: float(v[s, groups[index]]) for k, v in hparams.items()}
            grad = view.values["grads"][name].to(dtype)
            if kind == "sgd":
                predicted[name] = _sgd(grad, theta, h, nesterov[groups[index]], buffers, name)
            else:
                v = view.values["state:exp_avg_sq"][name].to(dtype)
                predicted[name] = _adam(grad, theta, v, h, int(counts[s, index]),
                                        kind == "adamw", buffers, name)
        yield UpdateCheck(s, view.theta, predicted, view.values["deltas"])


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


def _adam(grad, theta, v, h, t: int, decoupled: bool, buffers, name) -> torch.Tensor:
    beta1 = h["beta1"]
    d = grad if decoupled or not h["weight_decay"] else grad + h["weight_decay"] * theta
    previous = buffers[name]
    m = (1 - beta1) * d if previous is None else beta1 * previous + (1 - beta1) * d
    buffers[name] = m
    step = adam_update_scale(h, v, t) * m
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
