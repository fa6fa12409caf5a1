"""Crash safety: committed steps survive an exception in training and a kill -9."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import OPTIMIZERS, data, mlp

import attrib
from attrib.analyzer.run import read_snapshot
from attrib.analyzer.verify import verify
from attrib.schemas import format as fmt


def test_exception_in_training_marks_crashed_and_keeps_steps(run_dir):
    model = mlp()
    opt = OPTIMIZERS["sgd_nesterov"](model.parameters())
    x, y = data()
    thetas = []
    with (pytest.raises(RuntimeError, match="diverged"),
          attrib.Recorder(run_dir, model, opt, checkpoint_every=5, steps_per_chunk=8) as rec):
        for step in range(100):
            thetas.append({k: v.detach().clone() for k, v in model.named_parameters()})
            if step == 19:
                raise RuntimeError("loss diverged")
            rec.examples(torch.arange(32))
            torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(run_dir)
    assert run.status == "crashed"
    assert run.n_steps == 19  # the partial block was flushed on the way out
    for step in (0, 7, 19):
        for name, value in thetas[step].items():
            torch.testing.assert_close(run.reconstruct(step)[name], value, rtol=0, atol=1e-6)


KILLED_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import attrib
    from conftest import data, mlp
    model = mlp(); opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = data()
    rec = attrib.Recorder({path!r}, model, opt, checkpoint_every=5, steps_per_chunk=8)
    for step in range(100):
        torch.save({{k: v.detach().clone() for k, v in model.named_parameters()}},
                   {path!r} + f"-live-{{step}}.pt")
        if step == 29:
            os.kill(os.getpid(), signal.SIGKILL)
        rec.examples(torch.arange(32))
        torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step(); opt.zero_grad()
""")


