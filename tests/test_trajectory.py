"""The recorded trajectory equals the live one, and holds what METHODS.md §1 needs."""

from __future__ import annotations

import pytest
import torch
from conftest import OPTIMIZERS, TinyTransformer, mlp, train

import attrib
from attrib.analyzer.dynamics import update_split_error
from attrib.analyzer.stream import iter_steps

FLOAT32_ROUNDOFF = 4 * torch.finfo(torch.float32).eps  # relative to the tensor's max |θ|


def assert_matches_live(run: attrib.Run, thetas: list[dict[str, torch.Tensor]], rel: float):
    assert run.n_steps == len(thetas) - 1
    for step, live in enumerate(thetas):
        rebuilt = run.reconstruct(step)
        for name, value in live.items():
            scale = float(value.abs().max())
            torch.testing.assert_close(rebuilt[name], value, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_reconstruct_equals_live_params(run_dir, name):
    model = mlp()
    trained = train(run_dir, model, OPTIMIZERS[name](model.parameters()))
    assert_matches_live(attrib.open_run(run_dir), trained.thetas, FLOAT32_ROUNDOFF)


def test_reconstruct_exact_in_float64(run_dir):
    model = mlp(torch.float64)
    trained = train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()),
                    inputs=torch.randn(256, 10, dtype=torch.float64),
                    labels=torch.randint(0, 3, (256,)))
    assert_matches_live(attrib.open_run(run_dir), trained.thetas,
                        4 * torch.finfo(torch.float64).eps)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_split_reproduces_every_step_float32(run_dir, name):
    """METHODS.md §1 from recorded G̃, hyperparameters and state, ≤ 1e-5 beyond round-off."""
    model = mlp()
    train(run_dir, model, OPTIMIZERS[name](model.parameters()))
    assert update_split_error(attrib.open_run(run_dir)) <= 1e-5


@pytest.mark.parametrize("name", ["sgd_dampening", "adam_l2", "adamw_amsgrad"])
def test_update_split_float64_is_exact(run_dir, name):
    model = mlp(torch.float64)
    train(run_dir, model, OPTIMIZERS[name](model.parameters()),
          inputs=torch.randn(256, 10, dtype=torch.float64), labels=torch.randint(0, 3, (256,)))
    assert update_split_error(attrib.open_run(run_dir)) <= 1e-10


def test_transformer_with_adamw_schedule_and_clipping(run_dir):
    model = TinyTransformer()
    tokens = torch.randint(0, 12, (256, 6), generator=torch.Generator().manual_seed(5))
    labels = tokens[:, 0] % 3
    trained = train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), inputs=tokens,
                    labels=labels, steps=23)
    run = attrib.open_run(run_dir)
    assert_matches_live(run, trained.thetas, FLOAT32_ROUNDOFF)
    assert update_split_error(run) <= 1e-5
    assert set(run.params.column("layer_type").to_pylist()) >= {"Embedding", "LayerNorm",
                                                                 "Linear", "MultiheadAttention"}


def test_clip_factor_and_grad_norm_match_torch(run_dir):
    model = mlp()
    trained = train(run_dir, model, OPTIMIZERS["sgd"](model.parameters()), clip=0.5)
    steps = attrib.open_run(run_dir).steps
    norms = torch.tensor(trained.pre_clip_norms, dtype=torch.float64)
    expected = torch.clamp(0.5 / (norms + 1e-6), max=1.0)  # clip_grad_norm_'s own rule
    torch.testing.assert_close(torch.tensor(steps["grad_norm"].to_pylist(), dtype=torch.float64),
                               norms, rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(torch.tensor(steps["clip_factor"].to_pylist(), dtype=torch.float64),
                               expected,
                               rtol=1e-5, atol=0)
    assert (expected < 1).any(), "the test must exercise clipping"
    assert all(steps["clip_uniform"].to_pylist())


def test_gradient_accumulation_records_the_summed_grad(run_dir):
    model = mlp()
    trained = train(run_dir, model, OPTIMIZERS["sgd"](model.parameters()), micro_batches=3,
                    clip=None, schedule=False, steps=9)
    run = attrib.open_run(run_dir)
    # plain SGD: Δθ = −lr · G̃ exactly what the optimizer consumed
    for step in range(run.n_steps):
        for name in run.param_names:
            delta = trained.thetas[step + 1][name] - trained.thetas[step][name]
            torch.testing.assert_close(-0.1 * run.grads(name, step, step + 1)[0], delta,
                                       rtol=1e-4, atol=1e-7)
    micro = run.examples.column("micro_batch").to_pylist()
    assert set(micro) == {0, 1, 2}
    assert run.steps.column("n_examples").to_pylist() == [96] * 9


def test_stream_yields_reconstructed_thetas(run_dir):
    model = mlp()
    train(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), steps=21)
    run = attrib.open_run(run_dir)
    seen = 0
    for view in iter_steps(run, 3, 19, fields=("grads", "state:exp_avg_sq")):
        expected = run.reconstruct(view.step)
        for name in run.param_names:
            assert torch.equal(view.theta[name], expected[name])
            assert torch.equal(view.values["grads"][name],
                               run.grads(name, view.step, view.step + 1)[0])
        seen += 1
    assert seen == 16


