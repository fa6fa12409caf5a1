"""Format v2: the trajectory is the consumed gradients; θ, Δθ and the optimizer state are
rebuilt by replaying torch.optim, bit for bit against the live training."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import OPTIMIZERS, data, mlp, train

import attrib
from attrib.analyzer.path_kernel import path_kernel
from attrib.analyzer.stream import iter_steps
from attrib.analyzer.verify import verify
from attrib.schemas import format as fmt

FIXTURE = Path(__file__).parent / "fixtures" / "v1_run"


def live_loop(path: Path, model, opt, steps: int = 23, micro_batches: int = 1, amp=False,
              edit_at: int | None = None, edit: str = "in-place", **kwargs):
    """Train with the recorder; keep θ and the optimizer state after every step."""
    inputs, labels = data()
    g = torch.Generator().manual_seed(4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
    thetas, states = [], []
    kwargs.setdefault("checkpoint_every", 7)
    kwargs.setdefault("steps_per_chunk", 4)
    with attrib.Recorder(path, model, opt, **kwargs) as rec:
        thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
        for step in range(steps):
            if step == edit_at:
                weight = next(model.parameters())
                if edit == "in-place":
                    with torch.no_grad():
                        weight[0, 0] += 0.5
                elif edit == ".data =":  # a new tensor: no in-place write
                    weight.data = weight.data * 1.01
                else:  # through .data: p's own version counter does not move
                    weight.data.clamp_(-0.1, 0.1)
            for _ in range(micro_batches):
                ids = torch.randint(0, len(inputs), (16,), generator=g)
                rec.examples(ids)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = torch.nn.functional.cross_entropy(model(inputs[ids]), labels[ids])
                loss = loss / micro_batches
                (scaler.scale(loss) if amp else loss).backward()
            if amp:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            if amp:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
            sched.step()
            thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
            states.append({n: {k: v.clone() for k, v in opt.state[p].items()
                               if isinstance(v, torch.Tensor) and v.dim() > 0}
                           for n, p in model.named_parameters()})
    return thetas, states


def two_groups(make):
    def build(model):
        first, second = list(model.parameters())[:2], list(model.parameters())[2:]
        opt = make([{"params": first}, {"params": second, "weight_decay": 0.0}])
        return opt
    return build


CASES = {
    **{name: (lambda m, make=make: make(m.parameters())) for name, make in OPTIMIZERS.items()},
    "sgd_momentum_foreach": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8,
                                                      foreach=True),
    "adamw_two_groups": two_groups(lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1)),
    # a tensor lr takes other arithmetic in torch (lr / bias correction as a tensor)
    "adam_tensor_lr": lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01)),
    "adam_decoupled_amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=0.01,
                                                         weight_decay=0.05, amsgrad=True,
                                                         decoupled_weight_decay=True),
}


def assert_bit_exact(run: attrib.Run, thetas, states) -> None:
    for step in [0, 3, 7, 12, len(thetas) - 1]:  # around checkpoints and chunk ends
        rebuilt = run.reconstruct(step)
        for name, value in thetas[step].items():
            assert torch.equal(rebuilt[name], value), (step, name)
    for name in run.param_names:
        live = torch.stack([thetas[s + 1][name] - thetas[s][name] for s in range(run.n_steps)])
        assert torch.equal(run.deltas(name, 0, run.n_steps), live), name
        for key in fmt.STEP_STATE[run.optimizer["kind"]]:
            source = "max_exp_avg_sq" if run.optimizer["amsgrad"] else key
            recorded = run.state(name, key, 0, run.n_steps)
            assert torch.equal(recorded, torch.stack([s[name][source] for s in states])), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_replay_rebuilds_theta_deltas_and_state_bit_for_bit(run_dir, case):
    model = mlp()
    thetas, states = live_loop(run_dir, model, CASES[case](model))
    run = attrib.open_run(run_dir)
    assert run.format_version == 2
    assert_bit_exact(run, thetas, states)
    assert run.replay.gaps == {}
    report = verify(run_dir).to_pylist()
    assert all(r["ok"] for r in report), report


def test_replay_with_accumulation_and_amp(run_dir):
    model = mlp()
    thetas, states = live_loop(run_dir, model, OPTIMIZERS["adamw"](model.parameters()),
                               micro_batches=3, amp=True, capture=False)
    assert_bit_exact(attrib.open_run(run_dir), thetas, states)


def test_no_deltas_or_state_are_stored_per_step(run_dir):
    model = mlp()
    live_loop(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), capture=False)
    group = zarr.open_group(run_dir / fmt.STORE_DIR, mode="r")
    assert fmt.DELTAS not in group and fmt.STATE not in group
    assert group[f"{fmt.CHECKPOINT_STATE}/0.weight"].shape[1] == 2  # exp_avg, exp_avg_sq
    info = attrib.open_run(run_dir).info()
    numel = sum(p.numel() for p in model.parameters())
    grads_and_checkpoints = 4 * numel * (23 + 3 * len(attrib.open_run(run_dir).checkpoint_steps))
    assert info["dense_bytes_raw"] < grads_and_checkpoints + 4096  # + the per-step scalars


@pytest.mark.parametrize("edit", ["in-place", ".data =", ".data.clamp_"])
def test_an_edit_outside_the_optimizer_is_warned_at_its_step_and_flagged_by_verify(run_dir,
                                                                                   edit):
    model = mlp()
    with pytest.warns(UserWarning, match=r"\['0.weight'\] changed between step 9 and step 10 "
                                         r"outside the optimizer"):
        live_loop(run_dir, model, OPTIMIZERS["adamw"](model.parameters()), edit_at=10,
                  edit=edit)
    report = {r["check"]: r for r in verify(run_dir).to_pylist()}
    assert not report["replay"]["ok"]
    assert "changed outside the optimizer between steps 9 and 10" in report["replay"]["detail"]


def test_verify_passes_without_an_edit_and_reports_bit_exact_replay(run_dir):
    model = mlp()
    live_loop(run_dir, model, OPTIMIZERS["sgd_nesterov"](model.parameters()))
    report = {r["check"]: r for r in verify(run_dir).to_pylist()}
    assert report["replay"]["ok"] and "bit for bit" in report["replay"]["detail"]


def test_a_replay_gap_is_its_own_path_kernel_term_and_completeness_holds(tmp_path):
    """A checkpoint the replay does not reach (as on a GPU-trained run) is reported by verify,
    and its difference enters the path kernel as the `replay` term: the sum stays complete."""
    path = tmp_path / "run"
    model = mlp(torch.float64)
    inputs, labels = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 3, (64,))
    train(path, model, OPTIMIZERS["adamw"](model.parameters()), steps=20, inputs=inputs,
          labels=labels, checkpoint_every=10, steps_per_chunk=4, capture=attrib.Full())
    key = fmt.param_key("2.weight")
    array = zarr.open_group(path / fmt.STORE_DIR, mode="r+")[f"{fmt.CHECKPOINTS}/{key}"]
    array[1] = array[1] + 1e-3 * np.sign(array[1])  # the stored θ_10 is not the replayed one
    run = attrib.open_run(path)
    report = {r["check"]: r for r in verify(path).to_pylist()}
    assert not report["replay"]["ok"] and "after step 9" in report["replay"]["detail"]
    result = path_kernel(run, lambda: mlp(torch.float64), (inputs[:4], labels[:4]),
                         quadrature=4, progress=False)
    terms = result.table.group_by("term").aggregate([("value", "sum")]).to_pylist()
    replay = [t["value_sum"] for t in terms if t["term"] == "replay"]
    assert replay and abs(replay[0]) > 1e-6
    table = result.completeness()
    gap, delta = table["gap"].to_numpy(), table["delta_f"].to_numpy()
    assert (np.abs(gap) <= 1e-6 * np.abs(delta) + 1e-9).all(), table


def test_a_format_v1_run_still_reads(tmp_path):
    path = tmp_path / "v1"
    shutil.copytree(FIXTURE, path)
    run = attrib.open_run(path)
    assert run.format_version == 1 and run.n_steps == 10
    theta = run.reconstruct(10)
    stored = run.checkpoint(len(run.checkpoint_steps) - 1)
    for name, value in stored.items():
        torch.testing.assert_close(theta[name], value, rtol=1e-5, atol=1e-6)
    assert run.state("0.weight", "exp_avg_sq", 0, 10).shape == (10, 16, 10)
    assert all(r["ok"] for r in verify(path).to_pylist())
    inputs, labels = data()
    result = path_kernel(run, mlp, (inputs[:3], labels[:3]), quadrature=4, progress=False)
    table = result.completeness()
    assert (table["relative_gap"].to_numpy() < 1e-3).all(), table


def test_resume_refuses_a_v1_run(tmp_path):
    path = tmp_path / "v1"
    shutil.copytree(FIXTURE, path)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    with pytest.raises(fmt.FormatError, match=r"format v1.*new directory"):
        attrib.Recorder(path, model, opt, resume=True)


def test_bfloat16_gradients_halve_the_trajectory_and_report_their_drift(tmp_path):
    """grad_dtype="bfloat16": 2 bytes per parameter per step; the replay drifts from training
    and says by how much; the drift is the path kernel's replay term, so completeness holds."""
    path = tmp_path / "run"
    model = mlp(torch.float64)
    inputs, labels = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 3, (64,))
    trained = train(path, model, OPTIMIZERS["adamw"](model.parameters()), steps=20,
                    inputs=inputs, labels=labels, checkpoint_every=10, steps_per_chunk=4,
                    capture=attrib.Full(), grad_dtype="bfloat16")
    run = attrib.open_run(path)
    group = zarr.open_group(path / fmt.STORE_DIR, mode="r")
    assert group[f"{fmt.GRADS}/2.weight"].dtype == np.int16  # bfloat16 bits
    theta = run.reconstruct(5)
    drift = max(float((theta[n] - v).abs().max() / v.abs().max())
                for n, v in trained.thetas[5].items())
    assert 0 < drift < 1e-2  # rounded gradients: close to training, not equal
    for step in (0, 10, 20):  # checkpoints are training's own θ
        for name, value in trained.thetas[step].items():
            assert torch.equal(run.reconstruct(step)[name], value)
    report = {r["check"]: r for r in verify(path).to_pylist()}
    assert report["replay"]["ok"] and "stored as bfloat16" in report["replay"]["detail"]
    result = path_kernel(run, lambda: mlp(torch.float64), (inputs[:4], labels[:4]),
                         quadrature=4, progress=False)
    terms = dict(zip(*result.table.group_by("term").aggregate([("value", "sum")])
                     .select(["term", "value_sum"]).to_pydict().values()))
    assert terms["replay"] != 0
    table = result.completeness()
    gap, delta = table["gap"].to_numpy(), table["delta_f"].to_numpy()
    assert (np.abs(gap) <= 1e-6 * np.abs(delta) + 1e-9).all(), table


