"""Bad input gets a clear error up front; a recording failure mid-run never stops training
unless strict=True, and the run says what happened."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import OPTIMIZERS, data, mlp

import attrib
from attrib.analyzer.verify import verify
from attrib.recorder.optimizers import UnsupportedOptimizerError


def test_unsupported_optimizer_names_the_supported_ones(run_dir):
    model = mlp()
    with pytest.raises(UnsupportedOptimizerError, match=r"RMSprop.*torch\.optim\.SGD.*Adam"):
        attrib.Recorder(run_dir, model, torch.optim.RMSprop(model.parameters()))
    assert not run_dir.exists()


def test_maximize_is_refused(run_dir):
    model = mlp()
    with pytest.raises(UnsupportedOptimizerError, match="maximize=True"):
        attrib.Recorder(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1,
                                                        maximize=True))


def test_optimizer_param_outside_the_model(run_dir):
    model, other = mlp(), torch.nn.Linear(3, 3)
    opt = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the model given to Recorder"):
        attrib.Recorder(run_dir, model, opt)


def test_existing_run_needs_overwrite(run_dir):
    model = mlp()
    attrib.Recorder(run_dir, model, OPTIMIZERS["sgd"](model.parameters())).close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        attrib.Recorder(run_dir, model, OPTIMIZERS["sgd"](model.parameters()))
    attrib.Recorder(run_dir, model, OPTIMIZERS["sgd"](model.parameters()), overwrite=True).close()
    assert attrib.open_run(run_dir).status == "complete"


def test_foreign_directory_is_never_deleted(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    model = mlp()
    with pytest.raises(FileExistsError, match="not empty"):
        attrib.Recorder(tmp_path, model, OPTIMIZERS["sgd"](model.parameters()), overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("ids", [torch.zeros(2, 3, dtype=torch.long), [0.5, 1.5], "abc"])
def test_bad_example_ids(run_dir, ids):
    model = mlp()
    with (attrib.Recorder(run_dir, model, OPTIMIZERS["sgd"](model.parameters())) as rec,
          pytest.raises(ValueError, match="1-D sequence of integer example ids")):
        rec.examples(ids)


@pytest.mark.parametrize("ids", [np.array([1, 2**63], dtype=np.uint64), [-1, 3]])
def test_example_ids_outside_int64_or_negative_are_refused(run_dir, ids):
    """2^63 would be stored wrapped to a negative id, and −1 means "no example" in readers."""
    model = mlp()
    with (attrib.Recorder(run_dir, model, OPTIMIZERS["sgd"](model.parameters())) as rec,
          pytest.raises(ValueError, match=r"ids must lie in \[0, 2\^63\)")):
        rec.examples(ids)


def _train_with_new_group(run_dir, strict: bool) -> int:
    """Add a param group mid-run, which the recorder can't follow; returns steps trained."""
    model, extra = mlp(), torch.nn.Linear(2, 2)
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    steps = 0
    with attrib.Recorder(run_dir, model, opt, steps_per_chunk=4, strict=strict) as rec:
        for step in range(12):
            if step == 6:
                opt.add_param_group({"params": extra.parameters()})
            rec.examples(torch.arange(16))
            torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
            opt.step()
            opt.zero_grad()
            steps += 1
    return steps


def test_non_strict_failure_keeps_training_and_marks_incomplete(run_dir):
    with pytest.warns(UserWarning, match="training continues.*incomplete"):
        assert _train_with_new_group(run_dir, strict=False) == 12
    run = attrib.open_run(run_dir)
    assert run.status == "incomplete"
    assert run.n_steps == 6  # everything before the failure is committed
    assert "parameters changed" in run.manifest["error"]
    assert run.reconstruct(6)  # readable


def test_strict_failure_raises(run_dir):
    with pytest.raises(attrib.RecordingError, match="parameters changed"):
        _train_with_new_group(run_dir, strict=True)
    run = attrib.open_run(run_dir)
    assert run.status == "crashed" and run.n_steps == 6


