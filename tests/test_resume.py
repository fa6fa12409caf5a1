"""Recorder(resume=...): a run stopped (planned or by kill -9) continues as if never stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import data, mlp

import attrib
from attrib.analyzer.verify import verify
from attrib.recorder.policies import Project
from attrib.recorder.resume import ResumeError

SETTINGS = dict(checkpoint_every=6, steps_per_chunk=8)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def batch_ids(step: int) -> torch.Tensor:
    """The micro-batch of a step depends on the step only, so any split replays the same data."""
    return torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(step))


def train_steps(rec, model, opt, first: int, last: int, x, y, stage_at: int = 15) -> None:
    """Steps [first, last); `rec` None trains without recording."""
    for step in range(first, last):
        if step == stage_at and rec is not None:
            rec.stage("late")
        ids = batch_ids(step)
        if rec is not None:
            rec.examples(ids)
        loss = torch.nn.functional.cross_entropy(model(x[ids]), y[ids])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rec is not None:
            rec.log(loss=loss)


def uninterrupted(path, steps: int, **kwargs):
    model = mlp()
    opt = adamw(model)
    x, y = data()
    with attrib.Recorder(path, model, opt, **SETTINGS, **kwargs) as rec:
        train_steps(rec, model, opt, 0, steps, x, y)
    return attrib.open_run(path)


def assert_same_run(resumed, reference) -> None:
    """Every committed step of the two runs matches: θ, gradients, per-example rows, tables."""
    assert resumed.n_steps == reference.n_steps and resumed.status == "complete"
    assert verify(resumed.dir).column("ok").to_pylist() == [True] * 7
    for step in range(0, reference.n_steps + 1, 5):
        for name, value in reference.reconstruct(step).items():
            torch.testing.assert_close(resumed.reconstruct(step)[name], value, rtol=0, atol=1e-6)
    for name in reference.param_names:
        torch.testing.assert_close(resumed.grads(name), reference.grads(name), rtol=0, atol=0)
        torch.testing.assert_close(resumed.state(name, "exp_avg_sq"),
                                   reference.state(name, "exp_avg_sq"), rtol=0, atol=0)
    for name in reference.capture:
        torch.testing.assert_close(resumed.contribution_rows(name),
                                   reference.contribution_rows(name), rtol=0, atol=0)
    for table in ("examples", "stages"):
        keys = ["step", "row"] if table == "examples" else ["start_step"]
        assert resumed.table(table).sort_by([(k, "ascending") for k in keys]).equals(
            reference.table(table).sort_by([(k, "ascending") for k in keys]))
    steps = resumed.steps.sort_by("step")
    assert steps.column("step").to_pylist() == list(range(reference.n_steps))
    assert steps.column("loss").equals(reference.steps.sort_by("step").column("loss"))
    assert (np.diff(steps.column("time").to_numpy()) >= 0).all()  # the clock goes on


def test_planned_stop_and_resume_equals_one_run(tmp_path):
    """Stop at step 20 (mid-chunk, between checkpoints), resume in place, go on to 37."""
    capture = Project(k=32)
    reference = uninterrupted(tmp_path / "reference", 37, capture=capture)
    model = mlp()
    opt = adamw(model)
    x, y = data()
    path = tmp_path / "resumed"
    with attrib.Recorder(path, model, opt, **SETTINGS, capture=capture) as rec:
        train_steps(rec, model, opt, 0, 20, x, y)
    with attrib.Recorder(path, model, opt, **SETTINGS, capture=capture, resume=True) as rec:
        assert rec.step == 20
        train_steps(rec, model, opt, 20, 37, x, y)
    run = attrib.open_run(path)
    assert_same_run(run, reference)
    assert run.manifest["resumes"][0]["step"] == 20
    assert run.manifest["resumes"][0]["previous_status"] == "complete"
    assert 20 in run.checkpoint_steps


KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import attrib
    from conftest import data, mlp
    from test_resume import SETTINGS, adamw, train_steps
    model = mlp(); opt = adamw(model)
    x, y = data()
    rec = attrib.Recorder({path!r}, model, opt, **SETTINGS)
    for step in range(40):
        if step % 7 == 0:  # the training script's own checkpoints
            torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}},
                       {path!r} + f"-train-{{step}}.pt")
        if step == 29:
            os.kill(os.getpid(), signal.SIGKILL)
        train_steps(rec, model, opt, step, step + 1, x, y)
""")


