"""Replay: the ground truth of stage accountability (METHODS.md §4).

Training re-runs with the real torch.optim optimizer, the recorded batches (example ids per
micro-batch), learning rates and hyperparameters, the recorded generator states (dropout) and
the run's clipping threshold, from the reconstructed θ and optimizer state at the earliest stage
start. One baseline replay runs every step and snapshots the state at each stage start; each
stage then resumes from its snapshot with its steps skipped (no update, no state change, no
step-count tick). Δf_S = f(θ_N^{−S}) − f(θ_N^{replay}): both ends come from replays that share
everything before the stage, so numerical drift between replay and recording cancels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from attrib.analyzer.dynamics import Dynamics, initial_buffers, predicted_updates
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.run import Run
from attrib.analyzer.stage_spec import Stage
from attrib.analyzer.training import ReplayError, TrainingBatches
from attrib.analyzer.trajectory import build_optimizer, restore, set_hparams, snapshot

CLIP_AGREEMENT = 1e-4  # relative spread of the clipping threshold implied by clipped steps
TORCH_CLIP_EPS = 1e-6  # clip_grad_norm_ divides max_norm by ‖G‖ + 1e-6


@dataclass
class ReplayResult:
    effects: np.ndarray  # (n_stages, n_test)
    drift: float  # ‖θ_N^{replay} − θ_N‖ / ‖θ_N − θ_start‖: how faithfully the replay retrains
    max_grad_norm: float | None  # the clipping threshold applied


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


def replay_effects(run: Run, batches: TrainingBatches, stages: list[Stage],
                   evaluate: Callable[[dict], np.ndarray], max_grad_norm: float | str | None
                   = "recorded", progress: bool = True) -> ReplayResult:
    """Δf_S for every stage by retraining (see the module docstring)."""
    model, dtype = batches.model, batches.dtype
    named = dict(model.named_parameters())
    params = [named[n] for n in run.param_names]
    threshold = clip_threshold(run) if max_grad_norm == "recorded" else max_grad_norm
    first = min(s.start for s in stages)
    optimizer, groups = build_optimizer(run, params)
    load_state(run, optimizer, params, first, dtype)
    n = run.n_steps
    starts = {s.start for s in stages}
    snapshots = {}
    dynamics = Dynamics(run)
    total = (n - first) + sum(n - s.stop for s in stages)
    with torch.random.fork_rng(devices=[]), progress_bar(total=total, progress=progress,
                                                  desc="replay", unit="step") as bar:
        for s in range(first, n):
            if s in starts:
                snapshots[s] = snapshot(params, optimizer)
            replay_step(run, batches, dynamics, (optimizer, groups), params, s, threshold)
            bar.update(1)
        baseline = {name: p.detach().clone() for name, p in zip(run.param_names, params)}
        f_baseline = evaluate(baseline)
        effects = []
        for stage in stages:
            restore(params, optimizer, snapshots[stage.start])
            for s in range(stage.stop, n):
                replay_step(run, batches, dynamics, (optimizer, groups), params, s, threshold)
                bar.update(1)
            effects.append(evaluate({name: p.detach().clone()
                                     for name, p in zip(run.param_names, params)}) - f_baseline)
    recorded, start = run.reconstruct(n), run.reconstruct(first)
    drift = state_norm({k: baseline[k] - recorded[k].to(dtype) for k in baseline}) / max(
        state_norm({k: recorded[k] - start[k] for k in recorded}), 1e-300)
    return ReplayResult(np.stack(effects), drift, threshold)


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
