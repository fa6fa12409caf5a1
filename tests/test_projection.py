"""Random projections: the kron structure, the 1/√k error law, and recorder == analyzer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyTransformer, mlp, train
from test_per_example import CASES, record, reference

import attrib
from attrib.schemas import projection


def test_kron_equals_dense_projection_with_kronecker_matrix():
    shape = (6, 10)
    c = torch.randn(5, *shape, dtype=torch.float64)
    got = projection.project(c, shape, "kron", 12, seed=3, name="w")
    r_l, r_r = projection.kron_factors(3, "w", projection.fitted_split(12, *shape), *shape)
    explicit = c.reshape(5, -1) @ torch.kron(r_l.double(), r_r.double()).T
    torch.testing.assert_close(got, explicit, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["kron", "dense", "sjlt"])
def test_projected_sum_equals_the_sum_of_projected_rows(kind):
    """The check sketch of factored rows (project_sum) against the rows' own projections,
    summed, and against the projection of the densified sum: token factors, an Embedding's
    index rows, and dense rows, in float64."""
    from attrib.recorder import per_example as pe
    g = torch.Generator().manual_seed(0)
    shape = (12, 20)
    cases = [pe.Outer(torch.randn(5, 3, 12, generator=g, dtype=torch.float64),
                      torch.randn(5, 3, 20, generator=g, dtype=torch.float64), shape),
             pe.Outer(None, torch.randn(5, 3, 20, generator=g, dtype=torch.float64), shape,
                      ids=torch.randint(0, 12, (5, 3), generator=g), vocab=12),
             pe.Dense(torch.randn(5, *shape, generator=g, dtype=torch.float64))]
    for c in cases:
        got = pe.project_sum(c, shape, kind, 16, 3, "w")
        rows = pe.project(c, shape, kind, 16, 3, "w").sum(0)
        dense = projection.project(c.dense().sum(0)[None], shape, kind, 16, 3, "w")[0]
        assert got.shape == (16,)
        torch.testing.assert_close(got, rows, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)


def test_projection_is_reproducible_from_seed_and_name():
    c = torch.randn(4, 300)
    a = projection.project(c, (300,), "dense", 64, seed=7, name="layer.weight")
    projection.gaussian.cache_clear()
    b = projection.project(c, (300,), "dense", 64, seed=7, name="layer.weight")
    other = projection.project(c, (300,), "dense", 64, seed=8, name="layer.weight")
    assert torch.equal(a, b) and not torch.allclose(a, other)


@pytest.mark.parametrize("kind", ["dense", "kron", "sjlt"])
def test_inner_product_error_shrinks_like_one_over_sqrt_k(kind):
    """Mean |⟨Rc, Rc'⟩ − c·c'| / (|c||c'|) over fixed random pairs, at k and 16k: ≈ 4× apart."""
    g = torch.Generator().manual_seed(0)
    shape = (64, 64)
    c = torch.randn(40, *shape, generator=g, dtype=torch.float64)
    exact = c.reshape(40, -1) @ c.reshape(40, -1).T
    norms = exact.diagonal().sqrt()
    pairs = torch.triu_indices(40, 40, 1)

    def error(k: int) -> float:
        errors = []
        for seed in range(4):
            p = projection.project(c, shape, kind, k, seed=seed, name="w")
            approx = p @ p.T
            rel = (approx - exact).abs() / (norms[:, None] * norms[None, :])
            errors.append(rel[pairs[0], pairs[1]].mean())
        return float(torch.stack(errors).mean())

    small, large = error(64), error(1024)
    assert small < 0.2  # ≈ √(2/π)/√64 for Gaussian R
    assert 2.8 < small / large < 5.7, (small, large)  # √16 = 4


@pytest.mark.parametrize("kind", ["kron", "dense", "sjlt"])
def test_recorded_projection_equals_analysis_side_projection(run_dir, kind):
    """The recorder's factored path stores exactly what attrib.project gives the analyzer."""
    make, data = CASES["transformer"]
    policy = attrib.Project(64, seed=11, kind=kind)
    run, x, y = record(run_dir, make, data, capture=policy, micro=2)
    shapes = dict(zip(run.param_names, map(tuple, run.params.column("shape").to_pylist())))
    for step in (0, 2):
        ids, got = run.contributions(step)
        ref_ids, full = reference(run, make, x, y, step, "mean", 2)
        assert torch.equal(ids, ref_ids)
        for name, value in full.items():
            if "project" in run.capture[name]:
                expected = attrib.project(value, shapes[name], kind, 64, 11, name)
                torch.testing.assert_close(got[name].double(), expected, rtol=0,
                                           atol=1e-5 * float(expected.abs().max()))
            else:  # at most 64 scalars: stored exactly
                assert math.prod(shapes[name]) <= 64 and "full" in run.capture[name]
                torch.testing.assert_close(got[name].double(), value, rtol=0, atol=1e-6)


def test_projection_policy_sizes(run_dir):
    model = TinyTransformer()
    rec = attrib.Recorder(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1),
                          capture=[attrib.Project(256, params=("encoder.*",))])
    rec.close()
    capture = attrib.open_run(run_dir).capture
    assert "embed.weight" not in capture and "head.weight" not in capture
    assert capture["encoder.linear1.weight"] == {  # split fitted to the 32 × 16 weight
        "project": {"k": 256, "seed": 0, "kind": "kron", "split": [16, 16]}}
    assert capture["encoder.norm1.weight"] == {"full": {"dtype": "float32"}}  # 16 ≤ 256


