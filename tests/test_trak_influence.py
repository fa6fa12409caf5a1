"""TRAK and the Gauss–Newton influence function against explicit float64 linear algebra:
per-example gradients by autograd one example at a time, the kernel and the GGN formed as
matrices and solved directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import OPTIMIZERS, data, mlp, train
from torch.func import functional_call

import attrib
from attrib.analyzer.trak import solve_kernel


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    model = mlp()
    path = tmp_path_factory.mktemp("trak") / "run"
    train(path, model, OPTIMIZERS["sgd_nesterov"](model.parameters()), steps=30)
    return attrib.open_run(path)


def per_example(theta, x, y, f):
    """Rows ∇f(x_j; θ) by plain autograd, one example at a time (float64)."""
    net = mlp().double()
    params = {k: v.double().clone().requires_grad_(True) for k, v in theta.items()}
    rows = []
    for xi, yi in zip(x.double(), y):
        out = functional_call(net, params, (xi[None],))
        value = f(out, yi[None])
        grads = torch.autograd.grad(value, list(params.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def margin(out, y):
    others = out.clone()
    others[0, y] = -torch.inf
    return out[0, y] - others.logsumexp(1)[0]


def as_matrix(table, n_test, n_train):
    table = table.sort_by([("test_id", "ascending"), ("example_id", "ascending")])
    return table["value"].to_numpy().reshape(n_test, n_train)


@pytest.mark.parametrize("n_train", [40, 200])  # below / above the 227 parameters: dual, primal
def test_trak_equals_the_explicit_formula(recorded, n_train):
    x, y = data()
    train_set, test_set = (x[:n_train], y[:n_train]), (x[200:206] * 1.1, y[200:206])
    damping = 1e-2
    kernel, q = 0, 0
    indices = [1, 2, 3]
    for index in indices:
        theta = recorded.checkpoint(index)
        phi = per_example(theta, *train_set, margin)
        phi_x = per_example(theta, *test_set, margin)
        gram = phi.T @ phi + damping * torch.eye(phi.shape[1], dtype=torch.float64)
        kernel = kernel + phi_x @ torch.linalg.solve(gram, phi.T) / len(indices)
        with torch.no_grad():
            net, params = mlp().double(), {k: v.double() for k, v in theta.items()}
            p = F.softmax(functional_call(net, params, (x[:n_train].double(),)), -1)
        q = q + (1 - p.gather(1, train_set[1][:, None]).squeeze(1)) / len(indices)
    got = attrib.analyze.trak(recorded, mlp, train_set, test_set, checkpoints=indices, k=None,
                              damping=damping, progress=False)
    np.testing.assert_allclose(as_matrix(got, 6, n_train), (kernel * q).numpy(), rtol=1e-7,
                               atol=1e-12)


def test_projected_trak_is_the_formula_on_the_recorders_projection(recorded):
    x, y = data()
    train_set, test_set = (x[:60], y[:60]), (x[200:204], y[200:204])
    theta = recorded.checkpoint(3)
    shapes = {k: tuple(v.shape) for k, v in theta.items()}

    def projected(rows):  # the recorder's projection of each tensor (stored in full if small)
        parts = rows.split([int(np.prod(s)) for s in shapes.values()], dim=1)
        return torch.cat([attrib.project(part, shape, "kron", 64, 5, name)
                          if np.prod(shape) > 64 else part
                          for part, (name, shape) in zip(parts, shapes.items())], dim=1)

    phi = projected(per_example(theta, *train_set, margin))
    phi_x = projected(per_example(theta, *test_set, margin))
    kernel = phi_x @ torch.linalg.solve(phi.T @ phi + 1e-2 * torch.eye(phi.shape[1],
                                                                      dtype=torch.float64), phi.T)
    with torch.no_grad():
        p = F.softmax(functional_call(mlp().double(), {k: v.double() for k, v in theta.items()},
                                      (train_set[0].double(),)), -1)
    q = 1 - p.gather(1, train_set[1][:, None]).squeeze(1)
    got = attrib.analyze.trak(recorded, mlp, train_set, test_set, checkpoints=[3], k=64, seed=5,
                              damping=1e-2, progress=False)
    assert phi.shape[1] < 227  # really projected
    np.testing.assert_allclose(as_matrix(got, 4, 60), (kernel * q).numpy(), rtol=1e-6,
                               atol=1e-12)


def test_singular_and_ill_conditioned_kernels_ask_for_damping():
    """Undamped with fewer examples than features, the minimum-norm solve interpolates: a
    test point equal to a training example gets score 1 on it and ~0 on every other (the
    degenerate result TRAK used to return). That, a singular kernel and one too
    ill-conditioned for its dtype are refused with a suggested damping that then works."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 20, generator=g, dtype=torch.float64)  # n = 6 < k = 20
    interpolated = wide[:1] @ torch.linalg.pinv(wide)
    np.testing.assert_allclose(interpolated.numpy(), np.eye(6)[:1], atol=1e-12)
    with pytest.raises(ValueError, match=r"rank at most 6.*pass damping > 0 \(e\.g\. "):
        solve_kernel(wide[:1], wide, 0.0)
    suggested = 1e-3 * float((wide ** 2).sum()) / 6
    assert solve_kernel(wide[:1], wide, suggested).shape == (1, 6)
    with pytest.raises(ValueError, match=r"singular or ill-conditioned.*pass damping > 0"):
        solve_kernel(wide[:1, :3], torch.ones(5, 3, dtype=torch.float64), 0.0)
    tall = torch.randn(50, 4, generator=g)
    tall[:, 3] = tall[:, 2] * (1 + 1e-4)  # proportional up to float32 rounding: κ ≳ 1e14
    with pytest.raises(ValueError, match=r"ill-conditioned \(condition number ≥ "):
        solve_kernel(tall[:1], tall, 0.0)  # even in float64, where the solve runs
    kahan = torch.triu(-0.5 * torch.ones(40, 40, dtype=torch.float64), 1) + torch.eye(40)
    with pytest.raises(ValueError, match="ill-conditioned"):  # unit pivots, κ ~ 1e17: the
        solve_kernel(kahan[:1], kahan, 0.0)  # pivot ratio alone would have accepted it
    well = torch.randn(50, 4, generator=g)
    with pytest.raises(ValueError, match="not finite"):
        solve_kernel(well[:1] * float("nan"), well, 1.0)
    with pytest.raises(ValueError, match="damping=-1"):
        solve_kernel(well[:1], well, -1.0)
    expected = well[:2] @ torch.linalg.solve(well.T @ well, well.T)
    torch.testing.assert_close(solve_kernel(well[:2], well, 0.0), expected, rtol=1e-4,
                               atol=1e-6)


