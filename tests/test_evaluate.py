"""LDS and further training, the two gold standards, against cases with known answers:
a model whose output is exactly Σ_{i∈S} τ_i (LDS 1), and leave-one-out further training
written out as a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import OPTIMIZERS, data, mlp, train
from torch.func import functional_call

import attrib
from attrib.analyzer.checkpoint_methods import score_table
from attrib.analyzer.evaluate import spearman

N_TRAIN, N_TEST = 30, 4
TRUE_TAU = torch.randn(N_TEST, N_TRAIN, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)


def sum_of_subset(indices: np.ndarray, seed: int) -> torch.nn.Module:
    """A 'trained model' whose output on test row x is Σ_{i∈S} x_i: with x = τ(x) its f is
    exactly the datamodel Σ_{i∈S} τ(x)_i."""
    model = torch.nn.Linear(N_TRAIN, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, torch.as_tensor(indices)] = 1.0
    return model


def output(model, inputs, labels):
    return model(inputs)[:, 0]


def test_spearman_with_ties_matches_the_definition():
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    b = np.array([2.0, 1.0, 4.0, 4.0, 9.0])
    ranks_a, ranks_b = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 3.5, 3.5, 5])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ranks_a, ranks_b)[0, 1])
    assert np.isnan(spearman(a, np.ones(5)))


def test_lds_is_one_for_the_true_datamodel_and_resumes(tmp_path):
    test_set = (TRUE_TAU, torch.zeros(N_TEST, dtype=torch.long))
    common = dict(train_fn=sum_of_subset, test_set=test_set, n_train=N_TRAIN, models=12,
                  target=output, progress=False)
    exact = attrib.evaluate.lds(score_table(TRUE_TAU, output), "contribution", tmp_path / "e",
                                workers=2, **common)
    assert exact.mean == pytest.approx(1.0) and exact.per_test.num_rows == N_TEST
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "e").glob("model-*.parquet")}
    assert len(stamps) == 12
    noisy = TRUE_TAU + 2 * torch.randn(N_TEST, N_TRAIN, generator=torch.Generator()
                                       .manual_seed(1), dtype=torch.float64)
    again = attrib.evaluate.lds(noisy.numpy(), "contribution", tmp_path / "e", workers=1,
                                **common)
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "e").glob("model-*.parquet")} == stamps
    assert 0 < again.mean < 0.95
    flipped = attrib.evaluate.lds(score_table(TRUE_TAU, output), "tracin", tmp_path / "e")
    assert flipped.mean == pytest.approx(-1.0)  # TracIn's orientation is the opposite
    with pytest.raises(ValueError, match="use another directory"):
        attrib.evaluate.lds(TRUE_TAU.numpy(), "contribution", tmp_path / "e",
                            **{**common, "alpha": 0.3})


def train_on_subset(indices: np.ndarray, seed: int) -> torch.nn.Module:
    """The README's `train_on_subset` for the `recorded` run: its SGD on the subset only."""
    x, y = data()
    model, subset = mlp(), torch.as_tensor(indices)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(30):
        ids = subset[torch.randint(0, len(subset), (32,), generator=g)]
        F.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    model = mlp()
    path = tmp_path_factory.mktemp("further") / "run"
    train(path, model, OPTIMIZERS["sgd"](model.parameters()), steps=30, schedule=False)
    return attrib.open_run(path)


def test_further_training_equals_a_plain_leave_one_out_loop(recorded):
    x, y = data()
    test_set = (x[200:203] + 0.1, y[200:203])
    ids, lr, batch, steps = np.array([3, 17, 40]), 0.05, 16, (1, 4)
    gold = attrib.evaluate.further_training(recorded, mlp, (x, y), test_set, target="loss",
                                            examples=ids,
                                            seeds=1, steps=steps, lr=lr, batch_size=batch,
                                            seed=7, progress=False)
    net = mlp().double()
    g = torch.Generator().manual_seed(7000)
    order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(1)])
    expected = np.zeros((len(steps), len(ids), 3))
    for column, i in enumerate(ids):
        params = {k: v.double().clone().requires_grad_(True)
                  for k, v in recorded.reconstruct(recorded.n_steps).items()}
        for t in range(1, max(steps) + 1):
            b = order[(t - 1) * batch: t * batch]
            loss = F.cross_entropy(functional_call(net, params, (x[b].double(),)), y[b]) - \
                F.cross_entropy(functional_call(net, params, (x[i:i + 1].double(),)),
                                y[i:i + 1]) / len(y)
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {k: (v - lr * gk).detach().requires_grad_(True)
                      for (k, v), gk in zip(params.items(), grads)}
            if t in steps:
                with torch.no_grad():
                    f = F.cross_entropy(functional_call(net, params, (test_set[0].double(),)),
                                        test_set[1], reduction="none")
                expected[steps.index(t), column] = f.numpy()
    expected -= expected.mean(axis=1, keepdims=True)
    got = gold.sort_by([("steps", "ascending"), ("example_id", "ascending"),
                        ("test_id", "ascending")])["effect"].to_numpy()
    np.testing.assert_allclose(got, expected.ravel(), rtol=1e-9, atol=1e-15)


