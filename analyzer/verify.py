"""`attrib verify`: check a run's integrity end to end, and say what was checked.

Every check reads only what the manifest commits, so a run killed mid-write verifies as long as
its committed steps are whole. A check fails with the reason; it never raises for a damaged
run (that is what it is looking for).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attrib.analyzer.run import SNAPSHOT_TRIES, Run, open_run
from attrib.schemas import format as fmt
from attrib.schemas.fingerprint import Fingerprint

CHECKS = pa.schema([pa.field("check", pa.string()), pa.field("ok", pa.bool_()),
                    pa.field("detail", pa.string())])


def verify(path) -> pa.Table:
    """(check, ok, detail) rows; the run is sound when every `ok` is true. A run being
    recorded is checked as of one commit: if a later commit removes a file the checks read
    (compacted or rewritten table parts), the checks start over on the new commit."""
    for _ in range(SNAPSHOT_TRIES - 1):
        try:
            return _verify_once(path)
        except fmt.RunChanged:
            continue
    return _verify_once(path, retry=False)


def _verify_once(path, retry: bool = True) -> pa.Table:
    rows: list[dict] = []

    def check(name: str, test: Callable[[], str]) -> None:
        try:
            rows.append({"check": name, "ok": True, "detail": test()})
        except Exception as e:  # a damaged run fails the check with its reason
            if retry and run.moved_on(e):
                raise fmt.RunChanged(str(e)) from e
            rows.append({"check": name, "ok": False, "detail": fmt.reason(e)})

    try:
        run = open_run(path)
    except fmt.RunChanged:
        if retry:
            raise
        return pa.Table.from_pylist([{"check": "metadata", "ok": False,
                                      "detail": "the run kept changing while it was read"}],
                                    schema=CHECKS)
    except fmt.FormatError as e:
        return pa.Table.from_pylist([{"check": "metadata", "ok": False, "detail": str(e)}],
                                    schema=CHECKS)
    check("metadata", lambda: f"attrib run v{run.meta['format_version']}, status "
                              f"{run.status}, {run.n_steps} committed steps")
    check("table files", lambda: _tables(run))
    check("steps table", lambda: _steps(run))
    check("examples table", lambda: _examples(run))
    check("step arrays", lambda: _arrays(run))
    if run.format_version >= 2:
        check("replay", lambda: _replay(run))
    else:
        check("checkpoints", lambda: _checkpoints(run))
    check("chunks", lambda: _chunks(run))
    return pa.Table.from_pylist(rows, schema=CHECKS)


def _tables(run: Run) -> str:
    count = 0
    for name, schema in fmt.TABLES.items():
        for file in run.table_files(name):  # validated to lie inside the run
            table = pq.read_table(file)
            missing = set(schema.names) - set(table.column_names)
            if missing:
                raise ValueError(f"{file.name} ({name}) lacks columns {sorted(missing)}")
            count += 1
    return f"{count} Parquet files readable, inside the run, with their declared columns"


def _steps(run: Run) -> str:
    steps = np.sort(run.steps.column("step").to_numpy())
    if not np.array_equal(steps, np.arange(run.n_steps)):
        raise ValueError(f"steps table has {len(steps)} rows for {run.n_steps} committed steps "
                         "(missing or duplicated steps)")
    return f"one row for each of the {run.n_steps} steps"


def _examples(run: Run) -> str:
    examples = run.examples
    if examples.num_rows == 0:
        return "no examples declared"
    counts = np.bincount(examples.column("step").to_numpy(), minlength=run.n_steps)
    declared = run.steps.sort_by("step").column("n_examples").to_numpy(zero_copy_only=False)
    declared = np.array([0 if d is None or d != d else d for d in declared], dtype=np.int64)
    bad = np.nonzero(counts[: run.n_steps] != declared)[0]
    if len(bad):
        raise ValueError(f"step {int(bad[0])}: {int(counts[bad[0]])} example rows, the steps "
                         f"table says {int(declared[bad[0]])}")
    return f"{examples.num_rows} example rows match each step's n_examples"


def _arrays(run: Run) -> str:
    arrays = _step_arrays(run)
    short = [(path, a.shape[0]) for path, a in arrays if a.shape[0] < run.n_steps]
    if short:
        raise ValueError(f"{short[0][0]} holds {short[0][1]} steps, fewer than the "
                         f"{run.n_steps} committed")
    return f"{len(arrays)} step arrays cover every committed step"


def _step_arrays(run: Run):
    kinds = tuple(f"{kind}/" for kind in (fmt.DELTAS, fmt.GRADS, fmt.CONTRIB, fmt.PROJ,
                                          fmt.FACTOR_LEFT, fmt.FACTOR_RIGHT))
    kinds += (fmt.FINGERPRINT,)
    return [(path, array) for path, array in run.arrays() if path.startswith(kinds)]


def _checkpoints(run: Run) -> str:
    """Every stored checkpoint equals θ rebuilt from the previous one and the deltas."""
    steps = run.checkpoint_steps
    for index in range(1, len(steps)):
        previous, step = steps[index - 1], steps[index]
        rebuilt = run.checkpoint(index - 1)
        for name in rebuilt:
            rebuilt[name] = rebuilt[name] + run.deltas(name, previous, step).sum(0)
        stored = run.checkpoint(index)
        for name, value in stored.items():
            if not torch.allclose(rebuilt[name].double(), value.double(),
                                  rtol=fmt.THETA_RTOL, atol=fmt.THETA_ATOL):
                raise ValueError(f"checkpoint {index} (step {step}) of {name!r} differs from "
                                 f"checkpoint {index - 1} plus the deltas in between")
    return f"{len(steps)} checkpoints agree with the deltas between them"


def _replay(run: Run) -> str:
    """v2: the optimizer replayed through the recorded gradients reaches every stored
    checkpoint, and θ_s matches the fingerprints training took before and after each step."""
    if not run.trajectory_params or run.n_steps == 0:
        return "no gradients recorded: nothing to replay"
    prints = run.fingerprints()
    replay = run.replay
    fingerprint = Fingerprint(replay.params)
    # tensors without recorded gradients stand still in the replay between checkpoints
    kept = torch.tensor(replay.recorded)
    missed: list[str] = []  # "param before/after step s", in step order

    def compare(step: int, side: int) -> None:
        theta = [p.detach() for p in replay.params]
        expected = torch.from_numpy(prints[step, side])
        off = (fingerprint(theta) - expected).abs() > fingerprint.tolerance(theta)
        off &= ~torch.isnan(expected) & kept
        if off.any():
            missed.append(f"θ of {run.param_names[int(off.nonzero()[0])]!r} "
                          f"{'before' if side == 0 else 'after'} step {step}")

    replay.seek(0)
    for step in range(run.n_steps):  # replays every step, which also finds every gap
        compare(step, 0)
        replay.advance()
    compare(run.n_steps - 1, 1)
    problems = []
    worst, where = _largest_gap(run)
    exact = run.exact_gradients  # else the replay drifts by design: measured, not a failure
    if worst > fmt.THETA_RTOL and exact:
        problems.append(f"the replay misses the stored checkpoint (θ or optimizer state) "
                        f"after step {where} by {worst:.2g}")
    edits = np.nonzero(np.abs(prints[1:, 0] - prints[:-1, 1]).max(axis=1, initial=0)
                       > 1e-5 * np.abs(prints[:-1, 1]).max(axis=1, initial=0) + 1e-30)[0]
    if len(edits):
        problems.append(f"parameters were changed outside the optimizer between steps "
                        f"{int(edits[0])} and {int(edits[0]) + 1}"
                        + (f" (and {len(edits) - 1} more times)" if len(edits) > 1 else "")
                        + ": the replay can't follow them")
    if missed and exact:
        problems.append(f"{missed[0]} is not what training had"
                        + (f" ({len(missed) - 1} more steps differ)" if len(missed) > 1 else ""))
    if problems:
        raise ValueError("; ".join(problems))
    if not exact:
        return (f"gradients stored as {run.meta['grad_dtype']}: the optimizer replayed through "
                f"{run.n_steps} steps drifts from training by up to {worst:.2g} (relative, θ or "
                "optimizer state) at the checkpoints, kept as each step's replay gap; no edits "
                "outside the optimizer")
    gap = (f"; it misses stored checkpoints by up to {worst:.2g} (relative, θ or optimizer "
           "state; kept as each step's replay gap)" if worst
           else ", bit for bit at every checkpoint")
    scope = ("" if all(replay.recorded) else
             f" (the {len(run.trajectory_params)} of {len(run.param_names)} tensors whose "
             "gradients were recorded)")
    return (f"the optimizer replayed through {run.n_steps} steps matches the fingerprints "
            f"of θ{scope}{gap}")


def _largest_gap(run: Run) -> tuple[float, int | None]:
    """The largest relative difference between the replayed and the stored θ or optimizer
    state at a checkpoint, and the step before it (the replay has run through the run)."""
    if not run.replay.mismatch:
        return 0.0, None
    step = max(run.replay.mismatch, key=run.replay.mismatch.get)
    return run.replay.mismatch[step], step


def _chunks(run: Run) -> str:
    """Read every committed value once, slab by slab: each chunk must decode (a CRC32C ends
    each one), and non-finite deltas or gradients are flagged with their steps."""
    unreadable, flagged, count = [], [], 0
    for path, array in run.arrays():  # codecs checked before anything is decoded
        count += 1
        rows = run.committed_rows(path)
        if rows is None:
            slabs = [slice(None)]
        else:
            depth = array.chunks[0] if array.ndim else 1
            slabs = [slice(first, min(rows, first + depth)) for first in range(0, rows, depth)]
        missing = run.missing_chunks(path, array)
        if missing:
            unreadable.append(f"{path}: chunk {missing[0]!r} is missing (of {len(missing)} "
                              "or more)")
            continue
        for where in slabs:
            try:
                values = np.asarray(array[where])
            except Exception as e:
                unreadable.append(f"{path} rows {where.start}–{where.stop} ({fmt.reason(e)})")
                continue
            if path.startswith((f"{fmt.DELTAS}/", f"{fmt.GRADS}/")) and values.size:
                bad = ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
                flagged += [f"{path} at step {where.start + int(i)}" for i in np.nonzero(bad)[0]]
    if unreadable:
        raise ValueError(f"{len(unreadable)} slabs don't decode, e.g. {unreadable[0]}")
    text = f"{count} arrays: every committed chunk decodes"
    if flagged:
        return f"{text}; non-finite values (recorded as they were): " + "; ".join(flagged[:5])
    return f"{text}; deltas and gradients are finite"
