"""A slow disk never grows memory: training waits (block) or per-example rows drop by policy."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import data, mlp
from test_path_kernel import assert_complete, probe_points

import attrib
from attrib.analyzer.verify import verify
from attrib.recorder.store import RunStore

BANDWIDTH = 2e6  # bytes/s of the throttled disk: a full block of this run takes ~30 ms
BUFFERS = 2


@pytest.fixture
def slow_disk(monkeypatch):
    """The real store, writing at BANDWIDTH: each block sleeps for its bytes first."""
    append = RunStore.append_steps

    def throttled(self, first_step, values):
        time.sleep(sum(v.nbytes for v in values.values()) / BANDWIDTH)
        return append(self, first_step, values)

    monkeypatch.setattr(RunStore, "append_steps", throttled)


def record(path, steps: int = 30, **kwargs):
    """SGD on the MLP with every example's full gradient captured; returns the largest number
    of blocks ever waiting in the writer's queue."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data()
    waiting = 0
    with attrib.Recorder(path, model, opt, steps_per_chunk=2, buffers=BUFFERS,
                         checkpoint_every=10, **kwargs) as rec:
        for step in range(steps):
            ids = torch.arange(32) + step
            rec.examples(ids)
            torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
            waiting = max(waiting, rec._writer._queue.qsize())
    return attrib.open_run(path), waiting


def test_block_policy_waits_and_keeps_everything(tmp_path, slow_disk):
    run, waiting = record(tmp_path / "run")
    assert waiting <= BUFFERS  # never more blocks than buffers, however slow the disk
    assert run.dropped_steps() == frozenset()
    assert not any(run.steps.column("examples_dropped").to_pylist())
    assert verify(run.dir).column("ok").to_pylist() == [True] * 7


def test_drop_policy_keeps_the_trajectory_and_flags_dropped_steps(tmp_path, slow_disk):
    with pytest.warns(UserWarning, match="per-example data of such steps is dropped"):
        run, waiting = record(tmp_path / "run", backpressure="drop_examples")
    reference, _ = record(tmp_path / "reference")  # the same training, block policy
    assert waiting <= 2 * BUFFERS  # full buffers plus as many aggregate-only ones
    dropped = run.dropped_steps()
    flags = run.steps.sort_by("step").column("examples_dropped").to_pylist()
    assert 0 < len(dropped) < run.n_steps and dropped == {s for s, f in enumerate(flags) if f}
    assert {0, 1, 2, 3} & dropped == set()  # the first blocks had free full buffers

    name = run.param_names[0]
    rows, expected = run.contribution_rows(name), reference.contribution_rows(name)
    for step in range(run.n_steps):
        if step in dropped:
            assert not rows[step].any()
            with pytest.raises(KeyError, match="backpressure='drop_examples'"):
                run.contributions(step)
        else:
            torch.testing.assert_close(rows[step], expected[step], rtol=0, atol=0)
    for name, value in reference.reconstruct(run.n_steps).items():
        torch.testing.assert_close(run.reconstruct(run.n_steps)[name], value, rtol=0, atol=0)
    assert verify(run.dir).column("ok").to_pylist() == [True] * 7
    # the dropped steps' data influence moves to the residual: the total stays exact
    assert_complete(attrib.analyze.path_kernel(run, mlp, probe_points(), progress=False))


def test_unknown_policy_is_refused(tmp_path):
    model = mlp()
    with pytest.raises(ValueError, match="backpressure='later': choose one of"):
        attrib.Recorder(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1),
                        backpressure="later")