def test_influence_equals_a_direct_solve_with_the_explicit_gauss_newton(recorded):
    x, y = data()
    train_set, test_set = (x[:80], y[:80]), (x[200:205], y[200:205])
    theta = recorded.reconstruct(recorded.n_steps)
    net = mlp().double()
    params = {k: v.double() for k, v in theta.items()}
    flat = torch.cat([v.reshape(-1) for v in params.values()])
    sizes = [v.numel() for v in params.values()]

    def logits(vector, xi):
        parts = dict(zip(params, (p.reshape(v.shape) for p, v in
                                  zip(vector.split(sizes), params.values()))))
        return functional_call(net, parts, (xi[None].double(),))[0]

    ggn = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for xi in train_set[0]:
        jac = torch.autograd.functional.jacobian(lambda v, xi=xi: logits(v, xi), flat)
        p = logits(flat, xi).softmax(-1)
        ggn += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / len(train_set[1])
    damping = 1e-2
    test_grads = per_example(theta, *test_set, lambda o, t: F.cross_entropy(o, t))
    train_grads = per_example(theta, *train_set, lambda o, t: F.cross_entropy(o, t))
    expected = torch.linalg.solve(ggn + damping * torch.eye(len(flat), dtype=torch.float64),
                                  test_grads.T).T @ train_grads.T
    result = attrib.analyze.influence(recorded, mlp, train_set, test_set, damping=damping,
                                      tol=1e-12, progress=False)
    assert result.residuals[-1] < 1e-10 and len(result.residuals) < 200
    np.testing.assert_allclose(as_matrix(result.scores, 5, 80), expected.numpy(), rtol=1e-6,
                               atol=1e-9)


