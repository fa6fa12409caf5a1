"""Per-example contributions c_{s,i} against torch.func per-sample gradients (float64).

The reference differentiates each example's share of the loss that was actually backpropagated
(its loss / batch size for a mean, / number of micro-batches when accumulating) at the θ_s the
run reconstructs: independent of the recorder's hooks and closed forms.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyTransformer, assert_rows_equal_autograd, tiny_gpt2
from torch import nn
from torch.func import functional_call, grad, vmap

import attrib
from attrib.analyzer.verify import verify
from attrib.recorder import per_example as pe

F64 = torch.float64


class CNN2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, bias=False)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


class CNN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv1d(2, 4, 3, padding=2, dilation=2)
        self.head = nn.Linear(4 * 8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Scaled(nn.Module):
    """A module with a raw parameter: only the generic (torch.func) path can handle it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.scale = nn.Parameter(torch.rand(10) + 0.5)
        self.body = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x * self.scale)


class TinyGPT(nn.Module):
    """nanoGPT's pattern: the output head tied to the token embedding, a positional embedding
    looked up with one shared arange(T), Linear q/k/v with scaled_dot_product_attention."""

    def __init__(self, vocab: int = 12, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(8, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        h = self.ln(x)
        q, k, v = (layer(h).unsqueeze(1) for layer in (self.q, self.k, self.v))
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return self.head(x).mean(1)


class Gate(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.w


class SharedInputs(nn.Module):
    """Modules on an input the whole batch shares (a batch dimension of 1): a Linear and a
    LayerNorm on fixed positional features, a raw-parameter module (the generic path) and a
    MultiheadAttention (a tuple output), added to per-example token embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.register_buffer("features", torch.randn(1, 6, 5))
        self.wte, self.pos, self.pos_ln = nn.Embedding(12, 8), nn.Linear(5, 8), nn.LayerNorm(8)
        self.gate, self.head = Gate(8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, idx):
        shared = self.gate(self.pos_ln(self.pos(self.features)))  # (1, T, 8)
        shared = self.attn(shared, shared, shared)[0]
        return self.head(torch.tanh(self.wte(idx) + shared)).mean(1)


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def tokens_data(n=96):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 12, (n, 6), generator=g)
    return x, x[:, 0] % 3


CASES = {
    "mlp": (mlp, lambda: (torch.randn(96, 10, generator=torch.Generator().manual_seed(0)),
                          torch.randint(0, 3, (96,)))),
    "cnn2d": (CNN2d, lambda: (torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                              torch.randint(0, 3, (96,)))),
    "cnn1d": (CNN1d, lambda: (torch.randn(96, 2, 8, generator=torch.Generator().manual_seed(0)),
                              torch.randint(0, 3, (96,)))),
    "transformer": (TinyTransformer, tokens_data),
    "gpt_tied_positional": (TinyGPT, tokens_data),
    "generic": (Scaled, lambda: (torch.randn(96, 10, generator=torch.Generator().manual_seed(0)),
                                 torch.randint(0, 3, (96,)))),
}


def record(run_dir, make, data, reduction="mean", micro=1, clip=None, steps=3, batch=8,
           capture=None, dtype=F64, **options):
    model = make().to(dtype)
    x, y = data()
    x = x.to(dtype) if x.is_floating_point() else x
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    capture = capture or attrib.Full(dtype="float64" if dtype == F64 else "float32")
    with attrib.Recorder(run_dir, model, opt, capture=capture, strict=True, **options) as rec:
        for step in range(steps):
            for _ in range(micro):
                size = batch[step] if isinstance(batch, list) else batch
                ids = torch.randperm(len(x), generator=g)[:size]
                rec.examples(ids)
                loss = F.cross_entropy(model(x[ids]), y[ids], reduction=reduction)
                (loss / micro).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return attrib.open_run(run_dir), x, y


def reference(run, make, x, y, step, reduction, micro, dtype=F64):
    """torch.func per-sample gradients of each example's share of the backpropagated loss."""
    model = make().to(dtype)
    theta = {k: v.to(dtype) for k, v in run.reconstruct(step).items()}
    examples = run.table_where("examples", step).sort_by("row").to_pylist()
    ids = torch.tensor([e["example_id"] for e in examples])
    sizes = torch.tensor([sum(e2["micro_batch"] == e["micro_batch"] for e2 in examples)
                          for e in examples], dtype=dtype)

    def share(params, xi, yi, size):
        loss = F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])
        return loss / micro / (size if reduction == "mean" else 1)

    return ids, vmap(grad(share), in_dims=(None, 0, 0, 0))(theta, x[ids], y[ids], sizes)


def assert_contributions_match(run, make, x, y, reduction="mean", micro=1, rel=1e-5):
    for step in range(run.n_steps):
        ids, got = run.contributions(step)
        ref_ids, expected = reference(run, make, x, y, step, reduction, micro)
        assert torch.equal(ids, ref_ids)
        assert set(got) == set(expected)
        # a tensor whose gradient is zero in exact arithmetic (attention's key bias: softmax
        # ignores a shift shared by all keys) holds only rounding noise, which two correct
        # computations round differently: it is compared at float64's rounding of the step's
        # largest contribution (2^-40 leaves room for the sums behind each entry)
        largest = max(float(v.abs().max()) for v in expected.values())
        for name, value in expected.items():
            atol = max(rel * float(value.abs().max()), 2.0 ** -40 * largest)
            torch.testing.assert_close(got[name].to(value.dtype), value, rtol=0,
                                       atol=atol, msg=f"{name} at step {step}")
    assert float(torch.tensor(run.residual_norms()).nan_to_num(0).max()) <= rel


@pytest.mark.parametrize("case", sorted(CASES))
def test_contributions_equal_per_sample_grads(run_dir, case):
    make, data = CASES[case]
    run, x, y = record(run_dir, make, data)
    assert_contributions_match(run, make, x, y)


@pytest.mark.parametrize("case", ["mlp", "transformer"])
def test_sum_reduction_accumulation_and_clipping(run_dir, case):
    make, data = CASES[case]
    run, x, y = record(run_dir, make, data, reduction="sum", micro=3, clip=0.1)
    assert (run.clip_factors() < 1).all(), "the test must exercise clipping"
    assert_contributions_match(run, make, x, y, reduction="sum", micro=3)
    ids, rows = run.contributions(0)
    assert len(ids) == 24 and next(iter(rows.values())).shape[0] == 24


@pytest.mark.parametrize("case,capture", [("mlp", attrib.Full(dtype="float64")),
                                          ("mlp", attrib.Factored(dtype="float64")),
                                          ("transformer", attrib.Factored(dtype="float64"))])
def test_batches_larger_than_the_first_are_recorded(run_dir, case, capture):
    """A short first batch, then larger and shorter ones (drop_last=False, a resumed loader):
    every step is kept, each row equals its example's gradient, and the run verifies. Blocks
    of 2 steps make the widening land mid-chunk."""
    make, data = CASES[case]
    sizes = [3, 8, 5, 8, 2, 9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "recording stopped" warning
        run, x, y = record(run_dir, make, data, steps=len(sizes), batch=sizes, capture=capture,
                           steps_per_chunk=2)
    assert run.n_steps == len(sizes) and run.meta["examples_per_step"] == 9
    assert [len(run.contributions(s)[0]) for s in range(len(sizes))] == sizes
    assert_contributions_match(run, make, x, y)
    checks = verify(run_dir).to_pylist()
    assert all(c["ok"] for c in checks), checks
    # the arrays keep the first step's 3 rows per chunk: steps with 9 examples fill three
    # chunks along the example axis, each of which must exist (a deleted one is damage)
    store = run_dir / "store.zarr"
    next(f for f in sorted(store.glob("*/*/c.*.1*")) if f.is_file()).unlink()
    assert not {c["check"]: c["ok"] for c in verify(run_dir).to_pylist()}["chunks"]


def test_float32_model_within_tolerance(run_dir):
    make, data = CASES["cnn2d"]
    run, x, y = record(run_dir, make, data, micro=3, clip=0.5, dtype=torch.float32)
    assert_contributions_match(run, make, x.double(), y, micro=3, rel=1e-5)


def test_contributions_sum_to_the_consumed_gradient(run_dir):
    """Σ_i α c_i equals what the optimizer consumed (the recorded G̃), per tensor."""
    make, data = CASES["transformer"]
    run, _, _ = record(run_dir, make, data, micro=2, clip=0.2)
    alpha = run.clip_factors()
    for step in range(run.n_steps):
        _, rows = run.contributions(step)
        for name, c in rows.items():
            consumed = run.grads(name, step, step + 1)[0]
            torch.testing.assert_close(alpha[step] * c.sum(0), consumed, rtol=1e-8, atol=1e-12)


def test_batchnorm_is_refused_or_residual(run_dir, tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    model = make()
    with pytest.raises(attrib.recorder.capture.UnsupportedModuleError, match="BatchNorm1d"):
        attrib.Recorder(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1),
                        capture=attrib.Full(), strict=True)
    x, y = CASES["mlp"][1]()
    with pytest.warns(UserWarning, match="batch statistics"):
        rec = attrib.Recorder(tmp_path / "lenient", model,
                              torch.optim.SGD(model.parameters(), lr=0.1), capture=attrib.Full())
    with rec, pytest.warns(UserWarning, match=r"\['0.weight', '0.bias'\] run before "
                                              r"BatchNorm '1' in training mode") as caught:
        for _ in range(2):  # said once
            rec.examples(torch.arange(8))
            F.cross_entropy(model(x[:8]), y[:8]).backward()
            rec.optimizer.step()
            rec.optimizer.zero_grad()
        model.eval()  # an evaluation forward is not a training micro-batch
        model(x[:8])
    assert sum("run before BatchNorm" in str(w.message) for w in caught) == 1
    run = attrib.open_run(tmp_path / "lenient")
    assert run.meta["residual_params"] == ["1.weight", "1.bias"]
    norms = run.residual_norms()[0]  # BatchNorm's whole gradient is residual: norm 1
    assert norms[0] < 1e-5 and norms[2] == norms[3] == 1.0 and norms[4] < 1e-5


def test_rows_coupled_by_batch_statistics_are_refused_in_strict_mode(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3))
    x, _ = CASES["mlp"][1]()
    rec = attrib.Recorder(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1),
                          capture=attrib.Full(), strict=True)
    with rec, pytest.raises(TypeError, match=r"\['0.weight', '0.bias'\] run before BatchNorm"):
        rec.examples(torch.arange(8))
        model(x[:8])