def test_log_attaches_to_the_right_step_and_stages_table(run_dir):
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    with attrib.Recorder(run_dir, model, opt, steps_per_chunk=4) as rec:
        for step in range(10):
            if step in (3, 6):
                rec.stage("warmup" if step == 3 else "finetune")
            rec.epoch(step // 5)
            rec.examples(torch.arange(8))
            loss = torch.nn.functional.cross_entropy(model(x[:8]), y[:8])
            loss.backward()
            rec.log(before=float(step))  # after backward, before step: this step
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss, after=torch.tensor(step + 0.5))  # after step: this step
    steps = attrib.open_run(run_dir).steps.to_pylist()
    assert [dict(s["metrics"]) for s in steps] == [
        {"before": float(i), "after": i + 0.5} for i in range(10)]
    assert [s["epoch"] for s in steps] == [0] * 5 + [1] * 5
    stages = attrib.open_run(run_dir).stages.to_pylist()
    assert stages == [
        {"stage": "default", "start_step": 0, "end_step": 2, "n_steps": 3},
        {"stage": "warmup", "start_step": 3, "end_step": 5, "n_steps": 3},
        {"stage": "finetune", "start_step": 6, "end_step": 9, "n_steps": 4},
    ]


def _train_changing(run_dir, change, strict: bool = False, steps: int = 8, ids=None):
    """Train `steps` steps; `change(model, step)` may alter the model or return other ids."""
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    with attrib.Recorder(run_dir, model, opt, steps_per_chunk=4, strict=strict) as rec:
        for step in range(steps):
            ids = change(model, step)
            if ids is not None:
                rec.examples(ids)
            torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
            opt.step()
            opt.zero_grad()
    return attrib.open_run(run_dir)


def _replace_head(model, step):
    if step == 5:
        model[2] = torch.nn.Linear(16, 3)
    return torch.arange(16)


def _widen_head(model, step):
    if step == 5:
        model[2].weight.data = torch.zeros(4, 16)
        model[2].bias.data = torch.zeros(4)
    return torch.arange(16)


@pytest.mark.parametrize(("change", "message"), [
    (_replace_head, r"parameters \['2.weight', '2.bias'\] are no longer part of the model"),
    (_widen_head, r"parameter 2.weight is now torch.float32 of shape \(4, 16\), not "),
])
def test_model_changed_after_attach(run_dir, change, message):
    with pytest.warns(UserWarning, match=message):
        run = _train_changing(run_dir, change)
    assert run.status == "incomplete" and run.n_steps == 5  # the steps before it are kept
    assert "attach a new Recorder" in run.manifest["error"]
    assert verify(run_dir).column("ok").to_pylist() == [True] * 7
    with pytest.raises(attrib.RecordingError, match=message):
        _train_changing(run_dir.with_name("strict"), change, strict=True)


@pytest.mark.parametrize(("ids", "message"), [
    (None, r"loss.backward\(\) ran without rec.examples\(ids\) before it"),
    (torch.arange(15), r"module '[02]' \(Linear\) ran on a batch of 16, but rec.examples\(\) "
                       r"declared 15 ids; pass one id per example"),
])
def test_missing_or_miscounted_example_ids(run_dir, ids, message):
    """Per-example data that can't be captured is said once, recorded as residual (the run's
    totals stay exact), and raises under strict=True."""
    def change(model, step):
        return ids if step == 3 else torch.arange(16)

    with pytest.warns(UserWarning, match=message) as caught:
        run = _train_changing(run_dir, change)
    assert sum("attrib: step" in str(w.message) for w in caught) == 1
    assert run.status == "complete" and run.n_steps == 8
    residual = run.residual_norms()
    np.testing.assert_allclose(residual[3], 1.0)  # all of step 3's gradient is residual
    assert np.nanmax(np.delete(residual, 3, axis=0)) < 1e-5
    with pytest.raises(attrib.RecordingError, match=message):
        _train_changing(run_dir.with_name("strict"), change, strict=True)


