"""Stream a run's trajectory step by step, reading each Zarr chunk once.

Every offline analysis walks θ_0 → θ_N with some per-step arrays beside it; this iterator reads
them in chunk-aligned blocks and rebuilds θ_s with exactly `Run.reconstruct`'s arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attrib.analyzer.run import Run


@dataclass
class StepView:
    """One step: θ_s (before the step) and the requested per-step values, keyed by param name.

    Tensors are reused by the iterator; clone anything kept past the next iteration.
    """

    step: int
    theta: dict[str, torch.Tensor]
    values: dict[str, dict[str, torch.Tensor]]


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
    """Yield StepView for steps [start, stop), θ_s reconstructed as `run.reconstruct` does."""
    start, stop = run._step_range(start, stop)
    readers = {f: _reader(run, f) for f in ("deltas", *fields)}
    checkpoints = dict(zip(run.checkpoint_steps, range(len(run.checkpoint_steps))))
    theta = run.reconstruct(start)
    block = run.meta["steps_per_chunk"]
    s = start
    while s < stop:
        end = min(stop, (s // block + 1) * block)
        data = {f: {n: read(n, s, end) for n in run.param_names} for f, read in readers.items()}
        for i in range(end - s):
            step = s + i
            yield StepView(step, theta, {f: {n: v[i] for n, v in per.items()}
                                         for f, per in data.items()})
            if step + 1 in checkpoints:
                theta = run.checkpoint(checkpoints[step + 1])
            else:
                for name in run.param_names:
                    theta[name] += data["deltas"][name][i]
        s = end
