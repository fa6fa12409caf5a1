"""Factored capture: weights' per-example rows stored as their factors, exact and small.

References: torch.func per-sample gradients in float64, and the same training recorded with
Full capture.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_per_example import TinyGPT, assert_contributions_match, record, tokens_data
from torch import nn
from torch.func import functional_call, grad, vmap

import attrib
from attrib.analyzer.linear_response import linear_response
from attrib.analyzer.projected import projected_influence
from attrib.analyzer.verify import verify
from attrib.schemas import format as fmt
from attrib.schemas.projection import project

F64 = torch.float64


def mnist_mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).to(dtype)


def test_mlp_rows_equal_per_sample_gradients_in_far_fewer_bytes(run_dir):
    """The issue's MLP 784-256-256-10 at batch 128 with AdamW: every tensor's rows equal
    float64 torch.func per-sample gradients; the weights are stored as factors, ≥ 50× fewer
    bytes per example than Full's rows."""
    model = mnist_mlp(F64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 784, generator=g, dtype=F64), torch.randint(0, 10, (256,), generator=g)
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Factored(), strict=True) as rec:
        for step in range(2):
            ids = torch.arange(step * 128, (step + 1) * 128)
            rec.examples(ids)
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(run_dir)
    assert {n for n, c in run.capture.items() if "factored" in c} == {
        "0.weight", "2.weight", "4.weight"}
    reference = mnist_mlp(F64)

    def loss(params, xi, yi):  # each example's share of the batch-mean loss
        return F.cross_entropy(functional_call(reference, params, (xi[None],)), yi[None]) / 128

    for step in range(2):
        ids, rows = run.contributions(step)
        expected = vmap(grad(loss), in_dims=(None, 0, 0))(run.reconstruct(step), x[ids], y[ids])
        for name, value in expected.items():
            torch.testing.assert_close(rows[name], value, rtol=0,
                                       atol=1e-10 * float(value.abs().max()), msg=name)
    assert np.nanmax(run.residual_norms()) < 1e-10
    stored = sum(math.prod(run._array(f"{group}/{run._keys[n]}").shape[1:]) for n in run.captured
                 for group in (fmt.CONTRIB, fmt.FACTOR_LEFT, fmt.FACTOR_RIGHT)
                 if f"{group}/{run._keys[n]}" in run.group)
    full = 128 * sum(p.numel() for p in model.parameters())
    assert full / stored >= 50, full / stored


@pytest.mark.parametrize("micro", [1, 2])
def test_sequence_models_factor_every_token_and_use(tmp_path, micro):
    """A tied LM with q/k/v Linears over 6 tokens (and micro-batches): factored weights equal
    float64 per-sample gradients; the tied head (an Embedding's too) is stored in full."""
    run, x, y = record(tmp_path / "run", TinyGPT, tokens_data, micro=micro,
                       capture=attrib.Factored(dtype="float64"))
    assert "factored" in run.capture["q.weight"] and "full" in run.capture["wte.weight"]
    assert run.capture["q.weight"]["factored"]["tokens"] == 6
    assert_contributions_match(run, TinyGPT, x, y, micro=micro, rel=1e-10)


class Twice(nn.Module):
    """One Linear called twice per forward: its factors hold both calls' tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.inner, self.head = nn.Linear(10, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_a_layer_called_twice_keeps_both_calls(tmp_path):
    data = lambda: (torch.randn(96, 10, generator=torch.Generator().manual_seed(0)),  # noqa: E731
                    torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(1)))
    run, x, y = record(tmp_path / "run", Twice, data, capture=attrib.Factored(dtype="float64"))
    assert run.capture["inner.weight"]["factored"]["tokens"] == 2
    assert_contributions_match(run, Twice, x, y, rel=1e-10)


class Wide(nn.Module):
    """10 × 10 weights over 6 tokens: 6·20 factors > 100 entries."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed, self.mix = nn.Embedding(12, 10), nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx))).mean(1))


