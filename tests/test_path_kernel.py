"""Path-kernel influences (METHODS.md §2): completeness, the TracIn identity, a brute-force
float64 recomputation of Ψ without the recursion, aggregation and projected mode."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F
from conftest import OPTIMIZERS, TinyTransformer, mlp, tiny_gpt2, train
from torch.func import functional_call, grad, vmap

import attrib
from attrib.analyzer.path_kernel import MAX_NODES
from attrib.analyzer.path_kernel.kernel import ROUNDING_WARN

ACCEPTANCE = ["sgd", "sgd_nesterov", "adam_l2", "adamw"]


def probe_points(n=6, seed=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def assert_complete(result):
    """|Σ terms − (f(θ_N) − f(θ_0))| ≤ 1e-4·|f(θ_N) − f(θ_0)| + 1e-6 for every test point, and
    the rounding term (Σ ḡ·Δθ minus the others) within what rounding in the training dtype
    can produce (the analysis's warning threshold): a wrong term would land there, at the size
    of the terms."""
    for row in result.completeness().to_pylist():
        assert abs(row["gap"]) <= 1e-4 * abs(row["delta_f"]) + 1e-6, row
    assert (np.abs(result.rounding) <= ROUNDING_WARN * result.rounding_scale).all(), \
        (result.rounding, result.rounding_scale)


@pytest.mark.parametrize("name", ACCEPTANCE)
def test_completeness_mlp_200_steps(run_dir, name):
    model = mlp()
    train(run_dir, model, OPTIMIZERS[name](model.parameters()), steps=200, clip=0.5)
    result = attrib.analyze.path_kernel(attrib.open_run(run_dir), mlp, probe_points(),
                                        progress=False)
    assert_complete(result)
    data = result.table.filter(pc.equal(result.table["term"], "data"))
    assert data.num_rows > 0 and pc.max(pc.abs(data["value"])).as_py() > 1e-4


def transformer_run(run_dir, name, activation, record=True, steps=200, **analysis):
    def make():
        return TinyTransformer(activation=activation)

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 12, (256, 6), generator=g)
    if record:
        model = make()
        train(run_dir, model, OPTIMIZERS[name](model.parameters()), steps=steps, inputs=tokens,
              labels=tokens[:, 0] % 3, clip=0.5, batch=16)
    test_tokens = torch.randint(0, 12, (4, 6), generator=g)
    return attrib.analyze.path_kernel(attrib.open_run(run_dir), make,
                                      (test_tokens, test_tokens[:, 0] % 3), target="margin",
                                      progress=False, **analysis)


@pytest.mark.parametrize("name", ACCEPTANCE)
def test_completeness_transformer_200_steps(run_dir, name):
    """Embedding, attention, LayerNorm and a GELU feed-forward: smooth along each segment, so
    two Gauss–Legendre nodes per step integrate to METHODS.md's tolerance."""
    result = transformer_run(run_dir, name, "gelu")
    assert_complete(result)
    for row in result.completeness().to_pylist():
        assert row["quadrature_error"] <= 1e-4 * abs(row["delta_f"]) + 1e-6


def test_relu_transformer_adaptive_rule_closes_the_gap_two_nodes_leave(run_dir):
    """Across ReLU kinks two Gauss–Legendre nodes converge only like the part's width, and
    AdamW's steps here cross many: the gap is above 1e-4 of Δf and within the measured
    quadrature error. The adaptive rule, cutting at each test point's kinks, is complete."""
    fixed = transformer_run(run_dir, "adamw", "relu", steps=100, quadrature=2)
    fixed = fixed.completeness().to_pylist()
    assert max(abs(r["gap"]) / abs(r["delta_f"]) for r in fixed) > 1e-4  # the effect is real
    for row in fixed:
        assert abs(row["gap"]) <= row["quadrature_error"], row
    adaptive = transformer_run(run_dir, "adamw", "relu", record=False, quadrature="adaptive")
    assert_complete(adaptive)


def relu_mlp() -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 3)).double()


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    """The issue's case: a ReLU MLP 20-64-64-3 trained 60 steps with AdamW, where two
    Gauss–Legendre nodes leave a completeness gap above 1e-3 of Δf."""
    path = tmp_path_factory.mktemp("relu") / "run"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 20, generator=g, dtype=torch.float64)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    model = relu_mlp()
    train(path, model, torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1),
          steps=60, inputs=x, labels=y, clip=None)
    test = torch.randn(12, 20, generator=g, dtype=torch.float64)
    return attrib.open_run(path), (test, (test[:, :3].argmax(1)) % 3)