def test_grad_dot_predicts_one_step_of_further_training(recorded):
    x, y = data()
    test_set = (x[200:210] + 0.1, y[200:210])
    gold = attrib.evaluate.further_training(recorded, mlp, (x, y), test_set, examples=40,
                                            seeds=2, steps=(1, 50), lr=0.01, progress=False,
                                            target="loss")
    dot = attrib.analyze.grad_dot(recorded, mlp, (x, y), test_set, progress=False)
    cosine = attrib.evaluate.further_training_cosine(dot, "grad-dot", gold).to_pylist()
    assert cosine[0]["steps"] == 1 and cosine[0]["cosine"] > 0.9
    wrong_sign = attrib.evaluate.further_training_cosine(dot, "trak", gold).to_pylist()
    assert wrong_sign[0]["cosine"] == pytest.approx(-cosine[0]["cosine"])


def test_scores_and_gold_standards_of_different_targets_are_refused(recorded):
    """Loss = softplus(−margin) falls as the margin rises, so loss-target scores against a
    margin gold standard came out with the sign flipped (−0.89 for a good method). Each table
    records its target; the evaluators refuse a mismatch and agree by default (margin, as
    TRAK and LDS), so the README's snippet gives the right sign as written."""
    x, y = data()
    test_set = (x[200:210] + 0.1, y[200:210])
    gold = attrib.evaluate.further_training(recorded, mlp, (x, y), test_set, examples=40,
                                            seeds=2, steps=(1,), lr=0.01, progress=False)
    loss_scores = attrib.analyze.grad_dot(recorded, mlp, (x, y), test_set, progress=False)
    with pytest.raises(ValueError, match="computed for target='loss', the gold standard "
                                         "measures target='margin'"):
        attrib.evaluate.further_training_cosine(loss_scores, "grad-dot", gold)
    margin_scores = attrib.analyze.grad_dot(recorded, mlp, (x, y), test_set, target="margin",
                                            progress=False)
    cosine = attrib.evaluate.further_training_cosine(margin_scores, "grad-dot", gold)
    assert cosine.column("cosine")[0].as_py() > 0.5
    trak = attrib.analyze.trak(recorded, mlp, (x, y), test_set, k=64, damping=1.0,
                               progress=False)  # the README's pairing, defaults as written
    assert attrib.evaluate.further_training_cosine(trak, "trak", gold).column(
        "cosine")[0].as_py() > 0
    with pytest.raises(ValueError, match="TRAK is defined for the margin only"):
        attrib.analyze.trak(recorded, mlp, (x, y), test_set, target="loss")


def test_the_readme_lds_snippet_gives_a_positive_lds_as_written(recorded, tmp_path):
    """The README's LDS snippet (TRAK with its defaults, lds with its defaults) on a run where
    TRAK is good (test points next to training points): a positive LDS, no sign to fix by
    hand. Loss-target TracIn against the margin models is refused (it came out as −LDS), and
    with target='margin' it scores positive too."""
    x, y = data()
    test_set = (x[200:210] + 0.1, y[200:210])
    scores = attrib.analyze.trak(recorded, mlp, (x, y), test_set, k=64, damping=1.0,
                                 progress=False)
    result = attrib.evaluate.lds(scores, "trak", tmp_path / "e", train_fn=train_on_subset,
                                 test_set=test_set, n_train=len(y), models=20, progress=False)
    assert result.mean > 0.4 and result.per_test.num_rows == 10
    loss_tracin = attrib.analyze.tracin(recorded, mlp, (x, y), test_set, progress=False)
    with pytest.raises(ValueError, match="computed for target='loss', the gold standard "
                                         "measures target='margin'"):
        attrib.evaluate.lds(loss_tracin, "tracin", tmp_path / "e")
    margin_tracin = attrib.analyze.tracin(recorded, mlp, (x, y), test_set, target="margin",
                                          progress=False)
    assert attrib.evaluate.lds(margin_tracin, "tracin", tmp_path / "e").mean > 0.4