def test_weights_whose_factors_are_not_smaller_are_stored_in_full(tmp_path):
    """10 × 10 weights over 6 tokens: 6·20 factors > 100 entries, so Full rows are kept."""
    run, x, y = record(tmp_path / "run", Wide, tokens_data,
                       capture=attrib.Factored(dtype="float64"))
    assert run.capture["mix.weight"] == {"full": {"dtype": "float64"}}
    assert_contributions_match(run, Wide, x, y, rel=1e-10)


def test_a_fallback_projection_takes_what_factors_cannot(tmp_path):
    """Factored(fallback=Project(k)): a tensor without a smaller factored form and more than k
    scalars is projected, from the first step on (that step's factors projected too); the
    rows equal the projection of the exact ones."""
    runs = {}
    for name, capture in (("full", attrib.Full(dtype="float64")),
                          ("fallback", attrib.Factored(dtype="float64",
                                                       fallback=attrib.Project(16)))):
        runs[name], _, _ = record(tmp_path / name, Wide, tokens_data, capture=capture)
    capture = runs["fallback"].capture
    assert "project" in capture["mix.weight"] and "project" in capture["embed.weight"]
    assert "full" in capture["mix.bias"] and "factored" in capture["head.weight"]
    for step in range(runs["full"].n_steps):
        _, exact = runs["full"].contributions(step)
        _, got = runs["fallback"].contributions(step)
        for name in ("mix.weight", "embed.weight"):
            expected = project(exact[name], tuple(exact[name].shape[1:]), "kron", 16, 0, name)
            torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-7)
    assert np.nanmax(runs["fallback"].residual_norms()) < 1e-5


def test_a_step_with_more_tokens_than_the_first_is_said_and_stays_exact_in_total(tmp_path):
    """Token slots are fixed by the first step: a longer later step loses that tensor's rows
    (residual, said once; strict raises and names the fix), and Factored(tokens=...) fits it."""
    model_fn = lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))  # noqa: E731

    def train(path, capture, strict=False):
        torch.manual_seed(0)
        model = model_fn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        with attrib.Recorder(path, model, opt, capture=capture, strict=strict) as rec:
            for length in (3, 5, 3):
                rec.examples(torch.arange(4))
                x = torch.randn(4, length, 8, generator=g)
                model(x).mean(1).square().sum().backward()
                opt.step()
                opt.zero_grad()
        return attrib.open_run(path)

    with pytest.warns(UserWarning, match=r"'0.weight' needs 5 factor slots per example, and "
                                         r"the run keeps 3") as caught:
        run = train(tmp_path / "short", attrib.Factored())
    assert len(caught) == 1  # one message, not a second one about a missed use
    residual = run.residual_norms()
    names = run.param_names
    assert residual[1, names.index("0.weight")] == pytest.approx(1.0)
    assert np.nanmax(np.delete(residual, 1, axis=0)) < 1e-5
    with pytest.raises(attrib.RecordingError, match=r"pass Factored\(tokens=5\)"):
        train(tmp_path / "strict", attrib.Factored(), strict=True)
    fitted = train(tmp_path / "fitted", attrib.Factored(tokens=5), strict=True)
    assert np.nanmax(fitted.residual_norms()) < 1e-5
    assert fitted.factors("0.weight")[0].shape == (3, 4, 5, 16)


class TokenMLP(nn.Module):
    """Per-token Linear over 6 tokens, then a head on their mean: both weights factored."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed, self.mix, self.head = nn.Embedding(12, 16), nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx))).mean(1))


def test_analyses_read_factors_natively_and_equal_full(tmp_path):
    """The same training recorded with Factored and with Full: the path kernel, linear
    response and projected_influence (TracIn's sum), which read the factors without forming
    rows, agree with the Full run's to float64 rounding."""
    runs = {}
    for name, capture in (("factored", attrib.Factored(dtype="float64")),
                          ("full", attrib.Full(dtype="float64"))):
        runs[name], x, y = record(tmp_path / name, TokenMLP, tokens_data, capture=capture)
    assert "factored" in runs["factored"].capture["mix.weight"]
    test = (x[:4], y[:4])
    g = torch.Generator().manual_seed(3)
    vectors = {n: torch.randn(3, *shape, generator=g, dtype=F64)
               for n, shape in runs["full"].param_shapes.items()}

    def analyses(run):
        yield attrib.analyze.path_kernel(run, lambda: TokenMLP().double(), test,
                                         by=("example",)).to_arrow()
        yield linear_response(run, lambda: TokenMLP().double(), (x, y), test, by=("example",),
                              progress=False).influence
        yield projected_influence(run, vectors)

    for got, expected in zip(analyses(runs["factored"]), analyses(runs["full"])):
        keys = [c for c in ("test_id", "example_id", "term") if c in expected.column_names]
        got, expected = (t.sort_by([(k, "ascending") for k in keys]) for t in (got, expected))
        assert got.num_rows == expected.num_rows > 0
        a, b = (np.asarray(t.column("value")) for t in (got, expected))
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(b).max())


