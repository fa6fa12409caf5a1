"""Projected influence straight from the stored per-example rows, streamed chunk by chunk.

    score(t, i) = Σ_s w_s Σ_p ⟨R_p q_{t,p}, R_p c_{s,i,p}⟩

q_t: the test gradients you pass (held fixed, e.g. at the final θ), R_p the run's projection of
parameter p (identity for Full capture), c_{s,i}: the stored rows, w_s the step weights
(default η_s α_s: TracIn over every recorded step with a fixed test gradient). It is a chunked
matrix product over the Zarr arrays: `engine="torch"` streams one chunk of steps at a time in
this process; `engine="dask"` runs the same block function on a Dask cluster
(attrib.analyzer.dask_kernels). Memory holds one chunk, the test vectors and the (test,
examples) sums, never the store.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attrib.analyzer import targets
from attrib.analyzer.run import Run
from attrib.schemas import format as fmt
from attrib.schemas.factored import FactorRows

SCORES = pa.schema([pa.field("test_id", pa.int32()), pa.field("example_id", pa.int64()),
                    pa.field("value", pa.float64())])
ENGINES = ("torch", "dask")
FLOAT64_SLICE = 1 << 22  # stored values made float64 at once (32 MiB)


def projected_influence(run: Run, test_gradients: dict[str, torch.Tensor], *, start: int = 0,
                        stop: int | None = None, weights: np.ndarray | None = None,
                        engine: str = "torch", client=None) -> pa.Table:
    """(test_id, example_id, value): the sum above over steps [start, stop) and the parameters
    in `test_gradients` (name → (n_test, *shape) full gradients), aggregated by example id."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {ENGINES}")
    start, stop = run._step_range(start, stop)
    if run.dropped_steps() & set(range(start, stop)):
        raise ValueError("some steps in the range had their per-example rows dropped under "
                         "backpressure; their scores would be zero. Choose steps without "
                         "steps.examples_dropped")
    w = step_weights(run, start, stop) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (stop - start,):
        raise ValueError(f"weights= needs one value per step of [{start}, {stop}), "
                         f"got shape {w.shape}")
    grid, universe = id_grid(run, start, stop)
    tests = {name: projected_tests(run, name, g) for name, g in test_gradients.items()}
    n_test = {v.shape[0] for v in tests.values()}
    if len(n_test) != 1:
        raise ValueError("every parameter's test gradients need the same number of test points")
    if engine == "dask":
        from attrib.analyzer.dask_kernels import dask_scores

        total = dask_scores(run, tests, grid, universe, w, start, stop, client)
    else:
        total = sum(_stream(run, name, q, grid, universe, w, start, stop)
                    for name, q in tests.items())
    return score_rows(total, universe)