def test_kill_9_keeps_every_committed_block(tmp_path):
    path = str(tmp_path / "run")
    script = KILLED_SCRIPT.format(path=path, tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()
    run = attrib.open_run(path)
    assert run.status == "crashed"  # manifest says recording, but its process is gone
    # steps 0…28 ran in blocks of 8; with 3 block buffers, block 3 (steps 24…) could only be
    # filled after block 0 was written, and at most blocks 1 and 2 were still in flight
    assert run.n_steps in (8, 16, 24)
    assert run.steps.num_rows == run.n_steps
    assert attrib.sql(path, "SELECT max(step) FROM steps").column(0)[0].as_py() == run.n_steps - 1
    for step in range(run.n_steps + 1):
        live = torch.load(f"{path}-live-{step}.pt", weights_only=True)
        rebuilt = run.reconstruct(step)
        for name, value in live.items():
            torch.testing.assert_close(rebuilt[name], value, rtol=0, atol=1e-6)


def test_a_recorder_never_closed_commits_every_step_at_exit(tmp_path):
    """No `with`, no close(): at a normal interpreter exit every trained step is committed
    (the close runs before the thread pools the writer needs shut down) and the manifest
    says the run was never closed."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import attrib
        from conftest import data, mlp
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = attrib.Recorder({str(tmp_path / "run")!r}, model, opt, steps_per_chunk=4)
        x, y = data()
        for _ in range(10):
            rec.examples(torch.arange(32))
            torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
            opt.step()
            opt.zero_grad()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "was never closed" in result.stderr
    run = attrib.open_run(tmp_path / "run")
    assert (run.status, run.n_steps) == ("incomplete", 10)
    assert run.manifest["error"] == "Recorder.close() was never called"
    assert all(verify(tmp_path / "run").column("ok").to_pylist())


def test_a_reader_of_an_earlier_commit_finds_every_file_it_lists(tmp_path):
    """The stages and checkpoints tables are rewritten whole at each commit: a reader that
    opened the run before later commits (info, sql, verify while recording) must still find
    the files its manifest lists; the final commit removes the unlisted ones."""
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    with attrib.Recorder(tmp_path / "run", model, opt, steps_per_chunk=1,
                         checkpoint_every=2) as rec:
        for step in range(8):
            if step == 3:
                deadline = time.monotonic() + 60
                while (attrib.open_run(tmp_path / "run").n_steps < 2
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                early = attrib.open_run(tmp_path / "run")  # reads the manifest of now
                assert early.n_steps >= 2
            rec.examples(torch.arange(8))
            rec.stage(f"stage{step // 2}")
            torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
            opt.step()
            opt.zero_grad()
        deadline = time.monotonic() + 60  # later blocks committed, each rewriting stages
        while attrib.open_run(tmp_path / "run").n_steps < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert attrib.open_run(tmp_path / "run").n_steps >= 7
        assert early.table("stages").num_rows >= 1  # its files are still there
        assert early.table("checkpoints").num_rows >= 1
    listed = {p for parts in attrib.open_run(tmp_path / "run").manifest["tables"].values()
              for p in parts}
    on_disk = {p.relative_to(tmp_path / "run").as_posix()
               for p in (tmp_path / "run" / "tables").rglob("*.parquet")}
    assert on_disk == listed  # the final commit left no unlisted file behind


def test_sql_opening_a_run_as_its_final_commit_removes_parts_opens_it_again(tmp_path,
                                                                           monkeypatch):
    """sql opens the run (reading each part's footer) then queries it: when the close's
    compaction removes a part between reading the manifest and reading that part's footer,
    the query starts over on the run as now committed instead of failing (CI once saw this
    race under load)."""
    import attrib.analyzer.run as run_module
    model = mlp()
    opt = OPTIMIZERS["sgd"](model.parameters())
    x, y = data()
    rec = attrib.Recorder(tmp_path / "run", model, opt, steps_per_chunk=1)
    for _ in range(6):
        rec.examples(torch.arange(8))
        torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
        opt.zero_grad()
    deadline = time.monotonic() + 60  # the writer commits each block in the background

    def listed() -> list[str]:
        return attrib.open_run(tmp_path / "run").manifest["tables"]["steps"]

    while len(listed()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    parts = listed()
    assert len(parts) > 1  # the close compacts them into one, removing these
    real, calls = run_module.pq.read_metadata, []

    def close_then_read(file, *args, **kwargs):
        if not calls:
            rec.close()  # the final commit, between the manifest read and this footer
        calls.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(run_module.pq, "read_metadata", close_then_read)
    counted = attrib.sql(tmp_path / "run", "SELECT count(*) AS n FROM steps")
    assert counted.column("n")[0].as_py() == 6
    assert not (tmp_path / "run" / parts[0]).exists()  # the race did happen


def test_sigterm_commits_the_trained_steps_then_terminates(tmp_path):
    """SIGTERM (a cluster preempting the job) mid-training: the recorder commits every step
    trained so far and marks the run, then the process ends by the signal as it would have."""
    import signal

    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import attrib
        from conftest import data, mlp
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = data()
        with attrib.Recorder({str(tmp_path / "run")!r}, model, opt, steps_per_chunk=4) as rec:
            for step in range(10_000):
                rec.examples(torch.arange(32))
                torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
                opt.step()
                opt.zero_grad()
                print("trained", step + 1, flush=True)
                time.sleep(0.01)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    trained = 0
    while trained < 6:  # a block and a half in
        trained = int(child.stdout.readline().split()[1])
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    trained = max([trained, *(int(n) for n in out.split()[1::2])])
    assert child.returncode == -signal.SIGTERM, err
    assert "was stopped by SIGTERM" in err
    run = attrib.open_run(tmp_path / "run")
    assert run.status == "incomplete" and run.n_steps >= 6 and run.n_steps in (trained,
                                                                               trained + 1)
    assert "SIGTERM" in run.manifest["error"]
    assert all(verify(tmp_path / "run").column("ok").to_pylist())


LIVE_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import attrib
    from conftest import data, mlp
    model = mlp(); opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = data()
    with attrib.Recorder({path!r}, model, opt, checkpoint_every=3, steps_per_chunk=2) as rec:
        for step in range(150):
            if step % 7 == 0:
                rec.stage(f"stage{{step // 7}}")
            rec.examples(torch.arange(16))
            loss = torch.nn.functional.cross_entropy(model(x[:16]), y[:16])
            loss.backward()
            opt.step(); opt.zero_grad()
            rec.log(loss=loss)
            time.sleep(0.01)
""")


def test_readers_of_a_live_run_see_a_consistent_committed_snapshot(tmp_path):
    """verify, info and sql run over and over while another process records (blocks of 2
    steps, the stages and checkpoints tables rewritten at every commit, the tables compacted
    at close): each sees the run as of one commit, opening it again when a later commit removed
    a file it listed, so every read succeeds and every verify check passes."""
    path = str(tmp_path / "run")
    tests = os.path.dirname(__file__)
    child = subprocess.Popen([sys.executable, "-c", LIVE_SCRIPT.format(tests=tests, path=path)],
                             stderr=subprocess.PIPE, text=True)
    reads, failures = 0, []
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            try:
                run = attrib.open_run(path)
            except (fmt.FormatError, FileNotFoundError):
                time.sleep(0.05)  # not created yet
                continue
            try:
                bad = [r for r in verify(path).to_pylist() if not r["ok"]]
                failures += [f"verify at {run.n_steps}: {r}" for r in bad]
                counted = attrib.sql(path, "SELECT count(*) AS n FROM steps")
                assert counted.column("n")[0].as_py() >= run.n_steps
                try:
                    run.info()
                except fmt.RunChanged:  # a Run object held across commits says so
                    read_snapshot(path, lambda opened: opened.info())  # as `attrib info` reads
                reads += 1
            except Exception as e:  # every failure is collected and shown
                failures.append(f"{type(e).__name__}: {e}")
    finally:
        child.kill() if child.poll() is None else None
        _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-2000:]
    assert not failures, failures[:3]
    assert reads >= 3  # the loop ran while the run was recorded
