"""Stream a run's trajectory step by step, reading each Zarr chunk once.

Every offline analysis walks θ_0 → θ_N with some per-step arrays beside it; this iterator reads
them in chunk-aligned blocks. θ_s is exactly `Run.reconstruct`'s: v1 adds the stored deltas in
the recorder's order, v2 takes it from the optimizer replay's window.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from attrib.analyzer.run import Run


@dataclass
class StepView:
    """One step: θ_s (before the step) and the requested per-step values, keyed by param name.

    Tensors are reused by the iterator; clone anything kept past the next iteration. `gap`:
    v2's replay gap of this step (stored θ_{s+1} − replayed θ_{s+1}, part of Δθ_s), per
    parameter where it is not zero; empty where the replay is exact. `buffer_gap`: the same
    for the momentum buffer / first moment the replay went on with after step s.
    """

    step: int
    theta: dict[str, torch.Tensor]
    values: dict[str, dict[str, torch.Tensor]]
    gap: dict[str, torch.Tensor] = field(default_factory=dict)
    buffer_gap: dict[str, torch.Tensor] = field(default_factory=dict)


def _reader(run: Run, field: str):
    """A function (param, start, stop) → tensor for a field: deltas, grads or state:<name>."""
    if field == "deltas":
        return run.deltas
    if field == "grads":
        return run.grads
    if field.startswith("state:"):
        name = field.removeprefix("state:")
        return lambda param, start, stop: run.state(param, name, start, stop)
    raise ValueError(f"unknown field {field!r}: use deltas, grads or state:<name>")


def iter_steps(run: Run, start: int = 0, stop: int | None = None,
               fields: tuple[str, ...] = ()) -> Iterator[StepView]:
    """Yield StepView for steps [start, stop), θ_s as `run.reconstruct` gives it."""
    start, stop = run._step_range(start, stop)
    if run.format_version >= 2:
        run.require_trajectory("θ_s of every step")
    readers = {f: _reader(run, f) for f in ("deltas", *fields)}
    replayed = run.format_version >= 2
    checkpoints = dict(zip(run.checkpoint_steps, range(len(run.checkpoint_steps))))
    theta = None if replayed else run.reconstruct(start)
    block = run.meta["steps_per_chunk"]
    s = start
    while s < stop:
        end = min(stop, (s // block + 1) * block)
        data = {f: {n: read(n, s, end) for n in run.param_names} for f, read in readers.items()}
        window = run.replay.window(s, end) if replayed else None
        for i in range(end - s):
            step = s + i
            if replayed:
                theta = {n: window.theta[n][i] for n in run.param_names}
            yield StepView(step, theta, {f: {n: v[i] for n, v in per.items()}
                                         for f, per in data.items()},
                           run.replay.gaps.get(step, {}) if replayed else {},
                           run.replay.buffer_gaps.get(step, {}) if replayed else {})
            if replayed:
                continue
            if step + 1 in checkpoints:
                theta = run.checkpoint(checkpoints[step + 1])
            else:
                for name in run.param_names:
                    theta[name] += data["deltas"][name][i]
        s = end