def independent_delta_f(run, make, test) -> np.ndarray:
    """f(θ_N) − f(θ_0) per test point (loss), with torch.func, not the analysis's code."""
    model = make()
    x, y = test
    ends = [F.cross_entropy(functional_call(model, run.reconstruct(s), (x,)), y,
                            reduction="none").detach().numpy()
            for s in (0, run.n_steps)]
    return ends[1] - ends[0]


def quadrature_outcome(relu_run, rule) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """(gap against an independent Δf, reported quadrature_error, Δf, result)."""
    run, test = relu_run
    result = attrib.analyze.path_kernel(run, relu_mlp, test, quadrature=rule, progress=False)
    rows = result.completeness().to_pylist()
    delta_f = independent_delta_f(run, relu_mlp, test)
    np.testing.assert_allclose([r["delta_f"] for r in rows], delta_f, rtol=1e-10, atol=1e-12)
    gaps = np.array([r["sum_terms"] for r in rows]) - delta_f
    return gaps, np.array([r["quadrature_error"] for r in rows]), delta_f, result


@pytest.mark.parametrize("rule", [2, "midpoint:4", "left", "adaptive"])
def test_the_quadrature_error_bounds_the_gap_for_any_rule(relu_run, rule):
    """quadrature_error adds, per segment, |rule − (f(θ_s + Δθ) − f(θ_s))|, measured with two
    forwards: the gap against an independently computed Δf can't exceed it, ReLU kinks or
    not (the sampled q-vs-2q estimate it replaces fell below the gap on such runs)."""
    gaps, errors, delta_f, _ = quadrature_outcome(relu_run, rule)
    assert (np.abs(gaps) <= errors * (1 + 1e-6) + 1e-12).all(), (gaps, errors)
    if rule == 2:  # the effect is real: two nodes leave a gap far above 1e-4 of Δf
        assert (np.abs(gaps) / np.abs(delta_f)).max() > 1e-2


def test_the_adaptive_rule_is_complete_to_its_tolerance_across_relu_kinks(relu_run):
    """Where two nodes miss Δf by more than 1e-2, the adaptive rule cuts each test point's
    segments at its kinks (and bisects what remains): every gap within 1e-4·|Δf| + 1e-6 of
    an independently computed Δf and within the measured bound; smooth steps keep two
    nodes. The model trains in float64, so the rounding term (float32 updates) is ~0 and the
    other terms alone make the sum."""
    gaps, errors, delta_f, result = quadrature_outcome(relu_run, "adaptive")
    assert (np.abs(gaps) <= 1e-4 * np.abs(delta_f) + 1e-6).all(), np.abs(gaps / delta_f).max()
    assert (np.abs(gaps) <= errors * (1 + 1e-6) + 1e-12).all()
    assert len(result.nodes) == relu_run[0].n_steps
    assert result.nodes.min() == 2 and 2 < result.nodes.max() <= MAX_NODES
    assert (np.abs(result.rounding) <= 10 * result.rounding_scale).all(), \
        (result.rounding, result.rounding_scale)  # float64 training: ε = 2.2e-16
    np.testing.assert_allclose(result.completeness()["rounding"].to_numpy(), result.rounding)
    assert result.table.filter(pc.equal(result.table["term"], "rounding")).num_rows > 0