def test_duplicated_ids_are_separate_rows(run_dir):
    """Sampling with replacement repeats ids in a batch: each occurrence is its own row."""
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    ids = torch.tensor([4, 7, 4, 4])
    with attrib.Recorder(run_dir, model, opt) as rec:
        rec.examples(ids)
        torch.nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="sum").backward()
        opt.step()
    got, rows = attrib.open_run(run_dir).contributions(0)
    assert got.tolist() == [4, 7, 4, 4]
    for value in rows.values():
        torch.testing.assert_close(value[2], value[0], rtol=0, atol=0)
        torch.testing.assert_close(value[3], value[0], rtol=0, atol=0)
        assert not torch.equal(value[1], value[0])


def test_a_constructor_that_fails_leaves_nothing_behind(run_dir, monkeypatch):
    """A Recorder() that fails after creating its run stops its writer thread, removes its
    hooks and the directory it made, so a retry into the same directory just works."""
    import threading

    from attrib.recorder.recorder import Recorder

    def broken(self):
        raise RuntimeError("disk full")

    model = mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    writers = sum(t.name == "attrib-writer" for t in threading.enumerate())
    with monkeypatch.context() as patch:
        patch.setattr(Recorder, "_checkpoint_now", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            attrib.Recorder(run_dir, model, opt)
    assert sum(t.name == "attrib-writer" for t in threading.enumerate()) == writers
    assert not run_dir.exists()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with attrib.Recorder(run_dir, model, opt, capture=False) as rec:
        inputs, labels = data()
        rec.examples(torch.arange(16))
        torch.nn.functional.cross_entropy(model(inputs[:16]), labels[:16]).backward()
        opt.step()
    assert attrib.open_run(run_dir).n_steps == 1


@pytest.mark.parametrize("strict", [False, True])
def test_a_miscounted_micro_batch_is_said_even_when_another_was_captured(run_dir, strict):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, labels = data()
    message = r"module '[02]' \(Linear\) ran on a batch of 3, but rec.examples\(\) declared 2 ids"
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full(), strict=strict) as rec, \
            pytest.raises(attrib.RecordingError, match=message) if strict else \
            pytest.warns(UserWarning, match=message):
        rec.examples(torch.arange(2))
        (torch.nn.functional.cross_entropy(model(inputs[:3]), labels[:3]) * 0.75).backward()
        rec.examples(torch.arange(3, 4))
        (torch.nn.functional.cross_entropy(model(inputs[3:4]), labels[3:4]) * 0.25).backward()
        opt.step()


class _HeadUsedInPlainCode(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(12, 8)

    def forward(self, tokens):
        return self.emb(tokens).mean(1) @ self.emb.weight[:3].T  # tied head, no module


@pytest.mark.parametrize("strict", [False, True])
def test_a_use_the_capture_cannot_see_is_said(run_dir, strict):
    model = _HeadUsedInPlainCode()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 12, (8, 5), generator=torch.Generator().manual_seed(0))
    message = r"rows of \['emb.weight'\] explain only part of their gradient"
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full(), strict=strict) as rec, \
            pytest.raises(attrib.RecordingError, match=message) if strict else \
            pytest.warns(UserWarning, match=message):
        rec.examples(torch.arange(8))
        torch.nn.functional.cross_entropy(model(tokens), tokens[:, 0] % 3).backward()
        opt.step()


def test_a_parameter_unfrozen_after_attach_is_said(run_dir):
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, labels = data()
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full()) as rec, \
            pytest.warns(UserWarning, match=r"parameters \['0.weight'\] were frozen when "
                                            "Recorder attached and now train"):
        for step in range(2):
            if step == 1:
                model[0].weight.requires_grad_(True)
            rec.examples(torch.arange(16))
            torch.nn.functional.cross_entropy(model(inputs[:16]), labels[:16]).backward()
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize(("setting", "message"), [
    ({"steps_per_chunk": -3}, "steps_per_chunk must be ≥ 1"),
    ({"buffers": 0}, "buffers must be ≥ 1"),
])
def test_bad_sizes_are_refused_up_front(run_dir, setting, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        attrib.Recorder(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), **setting)
    assert not run_dir.exists()


