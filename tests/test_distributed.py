"""Recording under DistributedDataParallel: 2 gloo processes on CPU record the same run as one
process over the same global batch (to float round-off)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import data, mlp, spawn
from test_path_kernel import assert_complete, probe_points
from test_resume import assert_same_run

import attrib
from attrib.analyzer.verify import verify
from attrib.recorder.distributed import DistributedError
from attrib.recorder.resume import ResumeError
from attrib.recorder.store import RANK_SEQUENCES, RunStore
from attrib.schemas import format as fmt

WORLD, LOCAL_BATCH, STEPS = 2, 8, 11
CAPTURE = [attrib.TopK(6), attrib.Project(16, kind="dense", params=("0.weight",)),
           attrib.Full(params=("2.*",))]
SETTINGS = dict(steps_per_chunk=4, checkpoint_every=5)


def global_batch(step: int) -> torch.Tensor:
    return torch.randperm(256, generator=torch.Generator().manual_seed(step))[:WORLD * LOCAL_BATCH]


def train(rec, model, opt, rank: int, world: int, fail_at: int | None = None,
          steps: range = range(STEPS)) -> None:
    x, y = data()
    for step in steps:
        ids = global_batch(step).view(world, -1)[rank]
        if step == fail_at and rank == 1:  # twice the ids the per-example arrays hold:
            rec.examples(ids)  # this rank's recording stops at the step (with a warning)
        rec.examples(ids, tokens=torch.stack([ids % 7, ids % 11], 1))
        loss = F.cross_entropy(model(x[ids]), y[ids])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()
        opt.zero_grad()
        rec.log(loss=loss)


@contextlib.contextmanager
def process_group(rank: int, world: int, init: str, quiet: bool = True) -> Iterator[None]:
    """This spawned process's place in a gloo job, left on the way out."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    warnings.simplefilter("ignore" if quiet else "default")
    try:
        yield
    finally:
        dist.destroy_process_group()


def ddp_adamw(model_fn=mlp) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.parallel.DistributedDataParallel(model_fn())
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def worker(rank: int, world: int, init: str, path: str, capture=CAPTURE,
           fail_at: int | None = None, model_fn=mlp, comm_hook=None) -> None:
    with process_group(rank, world, init, quiet=fail_at is not None):
        model, opt = ddp_adamw(model_fn)
        if comm_hook is not None:  # the user's own, which the recorder leaves alone
            model.register_comm_hook(None, comm_hook)
        with attrib.Recorder(path, model, opt, capture=capture, **SETTINGS) as rec:
            train(rec, model, opt, rank, world, fail_at)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    where = tmp_path_factory.mktemp("ddp")
    spawn(worker, args=(WORLD, str(where / "init"), str(where / "ddp")), nprocs=WORLD)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    with attrib.Recorder(where / "single", model, opt, capture=CAPTURE, **SETTINGS) as rec:
        train(rec, model, opt, 0, 1)
    return attrib.open_run(where / "ddp"), attrib.open_run(where / "single")


def test_ddp_run_equals_the_single_process_run(runs):
    ddp, single = runs
    assert ddp.status == "complete" and ddp.n_steps == single.n_steps == STEPS
    assert ddp.meta["distributed"]["world_size"] == WORLD
    assert verify(ddp.dir).column("ok").to_pylist() == [True] * 7
    assert ddp.checkpoint_steps == single.checkpoint_steps
    # the clip factor needs ‖G‖ of the all-reduced gradient, not the local one
    assert (single.clip_factors() < 0.99).any()
    np.testing.assert_allclose(ddp.clip_factors(), single.clip_factors(), rtol=1e-5)
    for step in range(STEPS + 1):
        for name, value in single.reconstruct(step).items():
            torch.testing.assert_close(ddp.reconstruct(step)[name], value, rtol=1e-4, atol=1e-6)
    for name in single.param_names:
        torch.testing.assert_close(ddp.grads(name), single.grads(name), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ddp.state(name, "exp_avg_sq"),
                                   single.state(name, "exp_avg_sq"), rtol=1e-4, atol=1e-10)


def test_path_kernel_on_the_ddp_run(runs):
    """Completeness holds, and the per-example influences match the single-process run's."""
    ddp, single = runs
    results = [attrib.analyze.path_kernel(run, mlp, probe_points(), progress=False)
               for run in (ddp, single)]
    assert_complete(results[0])
    key = ["test_id", "example_id", "term"]
    tables = [r.table.group_by(key).aggregate([("value", "sum")]).sort_by(
        [(k, "ascending") for k in key]) for r in results]
    assert tables[0].select(key).equals(tables[1].select(key))
    np.testing.assert_allclose(tables[0]["value_sum"], tables[1]["value_sum"], rtol=1e-3,
                               atol=1e-6)


