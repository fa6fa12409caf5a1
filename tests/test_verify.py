"""`attrib verify` on sound, killed, tampered and non-finite runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import torch
import zarr
from click.testing import CliRunner
from conftest import OPTIMIZERS, mlp, train

import attrib
from attrib.analyzer.verify import verify
from attrib.cli.main import main
from attrib.schemas import format as fmt


def failed(table) -> dict[str, str]:
    return {r["check"]: r["detail"] for r in table.to_pylist() if not r["ok"]}


def test_a_sound_run_passes_every_check(run_dir):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), steps=23)
    table = verify(run_dir)
    assert failed(table) == {} and table.num_rows == 7
    result = CliRunner().invoke(main, ["verify", str(run_dir)])
    assert result.exit_code == 0 and "matches the fingerprints of θ, bit for bit" in result.output


KILLED_TRAININGS = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)  # no OpenMP pool in the parent: each fork starts clean
    sys.path.insert(0, {tests!r})
    import attrib
    from conftest import data, mlp
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # its lazy imports, before forking
    for kill_at in {kill_steps!r}:  # one interpreter, a fork per training: imports paid once
        pid = os.fork()
        if pid == 0:
            model = mlp(); opt = torch.optim.AdamW(model.parameters(), lr=0.01)
            x, y = data()
            rec = attrib.Recorder(f"{path}{{kill_at}}", model, opt, checkpoint_every=5,
                                  steps_per_chunk=4)
            for step in range(kill_at + 1):
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                rec.examples(torch.arange(32))
                torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
                opt.step(); opt.zero_grad()
            os._exit(3)  # not reached
        _, status = os.waitpid(pid, 0)  # reaped: the run's writer is then seen as dead
        print(kill_at, os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, flush=True)
""")
# Steps at which training kills itself: before the first block is full, on and beside block
# (4 steps) and checkpoint (5) boundaries, and later; the writer thread is then somewhere in
# writing or committing earlier blocks, wherever its speed has taken it.
KILL_STEPS = (1, 5, 9, 16, 27, 42)


def test_kill_9_at_many_points_leaves_a_run_that_verifies(tmp_path):
    """Trainings killed at chosen steps (not after chosen delays, so what is tested doesn't
    depend on the machine's speed): each leaves a crashed run that verifies, whose steps
    table matches its committed steps, and which holds at least every block the bounded
    queue forced out (3 buffers of 4 steps: filling a block needs the one 3 before it done)."""
    child = subprocess.run([sys.executable, "-c", KILLED_TRAININGS.format(
        path=str(tmp_path / "run"), tests=os.path.dirname(__file__), kill_steps=KILL_STEPS)],
        capture_output=True, timeout=300)
    assert child.returncode == 0, child.stderr.decode()
    killed = dict(line.split() for line in child.stdout.decode().splitlines())
    assert killed == {str(k): str(int(signal.SIGKILL)) for k in KILL_STEPS}, killed
    for kill_at in KILL_STEPS:
        path = str(tmp_path / f"run{kill_at}")
        run = attrib.open_run(path)
        assert run.status == "crashed"
        assert failed(verify(path)) == {}, kill_at
        assert attrib.sql(path, "SELECT count(*) FROM steps").column(0)[0].as_py() == \
            run.n_steps
        assert 4 * (kill_at // 4 - 3) <= run.n_steps <= kill_at, (kill_at, run.n_steps)


def test_tampering_is_caught(run_dir):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["sgd"](model.parameters()), steps=23)
    run = attrib.open_run(run_dir)
    group = zarr.open_group(run_dir / fmt.STORE_DIR, mode="r+")
    key = run.params.column("key")[0].as_py()
    grads = group[f"{fmt.GRADS}/{key}"]
    grads[12] = np.asarray(grads[12]) + 1.0  # a hand-edited step between checkpoints
    steps_file = run.table_files("steps")[0]
    pq.write_table(pq.read_table(steps_file).slice(0, 10), steps_file)  # a truncated table
    problems = failed(verify(run_dir))
    assert "misses the stored checkpoint (θ or optimizer state) after step 19" in problems[
        "replay"]
    assert "before step 13 is not what training had" in problems["replay"]
    assert "10 rows for 23 committed steps" in problems["steps table"]
    result = CliRunner().invoke(main, ["verify", str(run_dir)])
    assert result.exit_code == 1


def test_non_finite_gradients_are_recorded_and_flagged(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 10)
    with attrib.Recorder(run_dir, model, opt, capture=False) as rec:
        for step in range(4):
            rec.examples(torch.arange(8))
            loss = model(x).sum() * (float("nan") if step == 2 else 1.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(run_dir)
    assert run.status == "complete" and run.n_steps == 4
    table = verify(run_dir)
    chunks = {r["check"]: r for r in table.to_pylist()}["chunks"]
    assert chunks["ok"] and "non-finite" in chunks["detail"]
    assert "at step 2" in chunks["detail"] and "at step 3" in chunks["detail"]


def test_verify_reports_an_unreadable_run_without_raising(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / fmt.META_FILE).write_text("{not json")
    assert "not valid JSON" in failed(verify(tmp_path / "run"))["metadata"]


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, warnings, torch
    sys.path.insert(0, {tests!r})
    import attrib
    from conftest import data, mlp
    model = mlp(); opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = data()
    rec = attrib.Recorder({path!r}, model, opt, checkpoint_every=5, steps_per_chunk=2,
                          capture=attrib.Full(), strict={strict})
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for step in range(60):
                if step == 10:  # the disk fills: files can't grow past 20 kB (EFBIG)
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
                rec.examples(torch.arange(32))
                loss = torch.nn.functional.cross_entropy(model(x[:32]), y[:32])
                loss.backward()
                opt.step(); opt.zero_grad()
                losses.append(loss.item())
            rec.close()
        except attrib.RecordingError as e:
            print("RAISED", e); sys.exit(3)
    print("TRAINED", len(losses), any("recording" in str(w.message).lower() for w in caught))
""")


def test_a_full_disk_stops_recording_not_training(tmp_path):
    path = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-c", FULL_DISK.format(
        path=path, tests=os.path.dirname(__file__), strict=False)], capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TRAINED 60 True" in result.stdout  # all steps trained, and a warning said why
    run = attrib.open_run(path)
    assert run.status == "incomplete" and 0 < run.n_steps < 60
    assert failed(verify(path)) == {}  # what was committed is whole


def test_a_full_disk_raises_in_strict_mode(tmp_path):
    path = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-c", FULL_DISK.format(
        path=path, tests=os.path.dirname(__file__), strict=True)], capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 3 and "RAISED" in result.stdout, result.stdout + result.stderr