def test_logged_values_the_writer_cannot_store_are_refused_or_stored_as_float(run_dir):
    """rec.log(big=10**30) is stored as the float 1e30 (it used to fail the writer after the
    manifest counted the step); a metric name with a lone surrogate and a number beyond
    float64 are refused at log() time; the run stays complete and verifies."""
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    with attrib.Recorder(run_dir, model, opt, steps_per_chunk=2) as rec:
        for step in range(4):
            rec.examples(torch.arange(8))
            torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
            opt.step()
            opt.zero_grad()
            rec.log(big=10**30, count=np.int64(step))
            with pytest.raises(ValueError, match="not valid Unicode text"):
                rec.log(**{"bad\ud800": 1.0})
            with pytest.raises(ValueError, match="beyond float64's range"):
                rec.log(huge=10**400)
    run = attrib.open_run(run_dir)
    assert run.status == "complete" and run.n_steps == 4
    metrics = attrib.sql(run_dir, "SELECT metrics['big'] AS big, metrics['count'] AS c "
                                  "FROM steps ORDER BY step")
    assert metrics["big"].to_pylist() == [1e30] * 4 and metrics["c"].to_pylist() == [0, 1, 2, 3]
    assert all(verify(run_dir).column("ok").to_pylist())


def test_a_block_whose_tables_fail_is_not_counted(run_dir):
    """The steps table's folder becomes unwritable mid-run (replaced by a file): the block
    being written fails after its arrays and examples part, and is cut back out, so the
    manifest counts only steps whose every table was written and the run verifies."""
    import time

    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    steps_dir = run_dir / "tables" / "steps"
    with (pytest.warns(UserWarning, match="recording stopped"),
          attrib.Recorder(run_dir, model, opt, steps_per_chunk=2) as rec):
        for step in range(6):
            if step == 3:  # the first block (steps 0-1) is committed by now
                deadline = time.monotonic() + 60
                while attrib.open_run(run_dir).n_steps < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                steps_dir.rename(run_dir / "steps-aside")
                steps_dir.write_text("not a folder")
            rec.examples(torch.arange(8))
            torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
            opt.step()
            opt.zero_grad()
    steps_dir.unlink()
    (run_dir / "steps-aside").rename(steps_dir)
    run = attrib.open_run(run_dir)
    assert run.status == "incomplete" and run.n_steps == 2 and run.steps.num_rows == 2
    assert all(verify(run_dir).column("ok").to_pylist())


def test_a_non_finite_gradient_is_said_at_its_step(run_dir):
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    with (pytest.warns(UserWarning, match=r"step 2: the gradient is not finite") as caught,
          attrib.Recorder(run_dir, model, opt, capture=False) as rec):
        for step in range(4):
            rec.examples(torch.arange(8))
            loss = torch.nn.functional.cross_entropy(model(x[:8]), y[:8])
            (loss * (float("nan") if step == 2 else 1.0)).backward()
            opt.step()
            opt.zero_grad()
    assert sum("not finite" in str(w.message) for w in caught) == 1  # once, not per step
    assert attrib.open_run(run_dir).n_steps == 4


def test_capture_without_examples_at_the_first_step_names_the_fix(run_dir):
    """Per-example capture lays out its rows at the first step: without rec.examples(ids)
    there, recording stopped with ZeroDivisionError; now the message says what to call.
    Training continues; strict mode raises it."""
    from attrib.recorder.writer import RecordingError

    x, y = data()

    def train(path, strict: bool) -> None:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with attrib.Recorder(path, model, opt, strict=strict) as rec:
            for step in range(3):
                ids = torch.arange(step * 16, step * 16 + 16)
                if step > 0:
                    rec.examples(ids)
                torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
                opt.step()
                opt.zero_grad()

    fix = r"step 0 declared none: call rec.examples\(ids\) before every step's forward"
    with pytest.warns(UserWarning, match=fix):
        train(run_dir, strict=False)
    assert attrib.open_run(run_dir).status != "complete"
    with pytest.raises(RecordingError, match=fix):
        train(run_dir.parent / "strict", strict=True)