def test_per_example_losses_go_to_the_examples_table(run_dir):
    make, data = CASES["mlp"]
    model = make()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attrib.Recorder(run_dir, model, opt) as rec:
        for step in range(3):
            for micro in range(2):
                ids = torch.arange(step * 16 + micro * 8, step * 16 + micro * 8 + 8)
                rec.examples(ids)
                losses = F.cross_entropy(model(x[ids]), y[ids], reduction="none")
                if micro == 0:
                    rec.log_examples(loss=losses, f=-losses)
                losses.mean().backward()
            with pytest.raises(ValueError, match="has 3 values for a micro-batch of 8"):
                rec.log_examples(loss=torch.ones(3))
            opt.step()
            opt.zero_grad()
    table = attrib.sql(run_dir, "SELECT micro_batch, count(loss) AS with_loss, "
                                "max(abs(loss + f)) AS gap, min(loss) > 0 AS positive "
                                "FROM examples GROUP BY 1 ORDER BY 1").to_pylist()
    assert table == [{"micro_batch": 0, "with_loss": 24, "gap": 0.0, "positive": True},
                     {"micro_batch": 1, "with_loss": 0, "gap": None, "positive": None}]


def test_amp_loss_scaling_is_absorbed_by_the_clip_factor(run_dir):
    """GradScaler scales the loss (so the contributions) and unscales .grad before the step:
    α = clip coefficient / scale, and α c_i is each example's share of what was consumed."""
    make, data = CASES["mlp"]
    model = make()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    clip_coefficients = []
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full(), strict=True) as rec:
        for step in range(3):
            ids = torch.arange(step * 8, step * 8 + 8)
            rec.examples(ids)
            scaler.scale(F.cross_entropy(model(x[ids]), y[ids])).backward()
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
            clip_coefficients.append(min(1.0, 0.2 / (float(norm) + 1e-6)))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    run = attrib.open_run(run_dir)
    assert float(torch.tensor(run.residual_norms()).max()) < 1e-5
    for step in range(3):
        assert run.clip_factors()[step] == pytest.approx(clip_coefficients[step] / 1024.0,
                                                         rel=1e-5)
        _, rows = run.contributions(step)
        _, expected = reference(run, make, x.double(), y, step, "mean", 1)
        for name, c in rows.items():
            share = run.clip_factors()[step] * c.double()
            torch.testing.assert_close(share, clip_coefficients[step] * expected[name],
                                       rtol=0, atol=1e-5 * float(expected[name].abs().max()))