def test_dense_projection_over_budget_names_the_fix(run_dir):
    model = torch.nn.Linear(784, 2048)
    with pytest.raises(ValueError, match=r"over the 1 GiB limit; use Project\(kind='kron'\)"):
        attrib.Recorder(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1),
                        capture=attrib.Project(1024, kind="dense"))


class _WeightAlsoUsedOutside(torch.nn.Module):
    """A Linear whose weight is read again outside the Linear: that use is not captured."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.hidden = torch.nn.Linear(10, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.head(h) + h[:, :3] * self.head.weight[:, 0]


@pytest.mark.parametrize("kind", ["dense", "kron"])
def test_projected_capture_checks_its_rows_against_the_projected_gradient(tmp_path, kind):
    """With only projected rows kept, Σ_i R c_i is checked against R G: ~0 where capture is
    exact, and close to the exact residual (a Full run of the same training) where a use of
    the weight is missed."""
    model = mlp()
    train(tmp_path / "exact", model, torch.optim.SGD(model.parameters(), lr=0.1), steps=4,
          capture=attrib.Project(256, kind=kind))
    assert float(torch.tensor(attrib.open_run(tmp_path / "exact").residual_norms()).max()) < 1e-5
    norms = {}
    for policy in (attrib.Full(), attrib.Project(1024, kind=kind)):
        model = _WeightAlsoUsedOutside()
        path = tmp_path / type(policy).__name__
        with pytest.warns(UserWarning, match=r"rows of \['head.weight'\] explain only part"):
            train(path, model, torch.optim.SGD(model.parameters(), lr=0.1), steps=4,
                  capture=policy)
        norms[type(policy).__name__] = attrib.open_run(path).residual_norms()[:, 2]  # head.w
    assert (norms["Full"] > 0.05).all()
    assert (abs(norms["Project"] / norms["Full"] - 1) < 0.3).all(), norms


def test_the_kron_split_fits_the_shape_so_the_projection_has_rank_k():
    """512 on a 32 × 20 matrix: the old balanced split (16, 32) has more right rows than the
    matrix has columns (rank 320); the fitted one (32, 16) gives rank 512. A k no split fits
    is projected densely; runs recorded before splits were stored keep their old split."""
    assert projection.kron_split(512) == (16, 32)
    assert projection.fitted_split(512, 32, 20) == (32, 16)
    r_l, r_r = projection.kron_factors(0, "w", projection.fitted_split(512, 32, 20), 32, 20)
    assert torch.linalg.matrix_rank(torch.kron(r_l.double(), r_r.double())) == 512
    assert projection.fitted_split(7, 3, 2) is None  # 7 = 1 · 7 or 7 · 1: neither fits
    c = torch.randn(2, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(projection.project(c, (3, 2), "kron", 7, 0, "w"),
                               projection.project(c, (3, 2), "dense", 7, 0, "w"))
    old = {"k": 512, "seed": 0, "kind": "kron"}  # no "split": recorded before it was stored
    assert projection.recorded_split(old, (32, 20)) == (16, 32)
    assert projection.recorded_split({**old, "split": [32, 16]}, (32, 20)) == (32, 16)
    assert projection.recorded_split({**old, "split": None}, (32, 20)) is None
    assert projection.recorded_split(old, (20,)) is None  # a bias: dense



def test_sjlt_is_a_count_sketch_with_one_signed_entry_per_column():
    """R of kind sjlt, formed column by column from its definition: each coordinate lands in
    one output row with sign ±1, so the projection is the sketch matrix times the vector."""
    g = torch.Generator().manual_seed(5)
    c = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    rows, signs = projection.sjlt_hash(2, "w", 16, 35)
    matrix = torch.zeros(16, 35, dtype=torch.float64)
    matrix[rows, torch.arange(35)] = signs.double()
    assert (matrix != 0).sum(0).eq(1).all() and set(signs.tolist()) == {-1, 1}
    torch.testing.assert_close(projection.project(c, (7, 5), "sjlt", 16, 2, "w"),
                               c.reshape(3, -1) @ matrix.T, rtol=0, atol=1e-12)