def restore(path: str, step: int):
    model = mlp()
    opt = adamw(model)
    saved = torch.load(f"{path}-train-{step}.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    return model, opt


def test_resume_after_kill_9_from_an_older_training_checkpoint(tmp_path):
    path = str(tmp_path / "run")
    killed = subprocess.run([sys.executable, "-c", KILLED.format(
        path=path, tests=os.path.dirname(__file__))], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()
    committed = attrib.open_run(path).n_steps
    assert committed in (8, 16, 24)
    older = 7 * ((committed - 1) // 7)  # the newest training checkpoint before the last commit
    x, y = data()

    model, opt = restore(path, 28)  # newer than anything committed: nothing to continue from
    with pytest.raises(ResumeError, match=f"the optimizer has taken 28 steps, the run holds "
                                          f"them up to {committed}, so this training "
                                          "checkpoint is ahead of the run"):
        attrib.Recorder(path, model, opt, **SETTINGS, resume=True)
    model, opt = restore(path, older)
    with pytest.raises(ResumeError, match=f"they are θ at step {older}. Pass resume={older}"):
        attrib.Recorder(path, model, opt, **SETTINGS, resume=True)
    assert attrib.open_run(path).n_steps == committed  # refusals write nothing

    with pytest.warns(UserWarning, match=f"the {committed - older} steps recorded after it are "
                                         "discarded"):
        rec = attrib.Recorder(path, model, opt, **SETTINGS, resume=older)
    with rec:
        train_steps(rec, model, opt, older, 37, x, y)
    run = attrib.open_run(path)
    assert_same_run(run, uninterrupted(tmp_path / "reference", 37))
    assert run.manifest["resumes"] == [{**run.manifest["resumes"][0], "step": older,
                                        "discarded_steps": committed - older,
                                        "previous_status": "crashed"}]
    listed = {p for parts in run.manifest["tables"].values() for p in parts}
    on_disk = {f.relative_to(run.dir).as_posix() for f in run.dir.glob("tables/*/*.parquet")}
    assert on_disk == listed  # no part of the discarded steps or of the crash is left


def test_resume_refuses_a_run_that_is_still_recording(tmp_path):
    model = mlp()
    opt = adamw(model)
    with attrib.Recorder(tmp_path, model, opt) as rec:
        with pytest.raises(ResumeError, match=r"is being recorded by process .* close that"):
            attrib.Recorder(tmp_path, model, opt, resume=True)
        assert not rec._closed


def test_resume_refuses_a_different_setup(tmp_path):
    path = tmp_path / "run"
    model = mlp()
    opt = adamw(model)
    x, y = data()
    with attrib.Recorder(path, model, opt, **SETTINGS) as rec:
        train_steps(rec, model, opt, 0, 10, x, y)

    with pytest.raises(ResumeError, match="optimizer was"):
        attrib.Recorder(path, model, torch.optim.SGD(model.parameters(), lr=0.1), resume=True)
    with pytest.raises(ResumeError, match="capture was"):
        attrib.Recorder(path, model, opt, capture=Project(k=8), resume=True)
    with pytest.raises(ResumeError, match=r"optimizer's step counts are .* restore the "
                                          r"optimizer's state_dict"):
        attrib.Recorder(path, model, adamw(model), resume=True)
    other = mlp()  # the same seed: θ_0
    with pytest.raises(ResumeError, match=r"they are θ at step 0\. Pass resume=0"):
        attrib.Recorder(path, other, adamw(other), resume=True)
    with torch.no_grad():
        other[0].bias += 1e-3
    with pytest.raises(ResumeError, match="not θ at step 10, where the run would continue, "
                                          "nor at any step"):
        attrib.Recorder(path, other, adamw(other), resume=True)
    with pytest.raises(ResumeError, match=r"resume=11: .* has 10 committed steps"):
        attrib.Recorder(path, model, opt, resume=11)
    train_steps(None, model, opt, 10, 13, x, y)  # a training checkpoint saved after a kill
    with pytest.raises(ResumeError, match=r"the optimizer has taken 13 steps, the run holds "
                                          r"them up to 10, so this training checkpoint is "
                                          r"ahead of the run"):
        attrib.Recorder(path, model, opt, resume=True)
    with pytest.raises(ValueError, match="not both"):
        attrib.Recorder(path, model, opt, resume=True, overwrite=True)
    with pytest.raises(FileNotFoundError, match="drop resume="):
        attrib.Recorder(tmp_path / "new", model, opt, resume=True)
    run = attrib.open_run(path)
    assert run.n_steps == 10 and run.status == "complete" and run.manifest["resumes"] == []
    assert np.array_equal(run.steps.column("step").to_numpy(), np.arange(10))


def test_overwrite_refuses_a_run_that_is_still_recording(tmp_path):
    """overwrite=True on a run a live Recorder writes into would delete its files under it:
    refused like resume=, and the live run completes intact."""
    model = mlp()
    opt = adamw(model)
    x, y = data()
    with attrib.Recorder(tmp_path, model, opt) as rec:
        train_steps(rec, model, opt, 0, 3, x, y)
        with pytest.raises(FileExistsError, match=r"is being recorded by process .* before "
                                                  r"overwriting it, or choose another"):
            other = mlp()
            attrib.Recorder(tmp_path, other, adamw(other), overwrite=True)
        train_steps(rec, model, opt, 3, 6, x, y)
    run = attrib.open_run(tmp_path)
    assert run.status == "complete" and run.n_steps == 6
    assert all(verify(tmp_path).column("ok").to_pylist())
    fresh = mlp()  # once it is closed, overwriting is allowed
    with attrib.Recorder(tmp_path, fresh, adamw(fresh), overwrite=True):
        pass


def test_a_widening_cut_short_is_finished_by_resume(tmp_path):
    """A batch larger than the first widens the per-example arrays, then attrib.json's
    examples_per_step; a kill between the two writes left arrays wider than the metadata,
    which resume refused. Resume now takes the arrays' width and goes on."""
    import json

    from attrib.schemas import format as fmt

    model = mlp()
    opt = adamw(model)
    x, y = data()
    path = tmp_path / "run"
    with attrib.Recorder(path, model, opt, **SETTINGS) as rec:
        for step, size in enumerate([4, 9, 6]):
            ids = batch_ids(step)[:size]
            rec.examples(ids)
            torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    meta = json.loads((path / fmt.META_FILE).read_text())
    assert meta["examples_per_step"] == 9
    meta["examples_per_step"] = 4  # as a kill right after the arrays were resized leaves it
    (path / fmt.META_FILE).write_text(json.dumps(meta))
    with attrib.Recorder(path, model, opt, **SETTINGS, resume=True) as rec:
        ids = batch_ids(3)[:7]
        rec.examples(ids)
        torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        opt.zero_grad()
    run = attrib.open_run(path)
    assert run.n_steps == 4 and run.meta["examples_per_step"] == 9
    assert [len(run.contributions(s)[0]) for s in range(4)] == [4, 9, 6, 7]
    assert all(verify(path).column("ok").to_pylist())