def test_gradients(run: Run, model_fn: Callable[[], torch.nn.Module], test_set,
                   target: targets.Target = "loss", step: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """∇_θ f(x_t; θ_step) in float64 (default θ_N) for every parameter with stored rows: the
    q_t that `projected_influence` takes."""
    model = run.build_model(model_fn, torch.float64).eval()
    theta = {n: t.double() for n, t in
             run.reconstruct(run.n_steps if step is None else step).items()}
    inputs, labels = targets.as_tensors(test_set, torch.float64)
    stored = run.captured
    if not stored:
        raise KeyError(f"{run.dir} stores no per-example rows: record with capture=Full(), "
                       "Factored() or Project(k)")
    grads = targets.gradients(model, theta, inputs, labels, target)
    return {name: grads[name].detach() for name in stored}


def step_weights(run: Run, start: int, stop: int) -> np.ndarray:
    """η_s α_s per step (the first param group's learning rate times the clip factor)."""
    return run.hparams(start, stop)["lr"][:, 0] * run.clip_factors(start, stop)


def projected_tests(run: Run, name: str, gradients: torch.Tensor) -> np.ndarray:
    """(n_test, d) test vectors in the stored rows' space: R q for Project, q for exact rows."""
    capture = run.capture.get(name, {})
    shape = run.param_shapes[name]
    if tuple(gradients.shape[1:]) != shape:
        raise ValueError(f"test gradients of {name!r} need shape (n_test, {shape}), got "
                         f"{tuple(gradients.shape)}")
    if name not in run.captured:
        raise KeyError(f"{name!r} has no stored per-example rows; its capture is {capture}")
    return run.in_row_space(name, gradients.double()).numpy()


def id_grid(run: Run, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, examples_per_step) example id of each stored row (−1: no example), and the
    sorted unique ids. Reads three columns of the examples table, not the arrays."""
    files = run.table_files("examples")
    rows = run.meta["examples_per_step"] or 0
    grid = np.full((stop - start, rows), -1, np.int64)
    for file in files:
        table = pq.read_table(file, columns=["step", "row", "example_id"],
                              filters=[("step", ">=", start), ("step", "<", stop)])
        grid[table["step"].to_numpy() - start, table["row"].to_numpy()] = \
            table["example_id"].to_numpy()
    return grid, np.unique(grid[grid >= 0])


def block_scores(rows: np.ndarray | FactorRows, ids: np.ndarray, q: np.ndarray, w: np.ndarray,
                 universe: np.ndarray) -> np.ndarray:
    """(n_test, len(universe)) scores of one block of steps: rows (S, E, …) dense or factored,
    ids (S, E).

    Rows become float64 a few steps at a time (≤ FLOAT64_SLICE values), so the copy stays
    small beside the float32 block."""
    steps, examples = ids.shape
    factored = isinstance(rows, FactorRows)
    width = (rows.left.shape[-2] * (rows.left.shape[-1] + rows.right.shape[-1]) if factored
             else int(np.prod(rows.shape[2:])))
    out = torch.zeros(len(universe), q.shape[0], dtype=torch.float64)
    test = torch.from_numpy(q)
    per = max(1, FLOAT64_SLICE // max(1, examples * width))
    for a in range(0, steps, per):
        part = rows[a: a + per]
        if factored:  # Σ_t l_tᵀ Q r_t: exact rows that are never formed
            scores = part.to(torch.float64).dot(test)
        else:
            scores = torch.from_numpy(np.asarray(part, dtype=np.float64)).reshape(
                -1, q.shape[1]) @ test.T
        scores *= torch.from_numpy(np.repeat(w[a: a + per], examples))[:, None]
        step_ids = ids[a: a + per].reshape(-1)
        keep = step_ids >= 0
        out.index_add_(0, torch.from_numpy(np.searchsorted(universe, step_ids[keep])),
                       scores[torch.from_numpy(keep)])
    return out.T.numpy()


def _stream(run: Run, name: str, q: np.ndarray, grid: np.ndarray, universe: np.ndarray,
            w: np.ndarray, start: int, stop: int) -> np.ndarray:
    depth = int(run.meta["steps_per_chunk"])
    total = np.zeros((q.shape[0], len(universe)))
    first = start - start % depth  # whole chunks: each is read and decoded once
    for a in range(first, stop, depth):
        lo, hi = max(a, start), min(a + depth, stop)
        rows = run.example_rows(name, lo, hi)
        rows = rows if isinstance(rows, FactorRows) else rows.numpy()
        total += block_scores(rows, grid[lo - start: hi - start], q, w[lo - start: hi - start],
                              universe)
    return total


def score_rows(total: np.ndarray, universe: np.ndarray) -> pa.Table:
    n_test = total.shape[0]
    return pa.table({"test_id": np.repeat(np.arange(n_test, dtype=np.int32), len(universe)),
                     "example_id": np.tile(universe, n_test),
                     "value": total.reshape(-1).copy()}, schema=SCORES)


def array_path(run: Run, name: str) -> str:
    """The Zarr path of a parameter's stored per-example rows (one array: Full or Project)."""
    capture = run.capture.get(name, {})
    if run.factored_rows(name):
        raise ValueError(f"{name!r} was recorded with Factored capture, whose rows are two "
                         "factor arrays, not one: use the default engine, which reads them")
    group = fmt.CONTRIB if "full" in capture else fmt.PROJ
    return f"{group}/{run._keys[name]}"