@pytest.mark.parametrize("name", ["sgd_nesterov", "adamw_amsgrad"])
@pytest.mark.parametrize("intervals_fit", [True, False])
def test_reading_backwards_replays_each_step_once_or_each_interval_once_and_exactly(
        run_dir, name, intervals_fit, monkeypatch):
    """Windows read from the last chunk to the first (as the path kernel walks a run) come
    from whole checkpoint intervals replayed once each; where those don't fit the window
    budget, from snapshots the first seek into each interval kept (not from the interval's
    checkpoint again). Either way θ and the state are bit for bit a fresh forward replay's."""
    from attrib.analyzer import trajectory

    if not intervals_fit:
        monkeypatch.setattr(trajectory, "WINDOW_BUDGET_BYTES", 0)
    model = mlp()
    trained = train(run_dir, model, OPTIMIZERS[name](model.parameters()), steps=40,
                    checkpoint_every=20, steps_per_chunk=4)
    run = attrib.open_run(run_dir)
    steps = []
    replay_step = type(run.replay)._step
    monkeypatch.setattr(type(run.replay), "_step",
                        lambda self: (steps.append(self.position), replay_step(self))[1])
    backwards = {first: run.replay.window(first, first + 4) for first in range(36, -1, -4)}
    # intervals: every step once. Otherwise every window's 4 steps once, and the seeks to 36
    # and 16 from checkpoints 20 and 0; the other windows start at snapshots
    assert len(steps) == (40 if intervals_fit else 40 + 16 + 16)
    if intervals_fit:
        assert sorted(steps) == list(range(40))
    backwards["across"] = run.replay.window(17, 23)  # joins two intervals
    monkeypatch.setattr(trajectory, "WINDOW_BUDGET_BYTES", 0)  # the reference: replayed
    fresh = attrib.open_run(run_dir).replay  # from each window's start, forwards
    for first, (start, stop) in [(f, (f, f + 4)) for f in range(0, 40, 4)] + [
            ("across", (17, 23))]:
        forwards = fresh.window(start, stop)
        for name_ in run.param_names:
            assert torch.equal(backwards[first].theta[name_], forwards.theta[name_])
            for key, value in forwards.state[name_].items():
                assert torch.equal(backwards[first].state[name_][key], value)
    assert torch.equal(backwards[36].theta[run.param_names[0]][-1],
                       trained.thetas[40][run.param_names[0]])


@pytest.mark.parametrize("name", ["sgd_nesterov", "adamw"])
def test_resumed_optimizer_state_is_recorded_as_carry_in(run_dir, name):
    """An optimizer that already took steps: its buffers are the carry-in of METHODS.md §1."""
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for _ in range(5):  # unrecorded warm start
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    train(run_dir, model, opt, steps=12)
    run = attrib.open_run(run_dir)
    carry = run.initial_state()
    key = "momentum_buffer" if name.startswith("sgd") else "exp_avg"
    assert set(carry) == set(run.param_names) and all(key in c for c in carry.values())
    if name == "adamw":
        assert run.meta["initial_step_count"] == [5] * 4
        assert run.step_counts()[0].tolist() == [6] * 4  # bias correction continues from t=5
    assert update_split_error(run) <= 1e-5