class Unbatchable(nn.Module):
    """A raw parameter behind data-dependent control flow: torch.func can't vmap it."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(x) * self.gain if bool(x.abs().sum() > 0) else self.head(x)


def test_a_failing_per_example_path_raises_in_strict_mode(run_dir):
    model = Unbatchable()
    x, y = CASES["mlp"][1]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full(), strict=True) as rec:
        rec.examples(torch.arange(8))
        with pytest.raises(attrib.recorder.capture.UnsupportedModuleError,
                           match="per-example gradients of the model"):
            F.cross_entropy(model(x[:8]), y[:8]).backward()


def test_a_failing_per_example_path_never_breaks_training(run_dir):
    model = Unbatchable()
    x, y = CASES["mlp"][1]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (pytest.warns(UserWarning, match="recorded as residual"),
          attrib.Recorder(run_dir, model, opt, capture=attrib.Full()) as rec):
        for _ in range(3):
            rec.examples(torch.arange(8))
            F.cross_entropy(model(x[:8]), y[:8]).backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(run_dir)
    assert run.status == "complete" and run.n_steps == 3
    norms = run.residual_norms()
    assert (norms[:, 0] == 1.0).all() and (norms[:, 1:] < 1e-5).all()  # gain: residual


def test_a_frozen_layer_inside_the_optimizer_is_recorded_as_constant(run_dir):
    """SGD(model.parameters()) with a frozen first layer trains fine in PyTorch; the recorder
    records it as constant (never active, no rows) and the rest exactly."""
    def frozen():
        model = mlp()
        model[0].weight.requires_grad_(False)
        return model

    run, x, y = record(run_dir, frozen, CASES["mlp"][1])
    assert run.active()[:, 0].tolist() == [False] * run.n_steps
    assert "0.weight" not in run.capture
    first = run.reconstruct(0)["0.weight"]
    assert torch.equal(run.reconstruct(run.n_steps)["0.weight"], first)
    for step in range(run.n_steps):
        _, got = run.contributions(step)
        _, expected = reference(run, frozen, x, y, step, "mean", 1)
        assert set(got) == {"0.bias", "2.weight", "2.bias"}
        for name, value in got.items():
            torch.testing.assert_close(value, expected[name], rtol=0,
                                       atol=1e-10 * float(expected[name].abs().max()))


@pytest.mark.parametrize("capture", [attrib.Full(dtype="float64"),
                                     attrib.Factored(dtype="float64")])
def test_hugging_face_gpt2_rows_equal_each_examples_gradient(run_dir, capture):
    """A real third-party LM: Hugging Face's GPT2LMHeadModel (Conv1D layers, closed form and
    factored; lm_head tied to wte, wpe looked up with position_ids of batch size 1).
    Reference: each example's share of the batch's mean token loss, differentiated by plain
    autograd, one example at a time."""
    model = tiny_gpt2(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 40, (32, 8), generator=torch.Generator().manual_seed(1))
    with attrib.Recorder(run_dir, model, opt, capture=capture, strict=True) as rec:
        rules = {g.path: g.rule for g in rec._capture.groups}
        for step in range(2):
            ids = torch.arange(4 * step, 4 * step + 4)
            rec.examples(ids)
            model(x[ids], labels=x[ids]).loss.backward()
            opt.step()
            opt.zero_grad()
    run = attrib.open_run(run_dir)
    assert rules["transformer.h.0.attn.c_attn"].__name__ == "hf_conv1d_rule"  # not vmap
    if isinstance(capture, attrib.Factored):
        assert "factored" in run.capture["transformer.h.0.mlp.c_fc.weight"]
    assert float(run.residual_norms().max()) < 1e-10

    def share(reference, ids, row):
        batch = x[ids]
        logits = reference(batch).logits[row, :-1]
        return F.cross_entropy(logits, batch[row, 1:], reduction="sum") / (
            batch.shape[0] * (batch.shape[1] - 1))

    # 1e-6: HF's loss casts the logits to float32 (~5e-8 relative here)
    assert_rows_equal_autograd(run, lambda: tiny_gpt2(F64), share, rel=1e-6)


def test_positions_as_long_as_the_batch_are_said_and_the_fix_is_exact(tmp_path):
    """With context length = batch size, wpe(arange(T)) can't be told from one index per
    example: it is said; the fix it names (arange(T)[None]) records exact rows."""
    class Ambiguous(TinyGPT):
        def __init__(self, batched: bool) -> None:
            super().__init__()
            self.batched = batched

        def forward(self, idx):
            positions = torch.arange(idx.shape[1])
            x = self.wte(idx) + self.wpe(positions[None] if self.batched else positions)
            return self.head(self.ln(x)).mean(1)

    tokens = torch.randint(0, 12, (96, 8), generator=torch.Generator().manual_seed(5))
    data = lambda: (tokens, tokens[:, 0] % 3)  # noqa: E731
    with pytest.warns(UserWarning, match=r"Embedding 'wpe' was looked up with arange\(8\) and "
                                         r"the micro-batch has 8 examples"):
        record(tmp_path / "ambiguous", lambda: Ambiguous(False), data)
    run, x, y = record(tmp_path / "fixed", lambda: Ambiguous(True), data)
    assert_contributions_match(run, lambda: Ambiguous(True), x, y)


def test_a_forward_on_one_example_is_not_widened_into_the_batch(tmp_path):
    """An auxiliary term on x[:1] inside the step: its lookups are token ids, not positions
    the batch shares, so the recorder must not widen them (that changed the loss): training
    is bit-identical to an unrecorded run, the step's rows are said to be missing."""
    tokens = torch.randint(0, 12, (8, 6), generator=torch.Generator().manual_seed(2))

    def train(path):
        model = TinyGPT().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = attrib.Recorder(path, model, opt, capture=attrib.Full()) if path else None
        if rec is not None:
            rec.examples(torch.arange(8))
        loss = model(tokens).logsumexp(1).mean() + 0.1 * model(tokens[:1]).square().sum()
        loss.backward()
        opt.step()
        if rec is not None:
            rec.close()
        return loss.item(), [p.detach().clone() for p in model.parameters()]

    with pytest.warns(UserWarning, match=r"ran on a batch of 1, but rec.examples\(\) declared 8"):
        recorded = train(tmp_path / "run")
    plain = train(None)
    assert recorded[0] == plain[0]
    assert all(torch.equal(a, b) for a, b in zip(recorded[1], plain[1]))