def test_the_adaptive_rule_warns_where_its_budget_leaves_a_test_point_incomplete(relu_run):
    """With room for one bisection per segment the rule can't reach 1e-4 here: it says so,
    naming max_nodes, instead of leaving the user to find it in completeness()."""
    run, test = relu_run
    with pytest.warns(UserWarning, match=r"left \d+ of 12 test points above tol.*max_nodes"):
        attrib.analyze.path_kernel(run, relu_mlp, test, quadrature="adaptive", max_nodes=6,
                                   progress=False)


def test_a_term_that_misses_part_of_the_updates_shows_as_rounding_and_warns(relu_run,
                                                                            monkeypatch):
    """The rounding term closes the sum whatever the other terms are, so its size is the
    check: a 5% error in Adam's preconditioner (injected) makes it far larger than rounding
    in the training dtype can, and the analysis warns; completeness() alone would not show it."""
    run, test = relu_run
    from attrib.analyzer.path_kernel import kernel

    wrong = kernel.adam_update_scale
    monkeypatch.setattr(kernel, "adam_update_scale", lambda *a: 1.05 * wrong(*a))
    with pytest.warns(UserWarning, match="rounding term reaches"):
        result = attrib.analyze.path_kernel(run, relu_mlp, test, progress=False)
    assert (np.abs(result.rounding) > ROUNDING_WARN * result.rounding_scale).any()


def per_example_grads(model, theta, x, y, scale):
    def loss(params, xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None]) * scale
    return vmap(grad(loss), in_dims=(None, 0, 0))(theta, x, y)


def test_left_rule_on_plain_sgd_is_tracin_over_every_step(run_dir):
    """With ḡ_s = ∇f(θ_s) (left rule), α = 1 and Δθ = −η G, the data term of example i is
    −Σ_s η_s ∇f(x; θ_s) · ∇ℓ_i(θ_s) / B: TracIn over every step."""
    model = mlp(torch.float64)
    x, y = torch.randn(96, 10, dtype=torch.float64), torch.randint(0, 3, (96,))
    train(run_dir, model, OPTIMIZERS["sgd"](model.parameters()), steps=15, inputs=x, labels=y,
          clip=None, batch=8)
    run = attrib.open_run(run_dir)
    xt, yt = probe_points()
    result = attrib.analyze.path_kernel(run, lambda: mlp(torch.float64), (xt.double(), yt),
                                        by=("example", "step"), quadrature="left",
                                        progress=False)
    net = mlp(torch.float64)
    for step in (0, 7, 14):
        theta = run.reconstruct(step)
        lr = run.hparams()["lr"][step, 0]
        ids = torch.tensor(run.table_where("examples", step).sort_by("row")
                           .column("example_id").to_pylist())
        train_grads = per_example_grads(net, theta, x[ids], y[ids], 1.0)
        test_grads = per_example_grads(net, theta, xt.double(), yt, 1.0)
        tracin = -lr / len(ids) * sum(
            test_grads[n].flatten(1) @ train_grads[n].flatten(1).T for n in theta)  # (test, i)
        rows = result.table.filter(pc.and_(pc.equal(result.table["term"], "data"),
                                           pc.equal(result.table["step"], step))).to_pylist()
        got = {(r["test_id"], r["example_id"]): r["value"] for r in rows}
        for t in range(len(yt)):
            for col, example in enumerate(ids):
                assert got[(t, int(example))] == pytest.approx(float(tracin[t, col]), rel=1e-9,
                                                               abs=1e-13)