def test_grad_dtype_is_checked():
    model = mlp()
    with pytest.raises(ValueError, match="grad_dtype='float16'"):
        attrib.Recorder("unused", model, OPTIMIZERS["sgd"](model.parameters()),
                        grad_dtype="float16")


def test_stored_optimizer_state_is_where_the_replay_goes_on(tmp_path):
    """A checkpoint whose θ the replay reaches but whose momentum buffer it doesn't (a resume
    accepted within tolerance): every way of reading gives the same θ_s, verify names the
    checkpoint, and the buffer's difference is a replay term that keeps completeness."""
    path = tmp_path / "run"
    model = mlp(torch.float64)
    inputs, labels = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 3, (64,))
    train(path, model, OPTIMIZERS["sgd_nesterov"](model.parameters()), steps=20, inputs=inputs,
          labels=labels, checkpoint_every=10, steps_per_chunk=4)
    key = fmt.param_key("0.weight")
    array = zarr.open_group(path / fmt.STORE_DIR, mode="r+")[f"{fmt.CHECKPOINT_STATE}/{key}"]
    array[1] = array[1] * 1.01  # checkpoint 1 (step 10): momentum buffer off by 1%
    run = attrib.open_run(path)
    streamed = {view.step: {n: t.clone() for n, t in view.theta.items()}
                for view in iter_steps(run)}
    for step in (11, 14, 19):
        fresh = attrib.open_run(path).reconstruct(step)  # from checkpoint 1, not streamed
        assert all(torch.equal(fresh[n], streamed[step][n]) for n in fresh), step
    report = {r["check"]: r for r in verify(path).to_pylist()}
    assert not report["replay"]["ok"]
    assert "optimizer state) after step 9" in report["replay"]["detail"]
    result = path_kernel(attrib.open_run(path), lambda: mlp(torch.float64),
                         (inputs[:4], labels[:4]), quadrature=4, progress=False)
    table = result.completeness()
    gap, delta = table["gap"].to_numpy(), table["delta_f"].to_numpy()
    assert (np.abs(gap) <= 1e-6 * np.abs(delta) + 1e-9).all(), table