class EchoLM(nn.Module):
    """Tied LM whose final LayerNorm bias has a gradient of exactly zero for every example:
    with targets a rotation of each row's own tokens, b shifts the logits of the inputs and of
    the targets alike. In float32 that gradient is the rounding of 1,024 cancelling terms."""

    def __init__(self, vocab: int = 256, d: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.ln = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens):
        return self.head(self.ln(self.wte(tokens))).flatten(0, 1)


def test_a_gradient_zero_in_exact_arithmetic_is_not_read_as_a_missed_use(run_dir):
    model = EchoLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tokens = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))
    with attrib.Recorder(run_dir, model, opt, capture=attrib.Full(), strict=True) as rec:
        rec.examples(torch.arange(16))
        F.cross_entropy(model(tokens), tokens.roll(-1, 1).flatten()).backward()
        bias_norm = model.ln.bias.grad.norm().item()
        total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        opt.step()
        opt.zero_grad()
    assert 0 < bias_norm < 1e-6 * total  # rounding only: the case the floor exists for
    residual = attrib.open_run(run_dir).residual_norms()
    assert residual.max() < 1e-3, residual


def test_modules_declared_shared_are_captured_per_example(tmp_path):
    """Recorder(shared=[...]): modules whose input the batch shares get exact rows (their
    output widened); undeclared, the same model is refused in strict mode, as before; a
    pattern that names no captured module is refused."""
    declared = ("pos", "pos_ln", "gate", "att*")
    run, x, y = record(tmp_path / "declared", SharedInputs, tokens_data, shared=declared)
    assert_contributions_match(run, SharedInputs, x, y)
    with pytest.raises(attrib.RecordingError, match=r"ran on a batch of 1, but rec.examples"):
        record(tmp_path / "undeclared", SharedInputs, tokens_data)
    with pytest.raises(ValueError, match=r"\['nope'\] match no module whose parameters"):
        record(tmp_path / "unknown", SharedInputs, tokens_data, shared=("nope",))