@pytest.mark.parametrize("name", ["sgd_nesterov", "sgd_dampening", "adamw"])
def test_brute_force_float64_psi_without_recursion(run_dir, name):
    """Ψ(x, i) = Σ_s ḡ_s(x) · U_{s,i}, U_{s,i} = Σ_{r≤s} K_{s,r} α_r c_{r,i} with the K's of
    METHODS.md §1 written out, c from torch.func: per-example totals equal the recursion's."""
    model = mlp(torch.float64)
    x, y = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 3, (64,))
    train(run_dir, model, OPTIMIZERS[name](model.parameters()), steps=12, inputs=x, labels=y,
          clip=0.3, batch=8)
    run = attrib.open_run(run_dir)
    xt, yt = probe_points(4)
    xt = xt.double()
    result = attrib.analyze.path_kernel(run, lambda: mlp(torch.float64), (xt, yt),
                                        progress=False)
    net, names = mlp(torch.float64), run.param_names
    hp, alpha, n = run.hparams(), run.clip_factors(), run.n_steps
    rule = attrib.analyze.quadrature_rule(2)
    thetas = [run.reconstruct(s) for s in range(n + 1)]
    gbar = []
    for s in range(n):
        total = {k: 0 for k in names}
        for node, weight in rule:
            point = {k: thetas[s][k] + node * (thetas[s + 1][k] - thetas[s][k]) for k in names}
            g = per_example_grads(net, point, xt, yt, 1.0)
            total = {k: total[k] + weight * g[k] for k in names}
        gbar.append(total)
    contributions, ids = [], []
    for r in range(n):
        step_ids = torch.tensor(run.table_where("examples", r).sort_by("row")
                                .column("example_id").to_pylist())
        ids.append(step_ids)
        contributions.append(per_example_grads(net, thetas[r], x[step_ids], y[step_ids],
                                               1 / len(step_ids)))

    def K(s, r, param):  # coefficient of α_r c_{r,i} in Δθ_s (name: the optimizer)
        h = {k: float(v[s, 0]) for k, v in hp.items()}
        if name.startswith("sgd"):
            mu, w = h["momentum"], (1.0 if r == 0 else 1 - h["dampening"])
            in_buffer = mu ** (s - r) * w
            return -h["lr"] * ((s == r) + mu * in_buffer if name == "sgd_nesterov"
                               else in_buffer)
        t = int(run.step_counts()[s, names.index(param)])
        v = run.state(param, "exp_avg_sq", s, s + 1)[0].double()
        d = (v / (1 - h["beta2"] ** t)).sqrt() + h["eps"]
        return -h["lr"] * (1 - h["beta1"]) / (1 - h["beta1"] ** t) * h["beta1"] ** (s - r) / d

    expected: dict[tuple[int, int], float] = {}
    for s in range(n):
        for r in range(s + 1):
            for param in names:
                u = K(s, r, param) * alpha[r] * contributions[r][param]  # (examples, *shape)
                psi = gbar[s][param].flatten(1) @ u.flatten(1).T  # (test, examples)
                for col, example in enumerate(ids[r]):
                    for t in range(len(yt)):
                        key = (t, int(example))
                        expected[key] = expected.get(key, 0.0) + float(psi[t, col])
    rows = result.table.filter(pc.equal(result.table["term"], "data")).to_pylist()
    got = {(r["test_id"], r["example_id"]): r["value"] for r in rows}
    assert got.keys() == expected.keys()
    scale = max(abs(v) for v in expected.values())
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-8 * scale), key


def test_aggregation_over_any_axes_equals_the_full_tensor(run_dir):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), steps=20)
    run = attrib.open_run(run_dir)
    full = attrib.analyze.path_kernel(run, mlp, probe_points(), by=("example", "step", "param"),
                                      progress=False).table
    for by in [(), ("example",), ("step",), ("param",), ("example", "param")]:
        table = attrib.analyze.path_kernel(run, mlp, probe_points(), by=by, progress=False).table
        keys = ["test_id", "term"] + [{"example": "example_id"}.get(a, a) for a in by]
        expected = full.group_by(keys).aggregate([("value", "sum")]).rename_columns(
            [*keys, "value"]).sort_by([(k, "ascending") for k in keys])
        got = table.sort_by([(k, "ascending") for k in keys])
        assert got.select(keys).equals(expected.select(keys))
        np.testing.assert_allclose(got["value"].to_numpy(), expected["value"].to_numpy(),
                                   rtol=1e-9, atol=1e-14)


