"""Resuming a recorded run: check that the model and optimizer are where the run stopped.

The training script restores its own checkpoint; `Recorder(resume=...)` then continues the same
run. Before anything is written this module checks that the recorder is set up as before, that
the live parameters equal θ at the resume step (as readers rebuild it from checkpoints and
deltas) and that the optimizer's step counts and recorded state match. A mismatch is refused
with the step the parameters do match, if any, so the fix is one argument away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attrib.analyzer.run import Run
from attrib.analyzer.stream import iter_steps
from attrib.recorder import optimizers as optim_info
from attrib.schemas import format as fmt

# Metadata that must be equal for the new steps to mean what the old ones do.
SETTINGS = ("optimizer", "n_groups", "step_state", "record_grads", "trajectory", "capture",
            "residual_params", "rng", "distributed")
PARAM_FIELDS = ("name", "shape", "dtype", "group")


class ResumeError(ValueError):
    """The live training state does not continue the recorded run."""


@dataclass
class ResumePoint:
    """Where a resumed run continues, and the writer state that goes with it."""

    step: int
    previous_status: str
    discarded: int  # committed steps after `step`, dropped by the resume
    theta: dict[str, torch.Tensor] | None  # the stored checkpoint at `step`, if there is one
    checkpoints: list[tuple[int, int]]  # (index, step) as recorded
    stage_runs: list[list[Any]]  # [stage, start, end, n_steps] as recorded
    stage: str | None  # the stage of step − 1, which the resumed steps continue
    seen_examples: np.ndarray  # examples whose tokens are already stored
    elapsed: float  # the steps table's time at `step`, so `time` keeps counting
    vocabulary: dict[int, str] | None


def prepare(run: Run, resume: bool | int, meta_now: dict[str, Any], params_now: list[dict],
            live: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
            spec: optim_info.OptimizerSpec, optimizer_params: list[torch.Tensor]) -> ResumePoint:
    """Check the live state against the run and say where it continues (nothing written)."""
    busy = still_recording(run, "resuming")
    if busy is not None:
        raise ResumeError(busy)
    _check_settings(run, meta_now, params_now)
    step = _resume_step(run, resume)
    if not _matches(run.reconstruct(step), live):
        taken = max((optim_info.step_count(optimizer.state.get(p, {})) for p in optimizer_params),
                    default=0)
        raise ResumeError(_mismatch_message(run, step, live, taken))
    _check_optimizer(run, step, optimizer, spec, optimizer_params)
    return _point(run, step)


def still_recording(run: Run, doing: str) -> str | None:
    """Why `doing` (resuming, overwriting) would break a run a live process is recording into,
    or None when none is."""
    if not run.writer_running():
        return None
    return (f"{run.dir} is being recorded by process {run.manifest.get('pid')} (this one, if a "
            f"Recorder on it is still open); close that Recorder or stop that process before "
            f"{doing}")


def _check_settings(run: Run, meta_now: dict[str, Any], params_now: list[dict]) -> None:
    fix = ("resume with the same model, optimizer and Recorder arguments as the recorded run, "
           "or record a new run into another directory")
    recorded = [{f: row[f] for f in PARAM_FIELDS} for row in run.params.to_pylist()]
    now = [{f: row[f] for f in PARAM_FIELDS} for row in params_now]
    if recorded != now:
        differ = next((a, b) for a, b in zip(recorded + [None] * len(now),
                                             now + [None] * len(recorded)) if a != b)
        raise ResumeError(f"{run.dir}: the parameters differ from the recorded run's (recorded "
                          f"{differ[0]}, now {differ[1]}); {fix}")
    for key in SETTINGS:
        if run.meta.get(key) != meta_now.get(key):
            raise ResumeError(f"{run.dir}: {key} was {_short(run.meta.get(key))} when recorded, "
                              f"now {_short(meta_now.get(key))}; {fix}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


def _resume_step(run: Run, resume: bool | int) -> int:
    if resume is False or not isinstance(resume, (int, np.integer)):
        raise TypeError(f"resume= takes True or a step number, got {resume!r}")
    if not run.checkpoint_steps:
        raise ResumeError(f"{run.dir} stopped before its first commit, so there is nothing to "
                          "continue; record it again with overwrite=True")
    if resume is not True and not 0 <= resume <= run.n_steps:
        raise ResumeError(f"resume={resume}: {run.dir} has {run.n_steps} committed steps, so a "
                          f"run can continue from step 0 … {run.n_steps}")
    return run.n_steps if resume is True else int(resume)


def _matches(theta: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> bool:
    return all(_close(theta[name], value) for name, value in live.items())


def _close(stored: torch.Tensor, value: torch.Tensor) -> bool:
    return torch.allclose(stored.double(), value.double(), rtol=fmt.THETA_RTOL,
                          atol=fmt.THETA_ATOL)


def _mismatch_message(run: Run, step: int, live: dict[str, torch.Tensor], taken: int) -> str:
    """Why the live θ is not the run's at `step`; `taken`: the optimizer's step count (0 for
    optimizers that keep none, such as SGD)."""
    head = (f"{run.dir}: the model's parameters are not θ at step {step}, where the run "
            "would continue")
    recorded = int(max(run.meta.get("initial_step_count") or [0])) + run.n_steps
    if taken > recorded:  # a training checkpoint saved after the run's last commit
        return (f"{head}: the optimizer has taken {taken} steps, the run holds them up to "
                f"{recorded}, so this training checkpoint is ahead of the run (the "
                f"{taken - recorded} steps after the run's last commit were trained but never "
                f"recorded). Load a training checkpoint of step {recorded} or earlier and pass "
                "resume= its step, or record the continuation into a new run directory")
    found = latest_matching_step(run, live)
    if found is None:
        return (f"{head}, nor at any step recorded before it. Load the training checkpoint "
                "that belongs to this run, or record a new run into another directory")
    return (f"{head}; they are θ at step {found}. Pass resume={found} to continue from there "
            f"(the {run.n_steps - found} steps recorded after it are discarded), or load the "
            f"training checkpoint of step {step}")


def latest_matching_step(run: Run, live: dict[str, torch.Tensor]) -> int | None:
    """The last committed step whose θ equals `live`, θ_s as Run.reconstruct gives it."""
    if not run.checkpoint_steps:
        return None
    if run.format_version >= 2 and run.trajectory_params != run.param_names:  # θ only at
        # checkpoints: without every tensor's gradients the replay has no θ in between
        hits = [s for i, s in enumerate(run.checkpoint_steps) if _matches(run.checkpoint(i), live)]
        return hits[-1] if hits else None
    if _matches(run.reconstruct(run.n_steps), live):
        return run.n_steps
    found = None
    for view in iter_steps(run):
        if _matches(view.theta, live):
            found = view.step
    return found


def _check_optimizer(run: Run, step: int, optimizer: torch.optim.Optimizer,
                     spec: optim_info.OptimizerSpec, params: list[torch.Tensor]) -> None:
    """Step counts and the per-step state recorded after step−1 (carry-in state at 0)."""
    states = [optimizer.state.get(p, {}) for p in params]
    counts = [optim_info.step_count(s) for s in states]
    if step == 0:
        recorded_counts = list(run.meta.get("initial_step_count") or [0] * len(params))
        recorded_state = {n: s for n, s in run.initial_state().items()}
    else:
        recorded_counts = run.step_counts(step - 1, step)[0].tolist()
        kept = set(run.trajectory_params)  # Recorder(trajectory=...): per-step state of these
        recorded_state = {n: {s: run.state(n, s, step - 1, step)[0] for s in spec.step_state}
                          for n in run.param_names if n in kept}
    fix = ("restore the optimizer's state_dict from the same training checkpoint as the model's "
           f"(the state after step {step - 1})" if step else
           "restore the optimizer the run started with")
    if counts != recorded_counts:
        raise ResumeError(f"{run.dir}: the optimizer's step counts are {_short(counts)}, the run "
                          f"recorded {_short(recorded_counts)} at step {step}; {fix}")
    for name, state in zip(run.param_names, states):
        for key, stored in recorded_state.get(name, {}).items():
            value = optim_info.state_tensor(spec, state, key) if step else state.get(key)
            value = torch.zeros_like(stored) if value is None else value.detach().cpu()
            if not _close(stored, value):
                raise ResumeError(f"{run.dir}: the optimizer's {key} of {name!r} is not the one "
                                  f"recorded at step {step}; {fix}")


def _point(run: Run, step: int) -> ResumePoint:
    checkpoints = list(enumerate(run.checkpoint_steps))
    at_step = [i for i, s in checkpoints if s == step]
    stage_runs = [list(row.values()) for row in run.stages.sort_by("start_step").to_pylist()]
    last = run.table_where("steps", step - 1) if step else None
    tokens = run.table("tokens").column("example_id").to_numpy()
    vocabulary = run.table("vocabulary")
    return ResumePoint(
        step=step, previous_status=run.status, discarded=run.n_steps - step,
        theta=run.checkpoint(at_step[0]) if at_step else None, checkpoints=checkpoints,
        stage_runs=stage_runs,
        stage=next((r[0] for r in reversed(stage_runs) if r[1] < step), None),
        seen_examples=tokens,
        elapsed=float(last.column("time")[0].as_py() or 0.0) if last is not None else 0.0,
        vocabulary={i: t for i, t in zip(vocabulary.column("token_id").to_pylist(),
                                         vocabulary.column("token").to_pylist()) if t is not None}
        if vocabulary.num_rows else None,
    )