class MaskedAttention(nn.Module):
    """Time-first MultiheadAttention with a causal mask and a key padding mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.embed, self.head = nn.Embedding(12, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, idx):
        x = self.embed(idx).transpose(0, 1)  # (T, B, d)
        t = idx.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        padding = (idx == 0) & (torch.arange(t) == t - 1)  # never a query's only key
        out, _ = self.attn(x, x, x, key_padding_mask=padding, attn_mask=causal)
        return self.head(out.mean(0))


@pytest.mark.parametrize("make", [TinyTransformer, MaskedAttention])
def test_attention_has_a_closed_form_equal_to_per_sample_gradients(tmp_path, make):
    """nn.MultiheadAttention (batch-first or not, masks) through mha_rule, not vmap; Factored
    stores its projections as factors."""
    run, x, y = record(tmp_path / "full", make, tokens_data)
    assert_contributions_match(run, make, x, y, rel=1e-10)
    model = make()
    attention = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    with attrib.Recorder(tmp_path / "probe", model, torch.optim.SGD(model.parameters(), lr=0.1),
                         capture=attrib.Factored()) as rec:
        assert next(g.rule for g in rec._capture.groups if g.module is attention) \
            is pe.mha_rule
    factored, x, y = record(tmp_path / "factored", make, tokens_data,
                            capture=attrib.Factored(dtype="float64"))
    assert_contributions_match(factored, make, x, y, rel=1e-10)


def test_relative_gaps_match_a_float64_loop():
    """The batched residual check (one concatenation for all tensors) against the plain
    per-tensor float64 formula: mixed dtypes, a missing sum (gap 1), a gradient below the
    floor (measured against the floor)."""
    from attrib.recorder.residuals import relative_gaps
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).double(),
             torch.randn(4, generator=g).to(torch.bfloat16), torch.full((3,), 1e-12)]
    sums = [grads[0] * 0.5 + 1e-3 * torch.randn(5, 3, generator=g), grads[1] / 2, None,
            torch.zeros(3)]
    alpha, floor = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1e-6, dtype=torch.float64)
    expected = []
    for grad_, total in zip(grads, sums):
        before = grad_.double() / alpha
        gap = before - (0 if total is None else total.double())
        expected.append(float(gap.norm() / max(before.norm(), floor)))
    got = relative_gaps(grads, sums, alpha, floor)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12,
                               atol=0)
    assert got[2] == 1.0 and got[1] == 0.0 and 0 < got[3] < 1e-5


def test_half_precision_rows_record_in_float16_and_bfloat16_is_refused_up_front(tmp_path):
    """Full/Factored(dtype="float16") store 2-byte rows that read back as the float32 rows
    rounded to float16; dtype="bfloat16" is refused when the policy is made (it used to pass
    and then stop recording at the first step: Zarr has no bfloat16)."""
    for policy in (attrib.Full, attrib.Factored):
        with pytest.raises(ValueError, match="dtype='float16'"):
            policy(dtype="bfloat16")
    rows = {}
    for dtype in ("float32", "float16"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        with attrib.Recorder(tmp_path / dtype, model, opt, capture=attrib.Full(dtype=dtype),
                             strict=True) as rec:
            for _ in range(2):
                rec.examples(torch.arange(8))
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        rows[dtype] = attrib.open_run(tmp_path / dtype).contribution_rows("0.weight")
    assert rows["float16"].dtype == torch.float16
    torch.testing.assert_close(rows["float16"], rows["float32"].half(), rtol=0, atol=0)
