"""`attrib verify` on sound, killed, tampered and non-finite runs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

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


LONG_TRAINING = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import attrib
    from conftest import data, mlp
    model = mlp(); opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = data()
    rec = attrib.Recorder({path!r}, model, opt, checkpoint_every=5, steps_per_chunk=4)
    open({path!r} + ".started", "w").close()
    for step in range(100000):
        rec.examples(torch.arange(32))
        torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step(); opt.zero_grad()
""")


def test_kill_9_at_random_points_leaves_a_run_that_verifies(tmp_path):
    """20 trainings killed after a random delay: mid-step, mid-write or mid-commit."""
    rng = random.Random(0)
    committed = []
    for trial in range(20):
        path = str(tmp_path / f"run{trial}")
        child = subprocess.Popen([sys.executable, "-c", LONG_TRAINING.format(
            path=path, tests=os.path.dirname(__file__))], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not os.path.exists(path + ".started"):
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        run = attrib.open_run(path)
        assert run.status == "crashed"
        assert failed(verify(path)) == {}, trial
        assert attrib.sql(path, "SELECT count(*) FROM steps").column(0)[0].as_py() == \
            run.n_steps
        committed.append(run.n_steps)
    assert len(set(committed)) > 5  # the kills landed at many different points


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