def test_each_rank_wrote_its_examples_rows(runs):
    """Rank r's examples are rows [r·B, (r+1)·B) of every step, as the single process's, and
    each example's tokens are stored once, though both ranks saw some examples."""
    ddp, single = runs
    order = [("step", "ascending"), ("row", "ascending")]
    assert ddp.examples.sort_by(order).select(["step", "row", "example_id"]).equals(
        single.examples.sort_by(order).select(["step", "row", "example_id"]))
    seen_by = {}
    for row in ddp.examples.to_pylist():
        seen_by.setdefault(row["example_id"], set()).add(row["row"] // LOCAL_BATCH)
    assert any(len(ranks) == WORLD for ranks in seen_by.values())
    order = [("example_id", "ascending"), ("position", "ascending")]
    assert ddp.table("tokens").sort_by(order).equals(single.table("tokens").sort_by(order))
    for name in ("0.weight", "2.weight", "2.bias"):
        torch.testing.assert_close(ddp.contribution_rows(name), single.contribution_rows(name),
                                   rtol=1e-4, atol=1e-7)
    # both ranks' chunks exist: no chunk of a per-example array spans the two ranks
    ids, rows = ddp.contributions(STEPS - 1)
    assert len(ids) == WORLD * LOCAL_BATCH and rows["2.weight"][LOCAL_BATCH:].abs().sum() > 0
    assert np.isnan(ddp.residual_norms()).all()  # no rank sees the whole batch's examples


def test_each_rank_keeps_its_top_shifts(runs):
    """TopK per rank: every single-process top entry is among the ranks' (world·k rows)."""
    ddp, single = runs
    key = ["step", "example_id", "param", "flat_index"]
    ours = {tuple(r[k] for k in key): r["shift"] for r in ddp.shifts.to_pylist()}
    theirs = single.shifts.to_pylist()
    assert ddp.shifts.num_rows == WORLD * single.shifts.num_rows
    found = [r for r in theirs if tuple(r[k] for k in key) in ours]
    assert len(found) >= 0.95 * len(theirs)
    for r in found:
        assert ours[tuple(r[k] for k in key)] == pytest.approx(r["shift"], rel=1e-3, abs=1e-9)


def fsdp_worker(rank: int, world: int, init: str, path: str) -> None:
    with process_group(rank, world, init, quiet=False):
        from torch.distributed.fsdp import fully_shard

        model = mlp()
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(DistributedError, match="can't record FSDP"):
            attrib.Recorder(path, model, opt)


def test_fsdp_is_refused(tmp_path):
    spawn(fsdp_worker, args=(1, str(tmp_path / "init"), str(tmp_path / "run")), nprocs=1)


def test_resuming_a_ddp_run_in_one_process_is_refused(runs):
    ddp, _ = runs
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    with pytest.raises(ResumeError, match="distributed was"):
        attrib.Recorder(ddp.dir, model, opt, capture=CAPTURE, resume=True, **SETTINGS)


def test_ddp_without_per_example_capture(runs, tmp_path):
    """Ranks other than 0 then write only their examples table parts, rows numbered as one
    process would. The job registers its own comm hook: the clip factors still come from the
    all-reduced gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    _, single = runs
    spawn(worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path / "run"), False, None,
                           mlp, allreduce_hook), nprocs=WORLD)
    run = attrib.open_run(tmp_path / "run")
    assert run.status == "complete" and run.n_steps == STEPS
    np.testing.assert_allclose(run.clip_factors(), single.clip_factors(), rtol=1e-5)
    order = [("step", "ascending"), ("row", "ascending")]  # rank r's rows follow r ranks'
    assert run.examples.sort_by(order).select(["step", "row", "example_id"]).equals(
        single.examples.sort_by(order).select(["step", "row", "example_id"]))
    assert verify(run.dir).column("ok").to_pylist() == [True] * 7
    for name, value in single.reconstruct(STEPS).items():
        torch.testing.assert_close(run.reconstruct(STEPS)[name], value, rtol=1e-4, atol=1e-6)


def test_a_rank_that_stops_recording_stops_the_run_not_training(tmp_path):
    """Rank 1 fails at step 6: it tells rank 0 at once (no wait for a timeout), training goes
    on, and the run keeps the blocks every rank had committed, marked incomplete."""
    spawn(worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path / "run"), CAPTURE, 6),
             nprocs=WORLD)
    run = attrib.open_run(tmp_path / "run")
    assert run.status == "incomplete" and "rank 1 stopped recording" in run.manifest["error"]
    assert run.n_steps == 6  # the steps every rank wrote: rank 1 stopped at step 6
    assert verify(run.dir).column("ok").to_pylist() == [True] * 7


def stopping_worker(rank: int, world: int, init: str, path: str, saved: str,
                    crash: bool) -> None:
    """Record with a training checkpoint after step 4, then stop: planned, after step 7; or
    rank 0 is killed (SIGKILL) after step 9, once steps 0…7 are committed, while rank 1 goes
    on to write steps 8 and 9, which no commit lists."""
    with process_group(rank, world, init):
        model, opt = ddp_adamw()
        with attrib.Recorder(path, model, opt, capture=CAPTURE, **SETTINGS) as rec:
            train(rec, model, opt, rank, world, steps=range(5))
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()},
                       f"{saved}-{rank}.pt")
            train(rec, model, opt, rank, world, steps=range(5, 10 if crash else 8))
            marker = Path(path) / "ranks" / "rank-1.json"
            while crash and rank == 0:  # rank 1 has closed: its steps 8 and 9 are on disk
                if attrib.open_run(path).n_steps >= 8 and marker.exists() and \
                        fmt.read_json(marker)["closed"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.01)


def restarting_worker(rank: int, world: int, init: str, path: str, saved: str) -> None:
    """The restarted job, from the checkpoint after step 4: a new run into the same directory,
    and resume=True, are refused on every rank; resume=5 discards the later steps and goes
    on to the end."""
    with process_group(rank, world, init):
        model, opt = ddp_adamw()
        state = torch.load(f"{saved}-{rank}.pt", weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        for resume, refusal in ((False, FileExistsError), (True, ResumeError)):
            # rank 0 names the problem (here: the run exists; resume=5, not the last step),
            # the other ranks stop too instead of waiting for rank 0 in a barrier
            refused = (refusal, "overwrite=True" if resume is False else "Pass resume=5") \
                if rank == 0 else (DistributedError, "rank 0 could not open the run")
            with pytest.raises(refused[0], match=refused[1]):
                attrib.Recorder(path, model, opt, capture=CAPTURE, resume=resume, **SETTINGS)
        with attrib.Recorder(path, model, opt, capture=CAPTURE, resume=5, **SETTINGS) as rec:
            # the discarded steps' progress is gone: no rank can write before rank 0 trains
            assert not list((Path(path) / "ranks").glob("rank-*.json"))
            train(rec, model, opt, rank, world, steps=range(5, STEPS))


@pytest.mark.parametrize("crash", [False, True], ids=["planned stop", "rank 0 killed"])
def test_resumed_ddp_run_equals_the_uninterrupted_one(runs, tmp_path, crash):
    """Every rank cuts back to step 5 (mid-chunk): the rows, parts and markers of the
    discarded steps go (committed ones, and after the kill, rank 1's that no commit lists),
    and the run goes on as if it had never stopped."""
    ddp, _ = runs
    args = (WORLD, str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path / "state"))
    if crash:
        with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
            spawn(stopping_worker, args=(*args, True), nprocs=WORLD)
        crashed = attrib.open_run(tmp_path / "run")
        assert crashed.status == "crashed" and crashed.n_steps == 8
        listed = {p for parts in crashed.manifest["tables"].values() for p in parts}
        debris = [p for p in (tmp_path / "run" / fmt.TABLES_DIR).glob("*/part-*.parquet")
                  if p.relative_to(crashed.dir).as_posix() not in listed]
        assert any(fmt.part_fields(p.name)[1] == 8 for p in debris)  # rank 1's steps 8, 9
        (tmp_path / "init").unlink(missing_ok=True)  # the file rendezvous of the killed job
    else:
        spawn(stopping_worker, args=(*args, False), nprocs=WORLD)
    spawn(restarting_worker, args=(WORLD, str(tmp_path / "init2"), *args[2:]), nprocs=WORLD)
    run = attrib.open_run(tmp_path / "run")
    assert [r["step"] for r in run.manifest["resumes"]] == [5]
    resumed = run.manifest["resumes"][0]
    assert resumed["discarded_steps"] == 3  # steps 5…7: 8 and 9 were never committed
    assert resumed["previous_status"] == ("crashed" if crash else "complete")
    assert_same_run(run, ddp)
    key = [("step", "ascending"), ("example_id", "ascending"), ("param", "ascending"),
           ("flat_index", "ascending")]
    assert run.shifts.sort_by(key).equals(ddp.shifts.sort_by(key))


def test_each_rank_numbers_its_parts_past_its_last_one(runs, tmp_path):
    """Part names never collide: a resumed rank 0 numbers below rank 1's range even when rank
    1's parts exist, and a rejoining rank 1 goes past every part it wrote before."""
    ddp, _ = runs
    shutil.copytree(ddp.dir, tmp_path / "run")
    parts = tmp_path / "run" / fmt.TABLES_DIR / "examples"
    template = next(parts.glob("part-*.parquet"))
    shutil.copy(template, parts.parent.parent / fmt.table_part_name(
        "examples", 0, 3, RANK_SEQUENCES + 41))  # a part rank 1 wrote, left by a crash
    rows = pq.read_table(template)

    def next_part(store) -> int:
        store.write_table_part("examples", rows, 20, 20)
        return fmt.part_fields(store.manifest["tables"]["examples"][-1])[0]

    run = attrib.open_run(tmp_path / "run")
    reopened = RunStore.reopen(run.dir, run.meta, run.manifest, [])
    assert next_part(reopened) < RANK_SEQUENCES
    assert next_part(RunStore.join(run.dir, 1)) == RANK_SEQUENCES + 42


def dropping_worker(rank: int, world: int, init: str, path: str) -> None:
    """Rank 1 writes to a slow disk with backpressure="drop_examples"; rank 0 keeps every row
    (the default policy), so each flagged step comes from rank 1's marker."""
    if rank == 1:
        append = RunStore.append_steps

        def slow(self, first_step, values):  # a block with rows takes 0.2 s, a lean one 0
            time.sleep(0.2 if values else 0)
            return append(self, first_step, values)

        RunStore.append_steps = slow
    with process_group(rank, world, init):
        model, opt = ddp_adamw()
        with attrib.Recorder(path, model, opt, capture=attrib.Full(), steps_per_chunk=1,
                             buffers=2, backpressure="drop_examples" if rank else "block") as rec:
            train(rec, model, opt, rank, world)


def test_a_rank_that_drops_examples_flags_the_steps_for_all(tmp_path):
    """A step is flagged in steps.examples_dropped when any rank dropped its rows; those
    steps' contributions are refused, the others sum to the gradient, completeness holds."""
    spawn(dropping_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path / "run")),
             nprocs=WORLD)
    run = attrib.open_run(tmp_path / "run")
    assert run.status == "complete" and run.n_steps == STEPS
    rows = {name: run.contribution_rows(name) for name in run.param_names}
    rank_1_empty = {s for s in range(STEPS)
                    if all(not r[s, LOCAL_BATCH:].any() for r in rows.values())}
    assert all(r[:, :LOCAL_BATCH].abs().sum((1, *range(2, r.dim()))).all()
               for r in rows.values())  # rank 0 blocked: it kept every row
    assert 0 < len(rank_1_empty) < STEPS and run.dropped_steps() == rank_1_empty
    alpha = run.clip_factors()
    for step in range(STEPS):
        if step in rank_1_empty:
            with pytest.raises(KeyError, match="drop_examples"):
                run.contributions(step)
            continue
        for name, value in run.contributions(step)[1].items():
            torch.testing.assert_close(value.sum(0) * alpha[step],
                                       run.grads(name, step, step + 1)[0], rtol=1e-4, atol=1e-7)
    assert verify(run.dir).column("ok").to_pylist() == [True] * 7
    assert_complete(attrib.analyze.path_kernel(run, mlp, probe_points(), progress=False))


def dropout_mlp() -> torch.nn.Module:
    net = mlp()
    return torch.nn.Sequential(net[0], net[1], torch.nn.Dropout(0.3), net[2])


def test_replay_of_a_ddp_run_with_dropout(tmp_path):
    """Each rank draws its own dropout masks from its own generator, and each rank's states
    are recorded: replay rebuilds every rank's forwards, so the rebuilt loss reproduces the
    recorded gradients and a replay that skips nothing retraces the run."""
    spawn(worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path / "run"), False, None,
                           dropout_mlp), nprocs=WORLD)
    run = attrib.open_run(tmp_path / "run")
    assert set(run.table("rng").column("rank").to_pylist()) == set(range(WORLD))
    x, y = data()
    report = attrib.analyze.stage_report(run, dropout_mlp, (x, y), (x[:4], y[:4]),
                                         stages={"a": range(4, 6)}, method="replay",
                                         progress=False)
    assert report.notes["gradient_check"] < 1e-5
    assert report.notes["replay_drift"] < 1e-5