def test_projected_mode_keeps_totals_exact(tmp_path):
    exact_dir, projected_dir = tmp_path / "exact", tmp_path / "projected"
    for path, capture in ((exact_dir, attrib.Full()),
                          (projected_dir, attrib.Project(64, kind="kron"))):
        model = mlp()
        train(path, model, OPTIMIZERS["sgd_nesterov"](model.parameters()), steps=30,
              capture=capture)
    exact = attrib.analyze.path_kernel(attrib.open_run(exact_dir), mlp, probe_points(),
                                       progress=False)
    projected = attrib.analyze.path_kernel(attrib.open_run(projected_dir), mlp, probe_points(),
                                           progress=False)
    assert_complete(projected)
    a, b = (r.top("example", test=0, n=1000).sort_by("example") for r in (exact, projected))
    assert a["example"].equals(b["example"])
    correlation = np.corrcoef(a["value"].to_numpy(), b["value"].to_numpy())[0, 1]
    assert correlation > 0.9, correlation


def test_top_examples(run_dir):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["sgd"](model.parameters()), steps=20)
    result = attrib.analyze.path_kernel(attrib.open_run(run_dir), mlp, probe_points(),
                                        progress=False)
    top = result.top("example", test=1, n=5)
    values = top["value"].to_pylist()
    assert len(values) == 5 and values == sorted(values, reverse=True)
    assert result.top("example", test=1, n=5, order="asc")["value"].to_pylist()[0] <= values[-1]
    with pytest.raises(ValueError, match="summed out"):
        result.top("step")
    # target loss: a positive value raised the loss (harmful), "helpful" lists the most negative
    assert all(e == "harmful (raised the loss)" for v, e in zip(values, top["effect"].to_pylist())
               if v > 0)
    helpful = result.top("example", test=1, n=5, order="helpful")
    assert helpful["value"].to_pylist() == result.top("example", test=1, n=5, order="asc")[
        "value"].to_pylist()
    assert helpful["effect"].to_pylist()[0] == "helpful (lowered the loss)"
    assert result.top("example", test=1, n=5, order="harmful").equals(top)
    margin = attrib.analyze.path_kernel(attrib.open_run(run_dir), mlp, probe_points(),
                                        target="margin", progress=False)
    best = margin.top("example", test=1, n=1, order="helpful")
    assert best["value"][0].as_py() > 0 and best["effect"][0].as_py() == \
        "helpful (raised the margin)"
    logit = attrib.analyze.path_kernel(attrib.open_run(run_dir), mlp, probe_points(),
                                       target="logit:0", progress=False)
    assert set(logit.top("example", test=1, n=50, order="abs")["effect"].to_pylist()) <= \
        {"raised f", "lowered f", "none"}
    with pytest.raises(ValueError, match="needs target 'loss' or 'margin'"):
        logit.top("example", order="helpful")
    everything = result.top("example", test=1, n=10**6, order="helpful")  # that sign only
    assert set(everything["effect"].to_pylist()) == {"helpful (lowered the loss)"}
    with pytest.raises(ValueError, match="order='largest': one of desc, asc, abs, helpful"):
        result.top("example", order="largest")
    with pytest.raises(ValueError, match="test=7: this analysis has test points 0 to"):
        result.top("example", test=7)


def test_stride_keeps_completeness_and_stride_one_is_exact_mode(run_dir):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), steps=40, clip=0.5)
    run = attrib.open_run(run_dir)
    exact = attrib.analyze.path_kernel(run, mlp, probe_points(), progress=False)
    one = attrib.analyze.path_kernel(run, mlp, probe_points(), stride=1, progress=False)
    assert exact.table.equals(one.table)
    for stride in (4, 7, 40):
        strided = attrib.analyze.path_kernel(run, mlp, probe_points(), stride=stride,
                                             progress=False)
        for row in strided.completeness().to_pylist():  # FTC per segment, up to quadrature,
            # which is larger on long segments: the reported estimate must cover it
            assert abs(row["gap"]) <= (1e-4 * abs(row["delta_f"]) + 1e-6
                                       + row["quadrature_error"]), (stride, row)
        a, b = (r.top("example", n=1000).sort_by("example")["value"].to_numpy()
                for r in (exact, strided))
        assert np.corrcoef(a, b)[0, 1] > 0.5 and not np.allclose(a, b)


