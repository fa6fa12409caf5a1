"""Retraining a recorded run step by step: what replay and the hybrid estimator share.

A step re-runs with the real torch.optim optimizer, the recorded batches (example ids per
micro-batch), learning rates and hyperparameters, the recorded generator states (dropout) and
the run's clipping threshold (METHODS.md §4).
"""

from __future__ import annotations

import numpy as np
import torch

from attrib.analyzer.dynamics import Dynamics, initial_buffers, predicted_updates
from attrib.analyzer.run import Run
from attrib.analyzer.training import ReplayError, TrainingBatches
from attrib.analyzer.trajectory import set_hparams

CLIP_AGREEMENT = 1e-4  # relative spread of the clipping threshold implied by clipped steps
TORCH_CLIP_EPS = 1e-6  # clip_grad_norm_ divides max_norm by ‖G‖ + 1e-6


def clip_threshold(run: Run) -> float | None:
    """The max_norm of clip_grad_norm_ implied by the recorded steps: clipped steps have
    ‖G̃‖ = max_norm ‖G‖ / (‖G‖ + 1e-6). None when no step was clipped."""
    steps = run.steps
    norm = steps.column("grad_norm").to_numpy(zero_copy_only=False).astype(float)
    alpha = steps.column("clip_factor").to_numpy(zero_copy_only=False).astype(float)
    clipped = alpha < 1 - 1e-9
    if not clipped.any():
        return None
    implied = alpha[clipped] * (norm[clipped] + TORCH_CLIP_EPS)
    threshold = float(np.median(implied))
    spread = float(np.abs(implied / threshold - 1).max())
    if spread > CLIP_AGREEMENT or (norm[~clipped] > threshold * (1 + CLIP_AGREEMENT)).any():
        raise ReplayError(
            f"the recorded clip factors don't follow one clip_grad_norm_(max_norm) threshold "
            f"(implied thresholds vary by {spread:.2g}); pass max_grad_norm= the value you "
            "clipped at, or the replay can't reproduce the training")
    return threshold


def state_norm(tensors: dict[str, torch.Tensor]) -> float:
    """‖·‖ over every tensor of a state (float64)."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


def load_state(run: Run, optimizer, params, step: int, dtype) -> None:
    """θ_step and the optimizer state before `step`: buffers recomputed from the stored
    gradients, Adam's v and step count as recorded."""
    theta = run.reconstruct(step)
    buffers = initial_buffers(run, dtype)
    v = {}
    for check in predicted_updates(run, dtype, 0, step, buffers=buffers):
        v = check.v
    counts = run.step_counts(step - 1, step)[0] if step > 0 else \
        np.asarray(run.meta.get("initial_step_count", [0] * len(params)))
    carry = run.initial_state()
    with torch.no_grad():
        for j, (name, p) in enumerate(zip(run.param_names, params)):
            p.copy_(theta[name].to(dtype))
            state = {}
            if run.optimizer["kind"] == "sgd":
                if buffers[name] is not None:
                    state["momentum_buffer"] = buffers[name].clone()
            elif int(counts[j]) > 0:
                second = v.get(name, carry.get(name, {}).get("exp_avg_sq"))
                state = {"step": torch.tensor(float(counts[j])),
                         "exp_avg": buffers[name].clone(), "exp_avg_sq": second.to(dtype).clone()}
            if state:
                optimizer.state[p] = state


def replay_step(run: Run, batches: TrainingBatches, dynamics: Dynamics, built, params, s: int,
                threshold: float | None) -> None:
    """Step s of the recorded training: its batch, hyperparameters and clipping, on `params`
    with `built` = (optimizer, its groups' recorded indices)."""
    optimizer, groups = built  # the optimizer, and each of its groups' recorded index
    set_hparams(optimizer, groups, dynamics.hparams, s)
    optimizer.zero_grad(set_to_none=True)
    named = dict(zip(run.param_names, params))
    for batch in batches.micro_batches(s):
        batches.micro_loss(named, batch).backward()
    for j, p in enumerate(params):
        if not dynamics.active[s, j]:
            p.grad = None  # the recorded step had no gradient for it: the optimizer skips it
    if threshold is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], threshold)
    optimizer.step()
