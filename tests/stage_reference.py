"""Independent float64 references for the stage estimators: training unrolled by hand.

The optimizer formulas here are written from the torch.optim documentation, not imported from
attrib, and autograd differentiates through every step (create_graph), so derivatives of the
final f with respect to example weights or a perturbation of the state are exact.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch.func import functional_call


class Unrolled:
    """Re-trains a recorded run's model step by step with its recorded batches, hparams and
    clipping threshold; every quantity stays on the autograd graph."""

    def __init__(self, run, model, inputs, labels, clip: float | None) -> None:
        self.run, self.model, self.inputs, self.labels, self.clip = run, model, inputs, labels, clip
        self.kind = run.optimizer["kind"]
        self.nesterov = run.optimizer["groups"][0].get("nesterov", False)
        self.hp = {k: v[:, 0] for k, v in run.hparams().items()}
        ex = run.examples
        self.batches: list[list[np.ndarray]] = []
        for s in range(run.n_steps):
            rows = ex.filter(pc.field("step") == s).sort_by([("micro_batch", "ascending"),
                                                        ("slot", "ascending")])
            micro = rows.column("micro_batch").to_numpy()
            ids = rows.column("example_id").to_numpy()
            self.batches.append([ids[micro == m] for m in np.unique(micro)])

    def gradient(self, theta, s, weights=None):
        total = 0.0
        for k, ids in enumerate(self.batches[s]):
            out = functional_call(self.model, theta, (self.inputs[ids],))
            losses = F.cross_entropy(out, self.labels[ids], reduction="none")
            if weights is not None:
                losses = losses * weights[s][k]
            total = total + losses.mean() / len(self.batches[s])
        grads = torch.autograd.grad(total, list(theta.values()), create_graph=True)
        grads = dict(zip(theta, grads))
        if self.clip is not None:
            norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
            factor = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
            grads = {n: g * factor for n, g in grads.items()}
        return grads

    def step(self, theta, state, s, weights=None, count_shift: int = 0, epsilon=None):
        """One optimizer step; Adam's update is interpolated between counts t and t − shift
        by `epsilon` (the linear response's source term as a derivative)."""
        g = self.gradient(theta, s, weights)
        lr, wd = float(self.hp["lr"][s]), float(self.hp["weight_decay"][s])
        new_theta, new_state = {}, {"t": state["t"] + 1}
        for n, p in theta.items():
            d = g[n] + wd * p if self.kind != "adamw" else g[n]
            if self.kind == "sgd":
                mu, tau = float(self.hp["momentum"][s]), float(self.hp["dampening"][s])
                b = state.get(n)
                b = d if b is None else mu * b + (1 - tau) * d
                new_state[n] = b
                new_theta[n] = p - lr * (d + mu * b if self.nesterov else b)
            else:
                b1, b2, eps = (float(self.hp[k][s]) for k in ("beta1", "beta2", "eps"))
                m0, v0 = state.get(n, (0.0, 0.0))
                m, v = b1 * m0 + (1 - b1) * d, b2 * v0 + (1 - b2) * d * d
                new_state[n] = (m, v)

                def update(t, m=m, v=v, b1=b1, b2=b2, eps=eps):
                    return -lr * m / ((1 - b1**t) * (torch.sqrt(v / (1 - b2**t)) + eps))
                t = new_state["t"]
                u = update(t)
                if epsilon is not None and count_shift:
                    u = u + epsilon * (update(t - count_shift) - u)
                base = p * (1 - lr * wd) if self.kind == "adamw" else p
                new_theta[n] = base + u
        return new_theta, new_state

    def trajectory(self, theta0, stop, weights=None):
        """States z_0 … z_stop (θ and optimizer state)."""
        zs = [({n: t.detach().requires_grad_(True) for n, t in theta0.items()}, {"t": 0})]
        for s in range(stop):
            zs.append(self.step(*zs[-1], s, weights))
        return zs


def example_contributions(ref: Unrolled, theta0, f) -> dict[tuple[int, int, int], np.ndarray]:
    """d f(θ_N) / d w_{s,i} at w = 1: first-order f(θ_N) − f(θ_N without c_{s,i}); keyed by
    (step, micro_batch, slot), one value per test point."""
    n = ref.run.n_steps
    weights = [[torch.ones(len(ids), dtype=torch.float64, requires_grad=True) for ids in mb]
               for mb in ref.batches]
    theta, _ = ref.trajectory(theta0, n, weights)[-1]
    values = f(theta)
    leaves = [w for mb in weights for w in mb]
    out: dict[tuple[int, int, int], list[float]] = {}
    for t in range(len(values)):
        grads = torch.autograd.grad(values[t], leaves, retain_graph=True)
        it = iter(grads)
        for s in range(n):
            for k in range(len(weights[s])):
                for slot, value in enumerate(next(it).tolist()):
                    out.setdefault((s, k, slot), []).append(value)
    return {key: np.array(v) for key, v in out.items()}


def stage_derivative(ref: Unrolled, zs, start: int, stop: int, f) -> np.ndarray:
    """d/dε f(θ_N) when the state at `stop` is moved by ε (z_start − z_stop) and Adam's later
    updates by ε (their change under the skip's count shift): the linear-response estimate of
    skipping steps start … stop − 1, by autograd."""
    return perturbation_derivative(ref, zs[start], zs[stop], stop, stop - start, f)


def perturbation_derivative(ref: Unrolled, moved, at, t: int, shift: int, f) -> np.ndarray:
    """d/dε f(θ_N) when the state `at` before step t is moved by ε (moved − at) and every later
    Adam update by ε times its change under a step-count shift of `shift`, by autograd: the
    first-order effect from t on of a state perturbation (the hybrid's estimate with the replay
    window ending at t, when `moved` is the state the skipped replay reached)."""
    epsilon = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (theta_a, state_a), (theta_e, state_e) = moved, at
    theta = {n: theta_e[n].detach() + epsilon * (theta_a[n] - theta_e[n]).detach()
             for n in theta_e}
    state = {"t": state_e["t"]}
    for n in theta_e:
        if ref.kind == "sgd":
            b_a, b_e = state_a.get(n), state_e.get(n)
            if b_e is not None:
                b_a = torch.zeros_like(b_e) if b_a is None else b_a
                state[n] = b_e.detach() + epsilon * (b_a - b_e).detach()
        else:
            zero = (torch.zeros_like(theta_e[n]),) * 2
            (m_a, v_a), (m_e, v_e) = state_a.get(n, zero), state_e.get(n, zero)
            state[n] = (m_e.detach() + epsilon * (m_a - m_e).detach(),
                        v_e.detach() + epsilon * (v_a - v_e).detach())
    for s in range(t, ref.run.n_steps):
        theta, state = ref.step(theta, state, s, count_shift=shift, epsilon=epsilon)
    values = f(theta)
    return np.array([torch.autograd.grad(v, epsilon, retain_graph=True)[0].item()
                     for v in values])