def test_block_size_changes_memory_not_results(run_dir, monkeypatch):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["adam_l2"](model.parameters()), steps=30, clip=0.5)
    run = attrib.open_run(run_dir)
    default = attrib.analyze.path_kernel(run, mlp, probe_points(), by=("example", "step"),
                                         stride=2, progress=False)
    monkeypatch.setattr("attrib.analyzer.path_kernel.kernel.BLOCK_STEPS", 3)  # blocks of 2 steps
    assert run.meta["steps_per_chunk"] == 8  # the default block: 8 steps
    small = attrib.analyze.path_kernel(run, mlp, probe_points(), by=("example", "step"),
                                       stride=2, progress=False)
    keys = [("test_id", "ascending"), ("term", "ascending"), ("example_id", "ascending"),
            ("step", "ascending")]
    a, b = default.table.sort_by(keys), small.table.sort_by(keys)
    assert a.select(["test_id", "term", "example_id", "step"]).equals(
        b.select(["test_id", "term", "example_id", "step"]))
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-12,
                               atol=1e-15)


def test_similarity_from_the_models_perspective_per_layer(run_dir):
    """Plain SGD, left rule: Sim_ℓ(x, x') = −Σ_s η_s ∇f(x; θ_s)_ℓ · ∇ℓ(x'; θ_s)_ℓ."""
    model = mlp(torch.float64)
    x, y = torch.randn(96, 10, dtype=torch.float64), torch.randint(0, 3, (96,))
    train(run_dir, model, OPTIMIZERS["sgd"](model.parameters()), steps=8, inputs=x, labels=y,
          clip=None, batch=8)
    run = attrib.open_run(run_dir)
    xt, yt = probe_points(4)
    xt = xt.double()
    result = attrib.analyze.path_kernel(run, lambda: mlp(torch.float64), (xt, yt),
                                        quadrature="left", similarity=True, progress=False,
                                        stages={"early": range(0, 3), "late": range(3, 8)})
    net = mlp(torch.float64)
    expected = {(layer, stage): torch.zeros(4, 4, dtype=torch.float64)
                for layer in ("0", "2") for stage in (None, "early", "late")}
    for step in range(run.n_steps):
        g = per_example_grads(net, run.reconstruct(step), xt, yt, 1.0)
        lr = run.hparams()["lr"][step, 0]
        for layer in ("0", "2"):
            for kind in ("weight", "bias"):
                flat = g[f"{layer}.{kind}"].flatten(1)
                for stage in (None, "early" if step < 3 else "late"):
                    expected[(layer, stage)] -= lr * flat @ flat.T
    table = result.similarity
    assert table.num_rows == len(expected) * 16
    for (layer, stage), kernel in expected.items():
        where = pc.and_(pc.equal(table["layer"], layer),
                        pc.is_null(table["stage"]) if stage is None
                        else pc.equal(table["stage"], stage))
        rows = table.filter(where).sort_by([("test_id", "ascending"), ("other_id", "ascending")])
        np.testing.assert_allclose(rows["value"].to_numpy().reshape(4, 4), kernel.numpy(),
                                   rtol=1e-9)
        normalized = rows["normalized"].to_numpy().reshape(4, 4)
        np.testing.assert_allclose(np.abs(np.diag(normalized)), 1.0)