def test_analyze_cli_trak_and_influence_store_their_scores(recorded, tmp_path, monkeypatch):
    import textwrap
    from pathlib import Path

    from click.testing import CliRunner

    from attrib.cli.main import main

    (tmp_path / "trak_userdefs.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import data, mlp
        test_set = (data()[0][:3] + 0.1, data()[1][:3])
        train_set = (data()[0][:50], data()[1][:50])
    """))
    monkeypatch.chdir(tmp_path)
    common = ["--model", "trak_userdefs:mlp", "--data", "trak_userdefs:test_set", "--train",
              "trak_userdefs:train_set", "--quiet"]
    runner = CliRunner()
    for method, extra in (("trak", ["--k", "32", "--checkpoints", "last:2", "--damping",
                                    "0.01"]),
                          ("influence", ["--damping", "0.01"])):
        result = runner.invoke(main, ["analyze", str(recorded.dir), "--method", method,
                                      *common, *extra])
        assert result.exit_code == 0, result.output
    counts = attrib.sql(recorded, "SELECT method, count(*) AS n FROM influence WHERE method IN "
                                  "('trak', 'influence') GROUP BY 1 ORDER BY 1").to_pylist()
    assert counts == [{"method": "influence", "n": 150}, {"method": "trak", "n": 150}]
    expected = attrib.analyze.trak(recorded, mlp, (data()[0][:50], data()[1][:50]),
                                   (data()[0][:3] + 0.1, data()[1][:3]), k=32,
                                   checkpoints="last:2", damping=0.01, progress=False)
    stored = attrib.sql(recorded, "SELECT value FROM influence WHERE method = 'trak' "
                                  "ORDER BY test_id, example_id")["value"].to_numpy()
    np.testing.assert_allclose(stored, as_matrix(expected, 3, 50).ravel())
    singular = runner.invoke(main, ["analyze", str(recorded.dir), "--method", "trak", *common,
                                    "--k", "2048", "--name", "singular", "--damping", "0"])
    assert singular.exit_code != 0  # 50 examples, 227 features, undamped: refused
    assert "can't determine 227 feature dimensions" in singular.output
    assert "pass damping > 0 (e.g. " in singular.output
    loss = runner.invoke(main, ["analyze", str(recorded.dir), "--method", "trak", *common,
                                "--target", "loss", "--name", "trak-loss"])
    assert loss.exit_code != 0 and "TRAK is defined for the margin only" in loss.output


@pytest.mark.parametrize("capture", [attrib.Project(32, seed=5), attrib.Factored(),
                                     attrib.Full()])
def test_trak_reads_stored_rows_of_a_full_batch_run(tmp_path, recorded, capture):
    """Stored rows serve as TRAK's features: projected rows whose projection is TRAK's, and
    exact rows projected at the checkpoint (Factored ones from their factors, never forming
    a row); the scores equal those from recomputed features."""
    from attrib.analyzer.checkpoint_methods import features
    from attrib.analyzer.trak import from_stored, stored_features

    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attrib.Recorder(tmp_path / "full", model, opt, capture=capture,
                         checkpoint_every=5) as rec:
        for _ in range(12):
            rec.examples(torch.arange(len(y)))
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(tmp_path / "full")
    rows = stored_features(run, 1, len(y), 32, 5, "kron")
    assert rows is not None
    theta = run.checkpoint(1)
    p = F.softmax(functional_call(mlp(), theta, (x,)), -1)
    p = p.gather(1, y[:, None]).squeeze(1).detach().double()
    shapes = {k: tuple(v.shape) for k, v in theta.items()}
    phi = features(mlp().double().eval(), {k: v.double() for k, v in theta.items()},
                   x.double(), y, "margin", 32, 5, "kron", shapes)
    rebuilt = from_stored(rows, p, phi[:4])
    assert rebuilt is not None  # the stored rows are used, not recomputed
    np.testing.assert_allclose(rebuilt.numpy(), phi.numpy(), rtol=1e-3, atol=1e-5)
    if isinstance(capture, attrib.Project):  # exact rows take any seed
        assert stored_features(run, 1, len(y), 32, 6, "kron") is None  # another seed
    assert stored_features(recorded, 1, len(y), 32, 0, "kron") is None  # mini-batches
    test_set = (x[:5] + 0.1, y[:5])
    options = dict(checkpoints=[0, 1, 2], k=32, seed=5, damping=1e-3, progress=False)
    stored = attrib.analyze.trak(run, mlp, (x, y), test_set, **options)
    computed = attrib.analyze.trak(run, mlp, (x, y), test_set, use_stored=False, **options)
    np.testing.assert_allclose(as_matrix(stored, 5, len(y)), as_matrix(computed, 5, len(y)),
                               rtol=1e-3, atol=1e-6 * np.abs(as_matrix(computed, 5,
                                                                      len(y))).max())



@pytest.mark.parametrize("factory", ["other width", "other names"])
def test_a_factory_of_another_architecture_is_refused_by_every_analysis(recorded, factory):
    """Analyses put the run's θ into model_fn()'s model by name: another width used to fail
    deep in a forward or run silently, other names with a raw AttributeError. Each analysis
    names the mismatched parameters first."""
    run = recorded

    def wrong():
        torch.manual_seed(0)
        if factory == "other width":
            return torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.ReLU(),
                                       torch.nn.Linear(7, 3))
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, 3))

    x, y = data()
    test = (x[:3], y[:3])
    match = ("shapes '0.weight' \\(7, 10\\) \\(recorded \\(16, 10\\)\\)" if factory == "other width"
             else "missing 0.weight, 0.bias, 2.weight, 2.bias")
    for analysis in (lambda: attrib.analyze.path_kernel(run, wrong, test, progress=False),
                     lambda: attrib.analyze.tracin(run, wrong, (x, y), test),
                     lambda: attrib.analyze.trak(run, wrong, (x, y), test, damping=1e-3),
                     lambda: attrib.analyze.influence(run, wrong, (x, y), test, damping=1e-3)):
        with pytest.raises(ValueError, match=f"model_fn\\(\\) builds a model whose parameters "
                                             f"differ from the run's: {match}"):
            analysis()


def test_a_training_set_that_does_not_reproduce_the_run_is_refused(recorded):
    """TracIn, Grad-Dot, TRAK and the influence function score examples by their loss
    gradients: with wrong labels or another example order they used to return scores
    silently. The gradient recorded at step 0 is recomputed from the given set first."""
    x, y = data()
    test_set = (x[200:203] + 0.1, y[200:203])
    wrong_labels = (x, (y + 1) % 3)
    shuffled = (x.flip(0), y.flip(0))
    calls = {"tracin": lambda s, **o: attrib.analyze.tracin(recorded, mlp, s, test_set, **o),
             "grad-dot": lambda s, **o: attrib.analyze.grad_dot(recorded, mlp, s, test_set, **o),
             "trak": lambda s, **o: attrib.analyze.trak(recorded, mlp, s, test_set, k=16,
                                                        damping=1e-2, **o),
             "influence": lambda s, **o: attrib.analyze.influence(recorded, mlp, s, test_set,
                                                                  **o).scores}
    for name, call in calls.items():
        for bad in (wrong_labels, shuffled):
            with pytest.raises(ValueError, match=r"doesn't reproduce the gradient recorded at "
                                                 r"step 0.*pass check_data=False"):
                call(bad, progress=False)
        assert call((x, y), progress=False).num_rows == 3 * len(y), name
        unchecked = call(wrong_labels, progress=False, check_data=False)  # the user's call
        assert unchecked.num_rows == 3 * len(y)
    assert calls["tracin"]((x[:40], y[:40]), progress=False).num_rows == 3 * 40  # a prefix


def test_the_training_set_check_uses_steps_that_recorded_examples(tmp_path):
    """A run whose first steps recorded no example ids (rec.examples from step 2 on) is
    checked on the steps that did: right data passes, wrong labels are refused (it used to
    crash on the empty step 0)."""
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with attrib.Recorder(tmp_path / "run", model, opt, capture=False) as rec:
        for step in range(6):
            ids = torch.randint(0, len(y), (32,), generator=g)
            if step >= 2:
                rec.examples(ids)
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(tmp_path / "run")
    test_set = (x[:3] + 0.1, y[:3])
    assert attrib.analyze.grad_dot(run, mlp, (x, y), test_set, progress=False).num_rows == \
        3 * len(y)
    with pytest.raises(ValueError, match="doesn't reproduce the gradient recorded at step"):
        attrib.analyze.grad_dot(run, mlp, (x, (y + 1) % 3), test_set, progress=False)


@pytest.mark.parametrize("capture", [attrib.Factored(), attrib.Project(8), False])
def test_a_reordering_inside_a_full_batch_is_refused_where_rows_are_stored(tmp_path, capture,
                                                                            monkeypatch):
    """Full-batch training: any permutation of the training set reproduces every step's
    gradient. Stored per-example rows (exact or projected) still tell the examples apart;
    a run without them can't, and says so in the docs (the shuffled set passes there)."""
    x, y = data()
    x, y = x[:64], y[:64]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attrib.Recorder(tmp_path / "run", model, opt, capture=capture) as rec:
        for _ in range(4):
            rec.examples(torch.arange(64))
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(tmp_path / "run")
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    test_set = (x[:2] + 0.1, y[:2])
    assert attrib.analyze.grad_dot(run, mlp, (x, y), test_set, progress=False).num_rows == 128
    if capture is False:
        assert attrib.analyze.grad_dot(run, mlp, (x[perm], y[perm]), test_set,
                                       progress=False).num_rows == 128
        return
    with pytest.raises(ValueError, match="don't match the per-example rows recorded at step 0"):
        attrib.analyze.grad_dot(run, mlp, (x[perm], y[perm]), test_set, progress=False)
    # a model whose per-example gradients would not fit the check's budget skips the row check
    monkeypatch.setattr("attrib.analyzer.training.ROW_CHECK_BYTES", 1)
    assert attrib.analyze.grad_dot(run, mlp, (x[perm], y[perm]), test_set,
                                   progress=False).num_rows == 128