def test_a_factored_run_resumes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))

    def steps(rec, n):
        for _ in range(n):
            rec.examples(torch.arange(4))
            model(x).mean(1).square().sum().backward()
            opt.step()
            opt.zero_grad()

    with attrib.Recorder(tmp_path / "run", model, opt, capture=attrib.Factored(),
                         strict=True) as rec:
        steps(rec, 2)
    with attrib.Recorder(tmp_path / "run", model, opt, capture=attrib.Factored(), strict=True,
                         resume=True) as rec:
        steps(rec, 2)
    run = attrib.open_run(tmp_path / "run")
    assert run.n_steps == 4 and run.factors("0.weight")[0].shape == (4, 4, 3, 16)
    assert np.nanmax(run.residual_norms()) < 1e-5
    assert all(verify(tmp_path / "run").column("ok").to_pylist())


def test_a_use_the_hooks_miss_shows_in_the_factored_check(tmp_path):
    """Factored rows are checked on a sketch, not the exact sum: a plain-code use of a
    factored weight (outside its module) still leaves a residual that strict mode refuses."""
    class Leaky(TokenMLP):
        def forward(self, idx):
            h = self.embed(idx)
            leak = (h @ self.mix.weight.T).mean((1, 2))[:, None]
            return super().forward(idx) + leak * torch.tensor([1.0, 0.0, -1.0], dtype=h.dtype)

    with pytest.raises(attrib.RecordingError, match=r"the per-example rows of \['mix.weight'\] "
                                                    r"explain only part"):
        record(tmp_path / "run", Leaky, tokens_data, capture=attrib.Factored())


def test_rank_r_factors_are_the_best_rank_r_rows_and_totals_stay_exact(tmp_path):
    """Factored(rank=r): exact where a call has at most r tokens; with more, each example's
    row is its best rank-r approximation (within 1% of the SVD's error, float64; rank 1 of 6
    tokens, so the randomized range finder samples fewer directions than there are), and the path
    kernel stays complete: what the rows leave out is in its residual term."""
    runs = {}
    for name, capture in (("full", attrib.Full(dtype="float64")),
                          ("rank1", attrib.Factored(dtype="float64", rank=1)),
                          ("rank8", attrib.Factored(dtype="float64", rank=8))):
        runs[name], x, y = record(tmp_path / name, TokenMLP, tokens_data, capture=capture)
    assert runs["rank1"].capture["mix.weight"]["factored"] == {
        "dtype": "float64", "tokens": 1, "rank": 1}
    for step in range(runs["full"].n_steps):
        _, exact = runs["full"].contributions(step)
        _, rank8 = runs["rank8"].contributions(step)
        _, rank1 = runs["rank1"].contributions(step)
        torch.testing.assert_close(rank8["mix.weight"], exact["mix.weight"], rtol=0,
                                   atol=1e-12)  # 6 tokens ≤ 8: exact
        u, s, vh = torch.linalg.svd(exact["mix.weight"], full_matrices=False)
        best = (u[..., :1] * s[:, None, :1]) @ vh[:, :1]
        optimal = (exact["mix.weight"] - best).flatten(1).norm(dim=1)
        got = (exact["mix.weight"] - rank1["mix.weight"]).flatten(1).norm(dim=1)
        assert (got <= 1.01 * optimal + 1e-12).all(), (got, optimal)
        assert (optimal > 1e-3 * exact["mix.weight"].flatten(1).norm(dim=1)).any()  # not trivial
    test = (x[:4], y[:4])
    result = attrib.analyze.path_kernel(runs["rank1"], lambda: TokenMLP().double(), test,
                                        by=("example",))
    exact_result = attrib.analyze.path_kernel(runs["full"], lambda: TokenMLP().double(), test,
                                              by=("example",))
    gaps = np.asarray(result.completeness()["relative_gap"])
    np.testing.assert_allclose(gaps, np.asarray(exact_result.completeness()["relative_gap"]),
                               rtol=1e-6, atol=1e-12)