def test_stage_and_layer_axes_aggregate_step_and_param(run_dir):
    model = mlp()
    x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
    opt = OPTIMIZERS["adamw"](model.parameters())
    with attrib.Recorder(run_dir, model, opt) as rec:
        for step in range(12):
            if step == 5:
                rec.stage("second")
            ids = torch.arange(step * 16, step * 16 + 16)
            rec.examples(ids)
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(run_dir)
    full = attrib.analyze.path_kernel(run, mlp, probe_points(), by=("example", "step", "param"),
                                      progress=False).table
    stage_of = dict(zip(range(12), run.steps.column("stage").to_pylist()))
    layer_of = dict(zip(run.param_names, run.params.column("module").to_pylist()))
    for by in [("stage",), ("layer",), ("example", "stage", "layer"), ("step", "layer")]:
        got = attrib.analyze.path_kernel(run, mlp, probe_points(), by=by, progress=False).table
        expected: dict = {}
        for r in full.to_pylist():
            key = [r["test_id"], r["term"]]
            for axis in ("example", "step", "stage", "param", "layer"):
                if axis in by:
                    key.append({"example": r["example_id"], "step": r["step"],
                                "stage": stage_of.get(r["step"]), "param": r["param"],
                                "layer": layer_of.get(r["param"])}[axis])
            expected[tuple(key)] = expected.get(tuple(key), 0.0) + r["value"]
        columns = ["test_id", "term"] + [{"example": "example_id"}.get(a, a) for a in
                                         ("example", "step", "stage", "param", "layer")
                                         if a in by]
        rows = {tuple(r[c] for c in columns): r["value"] for r in got.to_pylist()}
        assert rows.keys() == expected.keys(), by
        for key, value in expected.items():
            assert rows[key] == pytest.approx(value, rel=1e-9, abs=1e-15), (by, key)
    assert {r["stage"] for r in attrib.analyze.path_kernel(
        run, mlp, probe_points(), by=("stage",), progress=False).table.to_pylist()
            if r["term"] == "data"} == {"default", "second"}