def test_a_run_closed_before_its_first_step_reads_and_resumes(run_dir):
    model = mlp()
    opt = OPTIMIZERS["adamw"](model.parameters())
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    attrib.Recorder(run_dir, model, opt).close()
    run = attrib.open_run(run_dir)
    assert run.n_steps == 0
    assert all(torch.equal(run.reconstruct(0)[n], v) for n, v in theta.items())
    assert all(r["ok"] for r in verify(run_dir).to_pylist())
    live_loop(run_dir, model, opt, steps=3, resume=True)
    assert attrib.open_run(run_dir).n_steps == 3


@pytest.mark.parametrize("chosen", [["2.*"], []])
def test_a_partial_trajectory_rebuilds_its_tensors_and_refuses_the_rest(run_dir, chosen):
    """trajectory=["2.*"] stores the head's gradients only (record_grads=False: none). The
    chosen tensors' Δθ and state replay bit for bit; every tensor's θ is exact at the
    checkpoints; what needs the others' θ between checkpoints refuses and says why; verify
    replays the chosen ones."""
    model = mlp()
    settings = {"trajectory": chosen} if chosen else {"record_grads": False}
    opt = OPTIMIZERS["adamw"](model.parameters())
    thetas, states = live_loop(run_dir, model, opt, capture=False, **settings)
    run = attrib.open_run(run_dir)
    kept = ["2.weight", "2.bias"] if chosen else []
    assert run.trajectory_params == kept
    group = zarr.open_group(run_dir / fmt.STORE_DIR, mode="r")
    stored = sorted(group[fmt.GRADS].array_keys()) if fmt.GRADS in group else []
    assert stored == sorted(kept)
    for step in run.checkpoint_steps:  # 0, 7, 14, 21, 23
        for name, value in run.reconstruct(step).items():
            assert torch.equal(value, thetas[step][name]), (step, name)
    for name in kept:
        live = torch.stack([thetas[s + 1][name] - thetas[s][name] for s in range(run.n_steps)])
        assert torch.equal(run.deltas(name), live), name
        assert torch.equal(run.state(name, "exp_avg_sq"),
                           torch.stack([s[name]["exp_avg_sq"] for s in states])), name
    for read in (lambda: run.reconstruct(3), lambda: run.deltas("0.weight"),
                 lambda: run.grads("0.bias"), lambda: list(iter_steps(run)),
                 lambda: path_kernel(run, mlp, data(), progress=False)):
        with pytest.raises(attrib.TrajectoryError,
                           match="can't be computed.*" + ("trajectory=" if chosen
                                                          else "record_grads=True")):
            read()
    assert run.info()["trajectory_params"] == len(kept)
    replay = {r["check"]: r for r in verify(run_dir).to_pylist()}["replay"]
    assert replay["ok"], replay
    assert ("2 of 4 tensors whose gradients were recorded" in replay["detail"] if chosen
            else "nothing to replay" in replay["detail"])
    # the run resumes where it stopped (θ and state of every tensor are at that checkpoint)
    with attrib.Recorder(run_dir, model, opt, capture=False, checkpoint_every=7,
                         steps_per_chunk=4, resume=True, **settings):
        pass
    assert attrib.open_run(run_dir).n_steps == 23


def test_a_trajectory_pattern_that_matches_nothing_is_refused(run_dir):
    model = mlp()
    with pytest.raises(ValueError, match=r"\['head\.\*'\] match no parameter; the parameters "
                                         r"are \['0.weight'"):
        attrib.Recorder(run_dir, model, OPTIMIZERS["adamw"](model.parameters()),
                        trajectory=["2.*", "head.*"])
    assert not (run_dir / fmt.META_FILE).exists()
