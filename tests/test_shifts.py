"""TopK outlier shifts against an independent computation: torch.func per-sample gradients
times the optimizer's immediate coefficient (written out here per optimizer) times α."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_per_example import CASES, reference

import attrib
from attrib.recorder.per_example import Dense, Outer
from attrib.recorder.shifts import ShiftInput, tensor_candidates

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "nesterov_dampening": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=False,
                                                    dampening=0.3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def coefficient(run, name, step, kind):
    h = {k: float(v[step, 0]) for k, v in run.hparams().items()}
    if kind == "sgd":
        return -h["lr"]
    if kind == "nesterov_dampening":
        return -h["lr"] * (1.0 if step == 0 else 1 - h["dampening"])
    if kind == "nesterov":
        return -h["lr"] * (1 + h["momentum"])  # dampening 0: the buffer takes d_s whole
    index = run.param_names.index(name)
    t = int(run.step_counts()[step, index])
    v = run.state(name, "exp_avg_sq", step, step + 1)[0].double()
    denominator = (v / (1 - h["beta2"] ** t)).sqrt() + h["eps"]
    return -h["lr"] * (1 - h["beta1"]) / (1 - h["beta1"] ** t) / denominator


def run_with_topk(run_dir, kind, policy, steps=3):
    make, data = CASES["mlp"]
    model = make().double()
    x, y = data()
    x = x.double()
    opt = OPTIMIZERS[kind](model.parameters())
    g = torch.Generator().manual_seed(9)
    policies = policy if isinstance(policy, list) else [policy]
    with attrib.Recorder(run_dir, model, opt, capture=policies, strict=True) as rec:
        for step in range(steps):
            rec.epoch(step // 2)
            ids = torch.randperm(len(x), generator=g)[:8]
            rec.examples(ids)
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            opt.step()
            opt.zero_grad()
    return attrib.open_run(run_dir), make, x, y


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_topk_shifts_match_independent_computation(run_dir, kind):
    k = 12
    run, make, x, y = run_with_topk(run_dir, kind, attrib.TopK(k))
    shifts = run.shifts.to_pylist()
    alpha = run.clip_factors()
    assert (alpha < 1).any(), "the test must exercise clipping"
    for step in range(run.n_steps):
        ids, grads = reference(run, make, x, y, step, "mean", 1)
        candidates = []
        for name, c in grads.items():
            if name.endswith("bias"):  # excluded by default
                continue
            u = (c * coefficient(run, name, step, kind) * alpha[step]).reshape(len(ids), -1)
            for row, flat in zip(*torch.nonzero(torch.ones_like(u), as_tuple=True)):
                candidates.append((abs(float(u[row, flat])), int(ids[row]), name, int(flat),
                                   float(u[row, flat]), float(c.reshape(len(ids), -1)[row, flat])))
        expected = sorted(candidates, reverse=True)[:k]
        got = sorted((r for r in shifts if r["step"] == step), key=lambda r: -abs(r["shift"]))
        assert [(r["example_id"], r["param"], r["flat_index"]) for r in got] == [
            (e[1], e[2], e[3]) for e in expected]
        for r, e in zip(got, expected):
            assert r["shift"] == pytest.approx(e[4], rel=1e-5)
            assert r["grad"] == pytest.approx(e[5], rel=1e-5)
            width = 10 if r["param"] == "0.weight" else 16
            assert (r["row"], r["col"]) == divmod(r["flat_index"], width)
            assert r["epoch"] == step // 2


def test_topk_per_tensor_scope_and_sql(run_dir):
    run, *_ = run_with_topk(run_dir, "sgd", attrib.TopK(5, scope="tensor", exclude=()))
    counts = attrib.sql(run, "SELECT step, param, count(*) AS n FROM shifts GROUP BY ALL "
                             "ORDER BY ALL").to_pylist()
    assert {(c["param"], c["n"]) for c in counts} == {
        ("0.weight", 5), ("0.bias", 5), ("2.weight", 5), ("2.bias", 5)}
    assert len(counts) == 4 * run.n_steps
    biases = attrib.sql(run, "SELECT count(*) FROM shifts WHERE col IS NULL").column(0)[0]
    assert biases.as_py() == 10 * run.n_steps


def test_policies_compose_topk_with_projection(run_dir):
    run = run_with_topk(run_dir, "sgd", [attrib.TopK(6), attrib.Project(32)])[0]
    assert run.capture["0.weight"] == {"project": {"k": 32, "seed": 0, "kind": "kron",
                                                   "split": [4, 8]},
                                       "topk": {"k": 6, "scope": "step"}}
    assert run.shifts.num_rows == 6 * run.n_steps
    ids, rows = run.contributions(1)
    assert rows["0.weight"].shape == (8, 32) and rows["0.bias"].shape == (8, 16)  # 16 ≤ 32: full
    shifted = {r["example_id"] for r in run.shifts.to_pylist() if r["step"] == 1}
    assert shifted and shifted <= set(ids.tolist())


def _outer_parts(seed: int):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(10, 3, 5, generator=g, dtype=torch.float64)
    right = torch.randn(10, 3, 7, generator=g, dtype=torch.float64)
    return Outer(left[:6], right[:6], (5, 7)), Outer(left[6:], right[6:], (5, 7))


def test_chunked_candidates_equal_whole_tensor_ranking():
    first, second = _outer_parts(0)
    coefficient = torch.rand(5, 7, dtype=torch.float64) + 0.1  # Adam-like, elementwise
    item = ShiftInput("w", (5, 7), [(0, first), (6, second)], coefficient, k=9)
    whole = tensor_candidates(item, 0.5, chunk_scalars=10**9)
    chunked = tensor_candidates(item, 0.5, chunk_scalars=35)  # one example per chunk
    dense = torch.cat([first.dense(), second.dense()]).reshape(10, -1)
    expected = (dense * coefficient.reshape(-1) * 0.5).abs().reshape(-1).topk(9)
    signed = (dense * coefficient.reshape(-1) * 0.5).reshape(-1)[expected.indices]
    for got in (whole, chunked):  # 10 rows ≥ k: the threshold path; 1 row: per-row top k
        assert torch.equal(got.row * 35 + got.flat, expected.indices)
        torch.testing.assert_close(got.magnitude, expected.values)
        torch.testing.assert_close(got.shift, signed)


def test_candidates_where_few_rows_are_nonzero_or_a_value_is_nan():
    """τ = 0 (fewer than k rows with a nonzero entry) and NaN take the per-row path: the same
    entries a flat top k over the chunk picks."""
    values = torch.zeros(40, 6)
    values[3, 2], values[7, 5] = 2.0, -3.0
    got = tensor_candidates(ShiftInput("w", (6,), [(0, Dense(values))], 0.5, k=4), 1.0)
    assert got.magnitude.tolist()[:2] == [1.5, 1.0] and got.shift.tolist()[:2] == [-1.5, 1.0]
    assert (got.row[:2].tolist(), got.flat[:2].tolist()) == ([7, 3], [5, 2])
    values = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    values[5, 1] = float("nan")
    got = tensor_candidates(ShiftInput("w", (6,), [(0, Dense(values))], 1.0, k=4), 1.0)
    assert (int(got.row[0]), int(got.flat[0])) == (5, 1) and got.magnitude[0].isnan()
    expected = values.abs().nan_to_num(float("inf")).reshape(-1).topk(4).indices
    assert torch.equal(got.row * 6 + got.flat, expected)


def test_parts_over_the_same_rows_are_summed_before_ranking():
    """A module called twice per forward (shared weights) contributes twice to each example."""
    first, second = _outer_parts(1)
    twice = ShiftInput("w", (5, 7), [(0, first), (0, second)], -0.1, k=5)
    summed = Dense(first.dense()[:4] + second.dense())
    combined = torch.cat([summed.values, first.dense()[4:]])
    expected = tensor_candidates(ShiftInput("w", (5, 7), [(0, Dense(combined))], -0.1, k=5), 1.0)
    got = tensor_candidates(twice, 1.0)
    assert torch.equal(got.row, expected.row) and torch.equal(got.flat, expected.flat)