def test_callable_target_equals_named_target(run_dir):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["sgd_nesterov"](model.parameters()), steps=10)
    run = attrib.open_run(run_dir)
    named = attrib.analyze.path_kernel(run, mlp, probe_points(), target="logit:1",
                                       progress=False)
    custom = attrib.analyze.path_kernel(run, mlp, probe_points(),
                                        target=lambda net, x, y: net(x)[:, 1], progress=False)
    assert_complete(custom)
    keys = [("test_id", "ascending"), ("term", "ascending"), ("example_id", "ascending")]
    np.testing.assert_allclose(named.table.sort_by(keys)["value"].to_numpy(),
                               custom.table.sort_by(keys)["value"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(named.f_final, custom.f_final)


class TinyGRU(torch.nn.Module):
    """Embedding, a time-first GRU (no vmap batching rule for its kernel) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(12, 8)
        self.rnn = torch.nn.GRU(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens).transpose(0, 1))
        return self.head(out[-1])


def test_completeness_on_a_gru(run_dir, monkeypatch):
    """The path kernel on a recurrent model (per-example rows by recurrent.py's closed form):
    test gradients fall back to one test point at a time, and the terms sum to
    f(θ_N) − f(θ_0); the similarity's gradients, vmapped over several steps elsewhere, fall
    back to one step at a time and equal one call per step."""
    model = TinyGRU().double()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 12, (128, 6), generator=g)
    train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), steps=30, inputs=tokens,
          labels=tokens[:, 0] % 3, clip=0.5, batch=8, capture=attrib.Full(dtype="float64"),
          strict=True, check_every=1)
    assert float(attrib.open_run(run_dir).residual_norms().max()) < 1e-10  # GRU rows exact
    test_tokens = torch.randint(0, 12, (3, 6), generator=g)
    run = attrib.open_run(run_dir)
    result = attrib.analyze.path_kernel(run, lambda: TinyGRU().double(),
                                        (test_tokens, test_tokens[:, 0] % 3), progress=False,
                                        similarity=True)
    assert_complete(result)
    monkeypatch.setattr("attrib.analyzer.path_kernel.kernel.SIMILARITY_STEPS", 1)
    stepwise = attrib.analyze.path_kernel(run, lambda: TinyGRU().double(),
                                          (test_tokens, test_tokens[:, 0] % 3), progress=False,
                                          similarity=True, by=("param",))
    assert result.similarity.num_rows > 0
    assert result.similarity.equals(stepwise.similarity)
    # TracIn on the same model (its gradients take the same one-point-at-a-time path): one
    # checkpoint's score is η ∇f(x) · ∇ℓ_i, checked for one pair by plain autograd
    scores = attrib.analyze.tracin(run, lambda: TinyGRU().double(), (tokens, tokens[:, 0] % 3),
                                   (test_tokens, test_tokens[:, 0] % 3), checkpoints=[0],
                                   progress=False).to_pylist()
    reference = TinyGRU().double()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, value in run.reconstruct(0).items():
            params[name].copy_(value)

    def gradient(x, y):
        loss = F.cross_entropy(reference(x[None]), y[None])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])

    row = next(r for r in scores if r["example_id"] == 5 and r["test_id"] == 1)
    expected = float(run.hparams()["lr"][0, 0]) * float(
        gradient(test_tokens[1], test_tokens[1, 0] % 3) @ gradient(tokens[5], tokens[5, 0] % 3))
    assert abs(row["value"] - expected) <= 1e-8 * abs(expected) + 1e-12, (row, expected)


def test_completeness_on_hugging_face_gpt2(run_dir):
    """A third-party LM (Conv1D layers, tied lm_head, position_ids) with a callable target,
    the log-probability of each test sequence's next token."""
    def make():
        return tiny_gpt2(torch.float64)

    model = make()
    opt = OPTIMIZERS["adamw"](model.parameters())
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 40, (64, 8), generator=g)
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full(dtype="float64"),
                         checkpoint_every=5, strict=True) as rec:
        for _ in range(12):
            ids = torch.randint(0, 64, (8,), generator=g)
            rec.examples(ids)
            model(tokens[ids], labels=tokens[ids]).loss.backward()
            opt.step()
            opt.zero_grad()

    def next_token_log_prob(model_at, inputs, labels):
        logits = model_at(inputs).logits[:, -1]
        return -F.cross_entropy(logits, labels, reduction="none")

    test = torch.randint(0, 40, (3, 9), generator=g)
    result = attrib.analyze.path_kernel(attrib.open_run(run_dir), make,
                                        (test[:, :-1], test[:, -1]),
                                        target=next_token_log_prob, quadrature=8,
                                        progress=False)
    assert_complete(result)  # 8 nodes: AdamW's steps bend this small model (2 left 1e-2)


def test_progress_bars_stay_out_of_logs(relu_run, capfd):
    """A bar redrawn into a log or a pipe is thousands of lines: progress=True draws only on a
    terminal (pytest's capture is a pipe)."""
    run, test = relu_run
    attrib.analyze.path_kernel(run, relu_mlp, test, progress=True)
    assert "path-kernel influences" not in capfd.readouterr().err


def test_automatic_stride_merges_smooth_steps_and_stays_complete(run_dir):
    """stride="auto" on a smooth MLP: segments grow while two nodes over the merged steps
    meet their share of the tolerance, so there are fewer segments than steps (more at a
    looser tolerance), and the result is as complete as stride 1."""
    model = mlp()
    train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), steps=60, clip=0.5)
    run = attrib.open_run(run_dir)
    auto = attrib.analyze.path_kernel(run, mlp, probe_points(), stride="auto", by=("step",),
                                      tol=(1e-6, 1e-9), progress=False)
    assert_complete(auto)
    loose = attrib.analyze.path_kernel(run, mlp, probe_points(), stride="auto", tol=(1e-2, 1e-6),
                                       progress=False)
    assert len(loose.nodes) < len(auto.nodes) < 0.6 * run.n_steps
    assert auto.segments[0] == 0 and len(auto.segments) == len(auto.nodes)
    assert (np.diff(auto.segments) >= 1).all() and np.diff(auto.segments).max() > 1
    assert (np.abs(loose.completeness()["relative_gap"].to_numpy()) <= 1e-2 + 1e-6).all()
    with pytest.raises(ValueError, match="positive number of steps per segment or 'auto'"):
        attrib.analyze.path_kernel(run, mlp, probe_points(), stride="often", progress=False)
