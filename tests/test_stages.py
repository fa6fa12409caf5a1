"""Stage accountability (METHODS.md §4): linear response, frozen gradients and replay, each
against an independent reference (autograd through hand-unrolled float64 training, brute-force
retraining that skips the steps)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from conftest import OPTIMIZERS, data, mlp, train
from stage_reference import Unrolled, example_contributions, stage_derivative

import attrib
from attrib.analyzer import targets
from attrib.analyzer.linear_response import linear_response

STAGES = {"early": range(0, 4), "middle": range(9, 15), "late": range(20, 24)}


def recorded_float64(run_dir, optimizer: str, clip: float | None, micro_batches: int = 1):
    inputs, labels = data()
    inputs = inputs.double()
    model = mlp(torch.float64)
    train(run_dir, model, OPTIMIZERS[optimizer](model.parameters()), steps=24, inputs=inputs,
          labels=labels, clip=clip, micro_batches=micro_batches, batch=16,
          capture=attrib.Full())
    return attrib.open_run(run_dir), (inputs, labels)


@pytest.mark.parametrize("optimizer,clip,micro_batches", [
    ("sgd_nesterov", None, 1), ("sgd_nesterov", 0.5, 2), ("adam_l2", None, 1),
    ("adamw", 0.5, 1)])
def test_linear_response_is_the_exact_derivative_of_unrolled_training(
        run_dir, optimizer, clip, micro_batches):
    """Per example and step, and per stage, the sweep equals autograd through the whole
    float64 training (clipping projection, Nesterov, Adam moments and count shift included)."""
    run, (inputs, labels) = recorded_float64(run_dir, optimizer, clip, micro_batches)
    test = (inputs[200:205], labels[200:205])
    result = linear_response(run, lambda: mlp(torch.float64), (inputs, labels), test,
                             stages=STAGES, by=("example", "step"), progress=False)
    model = mlp(torch.float64)
    ref = Unrolled(run, model, inputs, labels, clip)
    theta0 = {n: t.double() for n, t in run.reconstruct(0).items()}

    def f(theta):
        return targets.evaluate(model, theta, *test, "loss")

    expected = example_contributions(ref, theta0, f)
    examples = run.examples
    slot_of = {}
    for s, mb, slot, eid in zip(*(examples.column(c).to_pylist()
                                   for c in ("step", "micro_batch", "slot", "example_id"))):
        slot_of.setdefault((s, eid), []).append((s, mb, slot))
    got = {}
    for t, s, eid, value in zip(*(result.influence.column(c).to_pylist()
                                   for c in ("test_id", "step", "example_id", "value"))):
        got[(t, s, eid)] = value
    worst, scale = 0.0, max(np.abs(v).max() for v in expected.values())
    for (s, eid), keys in slot_of.items():
        want = sum(expected[k] for k in keys)  # an id drawn twice in a step: both rows
        for t in range(len(want)):
            worst = max(worst, abs(got[(t, s, eid)] - want[t]))
    # clipping: torch divides by ‖G‖ + 1e-6, the sweep's projection assumes ‖G‖ (a 1e-6/‖G‖
    # relative difference, here ‖G‖ ≈ 1)
    rtol = 1e-8 if clip is None else 2e-5
    assert worst <= rtol * scale

    zs = ref.trajectory(theta0, run.n_steps)
    table = result.stages
    for name, steps in STAGES.items():
        want = stage_derivative(ref, zs, steps.start, steps.stop, f)
        rows = table.filter(pc.field("stage") == name).sort_by("test_id")
        np.testing.assert_allclose(rows.column("effect").to_numpy(), want, rtol=rtol,
                                   atol=1e-10 * np.abs(want).max())