def test_the_first_step_keeps_exact_parts_until_the_storage_is_settled(tmp_path):
    """rank=2 on 4 × 4 weights over 8 tokens: factors are not smaller, so the weight is
    stored in full (or projected) from step 0, and step 0's rows are exact, not the rank-2
    cut the factors would have had (that cut failed the step's check in strict mode)."""
    def run(name, capture):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        with attrib.Recorder(tmp_path / name, model, opt, capture=capture, strict=True) as rec:
            for _ in range(2):
                rec.examples(torch.arange(5))
                model(torch.randn(5, 8, 4, generator=g, dtype=F64)).mean(1).square().sum() \
                    .backward()
                opt.step()
                opt.zero_grad()
        return attrib.open_run(tmp_path / name)

    full = run("full", attrib.Full(dtype="float64"))
    cut = run("cut", attrib.Factored(dtype="float64", rank=2))
    assert cut.capture["0.weight"] == {"full": {"dtype": "float64"}}
    for step in range(2):
        torch.testing.assert_close(cut.contributions(step)[1]["0.weight"],
                                   full.contributions(step)[1]["0.weight"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rank_r_runs_on_half_precision_models(tmp_path, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attrib.Recorder(tmp_path / "run", model, opt, capture=attrib.Factored(rank=2)) as rec:
        rec.examples(torch.arange(4))
        model(torch.randn(4, 6, 16).to(dtype)).float().mean(1).square().sum().backward()
        opt.step()
    run = attrib.open_run(tmp_path / "run")
    assert run.capture["0.weight"]["factored"]["tokens"] == 2
    assert run.factors("0.weight")[0].abs().sum() > 0  # stored, not dropped as failed


def test_topk_shifts_come_from_exact_rows_under_rank_r(tmp_path):
    """TopK beside Factored(rank=r) reads the exact contributions, not the rank-r cut."""
    tables = {}
    for name, factored in (("exact", attrib.Full()), ("rank", attrib.Factored(rank=1))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        with attrib.Recorder(tmp_path / name, model, opt,
                             capture=[factored, attrib.TopK(6, scope="tensor")]) as rec:
            for _ in range(2):
                rec.examples(torch.arange(4))
                model(torch.randn(4, 6, 16, generator=g)).mean(1).square().sum().backward()
                opt.step()
                opt.zero_grad()
        tables[name] = attrib.open_run(tmp_path / name).table("shifts").to_pylist()
    assert tables["exact"] == tables["rank"] and tables["exact"]


def test_resuming_with_other_token_slots_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attrib.Recorder(tmp_path / "run", model, opt, capture=attrib.Factored()) as rec:
        rec.examples(torch.arange(4))
        model(torch.randn(4, 3, 8)).mean(1).square().sum().backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(ValueError, match=r"'0.weight' keeps 3 factor slots per example in this "
                                         r"run .*resume with Factored\(tokens=3\)"):
        attrib.Recorder(tmp_path / "run", model, opt, capture=attrib.Factored(tokens=6),
                        resume=True)


def test_embeddings_and_tied_heads_are_factored_exactly(tmp_path):
    """An Embedding's lookups are factors too (one-hot rows ⊗ output gradients), so a token
    embedding tied to the output head (12 slots: 6 lookups, 6 head tokens) and an arange
    positional embedding are stored as factors, exact against float64 per-sample gradients."""
    def make():
        return TinyGPT(vocab=40, d=32)

    run, x, y = record(tmp_path / "run", make, tokens_data,
                       capture=attrib.Factored(dtype="float64"))
    assert run.capture["wte.weight"]["factored"]["tokens"] == 12
    assert run.capture["wpe.weight"]["factored"]["tokens"] == 6
    assert_contributions_match(run, make, x, y, rel=1e-10)