class _LeaksFromStep(torch.nn.Module):
    """An MLP whose output layer is also used in plain code (outside its module's forward)
    from the step `leak_from` on."""

    def __init__(self, leak_from: int) -> None:
        super().__init__()
        self.body, self.leak_from, self.step = mlp(), leak_from, 0

    def forward(self, x):
        out = self.body(x)
        if self.step >= self.leak_from:
            out = out + 0.1 * (x[:, :3] @ self.body[0].weight[:3, :3].T)
        return out


def test_the_check_runs_every_step_first_then_every_check_every_th(run_dir):
    """Σ_i c_i = G is checked on each of the first 16 steps and every check_every-th after
    (residual_norm NaN between); a use the hooks miss that starts on an unchecked step is
    said at the next checked one, and check_every=1 checks every step."""
    def record(path, check_every, leak_from):
        model = _LeaksFromStep(leak_from)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        inputs, labels = data()
        with warnings.catch_warnings(record=True) as said, \
                attrib.Recorder(path, model, opt, capture=attrib.Full(),
                                check_every=check_every) as rec:
            warnings.simplefilter("always")
            for step in range(40):
                model.step = step
                rec.examples(torch.arange(16))
                torch.nn.functional.cross_entropy(model(inputs[:16]), labels[:16]).backward()
                opt.step()
                opt.zero_grad()
        return attrib.open_run(path).residual_norms(), [str(w.message) for w in said]

    norms, said = record(run_dir / "sampled", 10, leak_from=22)
    checked = [s for s in range(40) if not np.isnan(norms[s]).all()]
    assert checked == [*range(16), 20, 30]
    assert np.nanmax(norms[:21]) < 1e-5 and norms[30, 0] > 1e-3  # 0.weight leaks from 22 on
    assert any("step 30: the per-example rows of ['body.0.weight'] explain only part" in m
               for m in said)
    every, said = record(run_dir / "every", 1, leak_from=22)
    assert not np.isnan(every).any() and every[22, 0] > 1e-3
    assert any("step 22: the per-example rows of ['body.0.weight']" in m for m in said)
    with pytest.raises(ValueError, match="check_every must be an integer ≥ 1"):
        attrib.Recorder(run_dir / "bad", mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1),
                        check_every=0)


def test_strict_checks_every_step_and_lost_rows_read_one_on_unchecked_steps(run_dir):
    """strict=True checks every step unless told otherwise, so a use the hooks miss on one late
    step raises there; without strict, a step whose rows are missing altogether (no
    rec.examples() before its backward) reads 1 in residual_norm even when unchecked."""
    model = _LeaksFromStep(leak_from=10**9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, labels = data()
    with pytest.raises(attrib.RecordingError, match=r"step 19: the per-example rows of "
                                                    r"\['body.0.weight'\] explain only part"), \
            attrib.Recorder(run_dir / "strict", model, opt, capture=attrib.Full(),
                            strict=True) as rec:
        for step in range(20):
            model.step, model.leak_from = step, (19 if step == 19 else 10**9)  # one late step
            rec.examples(torch.arange(16))
            torch.nn.functional.cross_entropy(model(inputs[:16]), labels[:16]).backward()
            opt.step()
            opt.zero_grad()

    model = _LeaksFromStep(leak_from=10**9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="without rec.examples"), \
            attrib.Recorder(run_dir / "lost", model, opt, capture=attrib.Full()) as rec:
        for step in range(24):
            if step != 20:  # step 20 (unchecked: not < 16, not a multiple of 16) loses its rows
                rec.examples(torch.arange(16))
            torch.nn.functional.cross_entropy(model(inputs[:16]), labels[:16]).backward()
            opt.step()
            opt.zero_grad()
    norms = attrib.open_run(run_dir / "lost").residual_norms()
    assert (norms[20] == 1).all() and np.isnan(norms[[17, 21]]).all()
    assert attrib.open_run(run_dir / "lost").meta["check_every"] == 16
