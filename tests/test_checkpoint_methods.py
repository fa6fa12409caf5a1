"""TracIn-CP / Grad-Dot / Grad-Cos against explicit torch.func inner products, and the
`attrib analyze` command end to end (results stored in the run, queryable by SQL)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import OPTIMIZERS, data, mlp, train
from torch.func import functional_call, grad, vmap

import attrib
from attrib.cli.main import main


@pytest.fixture
def recorded(run_dir):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["sgd_nesterov"](model.parameters()), steps=25)
    return attrib.open_run(run_dir)


def grads_at(theta, x, y):
    net = mlp().double()

    def loss(params, xi, yi):
        return F.cross_entropy(functional_call(net, params, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))({k: v.double() for k, v in theta.items()},
                                               x.double(), y)
    return torch.cat([v.flatten(1) for v in g.values()], dim=1)


def as_matrix(table, n_test, n_train):
    table = table.sort_by([("test_id", "ascending"), ("example_id", "ascending")])
    return table["value"].to_numpy().reshape(n_test, n_train)


def test_grad_dot_and_cos_at_the_final_checkpoint(recorded):
    x, y = data()
    xt, yt = x[:5] + 0.1, y[:5]
    final = recorded.checkpoint(len(recorded.checkpoint_steps) - 1)
    expected = grads_at(final, xt, yt) @ grads_at(final, x, y).T
    dot = attrib.analyze.grad_dot(recorded, mlp, (x, y), (xt, yt), progress=False)
    np.testing.assert_allclose(as_matrix(dot, 5, len(y)), expected.numpy(), rtol=1e-9)
    cos = attrib.analyze.grad_cos(recorded, mlp, (x, y), (xt, yt), progress=False)
    norms = grads_at(final, xt, yt).norm(dim=1)[:, None] * grads_at(final, x, y).norm(dim=1)
    np.testing.assert_allclose(as_matrix(cos, 5, len(y)), (expected / norms).numpy(),
                               rtol=1e-9)


def test_tracin_sums_learning_rate_weighted_dots_over_checkpoints(recorded):
    x, y = data()
    xt, yt = x[:3] - 0.2, y[:3]
    lr = recorded.hparams()["lr"][:, 0]
    expected = sum(lr[min(step, recorded.n_steps - 1)]
                   * grads_at(recorded.checkpoint(i), xt, yt)
                   @ grads_at(recorded.checkpoint(i), x, y).T
                   for i, step in enumerate(recorded.checkpoint_steps))
    got = attrib.analyze.tracin(recorded, mlp, (x, y), (xt, yt), progress=False)
    np.testing.assert_allclose(as_matrix(got, 3, len(y)), expected.numpy(), rtol=1e-9)
    last = attrib.analyze.tracin(recorded, mlp, (x, y), (xt, yt), checkpoints="last:1",
                                 progress=False)
    projected = attrib.analyze.tracin(recorded, mlp, (x, y), (xt, yt), k=64, progress=False)
    assert np.corrcoef(as_matrix(projected, 3, len(y)).ravel(),
                       expected.numpy().ravel())[0, 1] > 0.9
    assert not np.allclose(as_matrix(last, 3, len(y)), expected.numpy())


def test_analyze_cli_stores_results_queryable_by_sql(recorded, tmp_path, monkeypatch):
    tests_dir = str(Path(__file__).parent)
    (tmp_path / "userdefs.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {tests_dir!r})
        from conftest import data, mlp
        def test_set():
            x, y = data()
            return x[:4] + 0.1, y[:4]
        def train_set():
            return data()
    """))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["analyze", str(recorded.dir), "--model", "userdefs:mlp",
                                  "--data", "userdefs:test_set", "--by", "example,step",
                                  "--similarity", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "completeness" in result.output and "relative_gap" in result.output
    result = runner.invoke(main, ["analyze", str(recorded.dir), "--method", "grad-dot",
                                  "--model", "userdefs:mlp", "--data", "userdefs:test_set",
                                  "--train", "userdefs:train_set", "--quiet"])
    assert result.exit_code == 0, result.output
    counts = attrib.sql(recorded, "SELECT analysis, method, count(*) AS n FROM influence "
                                  "GROUP BY ALL ORDER BY 1").to_pylist()
    assert [(c["analysis"], c["method"]) for c in counts] == [("grad-dot", "grad-dot"),
                                                              ("path-kernel", "path-kernel")]
    assert counts[0]["n"] == 4 * 256
    gaps = attrib.sql(recorded, "SELECT max(relative_gap) FROM completeness").column(0)
    assert gaps[0].as_py() < 1e-3
    layers = attrib.sql(recorded, "SELECT layer, count(*) AS n FROM similarity GROUP BY 1 "
                                  "ORDER BY 1").to_pylist()
    assert layers == [{"layer": "0", "n": 16}, {"layer": "2", "n": 16}]
    missing = runner.invoke(main, ["analyze", str(recorded.dir), "--method", "tracin",
                                   "--model", "userdefs:mlp", "--data", "userdefs:test_set"])
    assert missing.exit_code != 0 and "needs --train" in missing.output
    # analysis.json records the parameters used, defaults included (it stored null for them)
    result = runner.invoke(main, ["analyze", str(recorded.dir), "--method", "tracin",
                                  "--model", "userdefs:mlp", "--data", "userdefs:test_set",
                                  "--train", "userdefs:train_set", "--quiet"])
    assert result.exit_code == 0, result.output
    used = json.loads((recorded.dir / "analysis" / "tracin" / "analysis.json").read_text())
    assert (used["checkpoints"], used["gradients"], used["target"]) == ("all", "exact", "loss")
    path_kernel = json.loads((recorded.dir / "analysis" / "path-kernel" / "analysis.json")
                             .read_text())
    assert (path_kernel["stride"], path_kernel["quadrature"]) == (1, "adaptive")
    adaptive = runner.invoke(main, ["analyze", str(recorded.dir), "--model", "userdefs:mlp",
                                    "--data", "userdefs:test_set", "--quadrature", "adaptive",
                                    "--tol", "1e-3", "--max-nodes", "8", "--name", "pk-a",
                                    "--quiet"])
    assert adaptive.exit_code == 0, adaptive.output
    used = json.loads((recorded.dir / "analysis" / "pk-a" / "analysis.json").read_text())
    assert (used["quadrature"], used["tol"], used["max_nodes"]) == ("adaptive", 1e-3, 8)
    ignored = runner.invoke(main, ["analyze", str(recorded.dir), "--method", "grad-dot",
                                   "--model", "userdefs:mlp", "--data", "userdefs:test_set",
                                   "--train", "userdefs:train_set", "--checkpoints", "all"])
    assert ignored.exit_code != 0 and "grad-dot uses the final checkpoint" in ignored.output
    bad = runner.invoke(main, ["analyze", str(recorded.dir), "--model", "nowhere:thing",
                               "--data", "userdefs:test_set"])
    assert bad.exit_code != 0 and "can't import 'nowhere'" in bad.output
