"""Linear-response (adjoint) estimator of stage and example effects (METHODS.md §4).

Training is a map z_{s+1} = Φ_s(z_s) on the state z = (θ, optimizer buffers). One reverse
sweep from λ_N = (∇f(x; θ_N), 0) with λ_s = J_sᵀ λ_{s+1} gives
- for every stage S at once: Δf_S ≈ λ_e · (z_a − z_e), a = first step of S, e = first after it
  (skipping S restarts step e from the state before a), plus, for Adam, the exact change of each
  later update when the skipped steps no longer tick the bias-correction count, propagated by
  the same adjoint;
- for every example i and step s: its contribution λ_G,s · c_{s,i} (first-order
  f(θ_N) − f(θ_N without c_{s,i})), the unrolled-differentiation influence.
J_s holds the Hessian of the recorded batch loss at θ_s (Hessian-vector products, vmapped over
test points), the clipping projection when the step was clipped, and the optimizer's own
linearised update: momentum / Nesterov / dampening, coupled or decoupled weight decay, and
Adam's first and second moments with the normaliser D_s = √(v_s / (1 − β2^t)) + ε.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.func import grad, jvp, vmap

from attrib.analyzer import targets
from attrib.analyzer.aggregate import AXES, InfluenceRows, StepData, data_influence
from attrib.analyzer.dynamics import Dynamics, StepRule, initial_buffers, predicted_updates
from attrib.analyzer.path_kernel import release_freed_memory
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.run import Run
from attrib.analyzer.stage_spec import Stage, effects_table, resolve
from attrib.analyzer.training import LossFn, TrainingBatches, check_gradients
from attrib.recorder.optimizers import adam_update_scale, momentum_intake

BLOCK_BUDGET_BYTES = 256 << 20  # trajectory held for one reverse block (θ, G̃, v, m per step)


@dataclass
class LinearResponseResult:
    """Stage effects (stage, start, end, test_id, effect, method) and, when per-example
    contributions were stored, example influences over the kept axes (test_id, term, …)."""

    stages: pa.Table
    influence: pa.Table | None
    f_final: np.ndarray


@dataclass
class Adjoint:
    """λ_t, the adjoint of the state before step t: cotangents of θ_t, of the buffers (b or
    m) and of Adam's v, per test point; and per stage the Adam step-count sources of the
    steps from t on (what skipping the stage changes in their bias corrections)."""

    theta: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    source: np.ndarray  # (n_stages, n_test)


@dataclass
class _Snapshot:
    """The optimizer state before a step: buffers (b or m) and Adam's v."""

    buffers: dict[str, torch.Tensor | None]
    v: dict[str, torch.Tensor]


@dataclass
class _StepState:
    theta: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor | None]  # buffers after the step
    fresh: dict[str, bool]  # no buffer before the step (SGD's first momentum step)


def check_supported(run: Run, method: str) -> None:
    """Refuse what the linearised (or replayed) optimizer can't represent, saying why."""
    if run.optimizer.get("amsgrad"):
        raise NotImplementedError(
            f"{method}: AMSGrad records only the running max of v, not v itself; use "
            "method='frozen' (it holds the normaliser) or record without amsgrad")
    uniform = run.steps.column("clip_uniform").to_pylist()
    if False in uniform:
        bad = uniform.index(False)
        raise NotImplementedError(
            f"{method}: at step {bad} .grad was not a uniform rescale of the accumulated "
            "gradient (e.g. clip_grad_value_), which the estimators don't model")


def linear_response(run: Run, model_fn: Callable[[], torch.nn.Module], train_set, test_set,
                    target: targets.Target = "loss", stages=None,
                    by: tuple[str, ...] = ("example",), loss_fn: LossFn | None = None,
                    accumulation: str = "mean", dtype: torch.dtype = torch.float64,
                    progress: bool = True) -> LinearResponseResult:
    """One adjoint sweep: every stage's first-order counterfactual effect and, with stored
    per-example contributions, every example's (aggregated over `by`, as in path_kernel).

    `train_set[i]` is the example with example_id i; `loss_fn(output, labels)` the loss of one
    micro-batch as trained (default: mean cross-entropy / MSE); `accumulation` how micro-batch
    losses were combined ("mean" or "sum"). The rebuilt losses are checked against the
    recorded gradients before the sweep.
    """
    unknown = set(by) - set(AXES)
    if unknown:
        raise ValueError(f"by={by!r}: unknown axes {sorted(unknown)}; choose from {AXES}")
    with torch.random.fork_rng(devices=[]):  # replayed generator states stay in here
        return _linear_response(run, model_fn, train_set, test_set, target, stages, by,
                                loss_fn, accumulation, dtype, progress)


def _linear_response(run, model_fn, train_set, test_set, target, stages, by, loss_fn,
                     accumulation, dtype, progress) -> LinearResponseResult:
    check_supported(run, "linear-response")
    chosen = resolve(run, stages)
    batches = TrainingBatches(run, run.build_model(model_fn, dtype).train(), train_set, loss_fn,
                              accumulation, dtype)
    check_gradients(run, batches, sorted({0, run.n_steps // 2, run.n_steps - 1}))
    model = run.build_model(model_fn, dtype).eval()
    inputs, labels = targets.as_tensors(test_set, dtype)
    theta_n = {n: t.to(dtype) for n, t in run.reconstruct(run.n_steps).items()}
    with torch.no_grad():
        f_final = targets.evaluate(model, theta_n, inputs, labels, target).cpu().numpy()
    adjoint = targets.gradients(model, theta_n, inputs, labels, target)
    has_examples = bool(run.captured)
    rows = (InfluenceRows(tuple(by), len(labels), run.examples.column("example_id").to_numpy(),
                          run.steps.column("stage").to_pylist(),
                          dict(zip(run.param_names, run.params.column("module").to_pylist())))
            if has_examples else None)
    sweep = AdjointSweep(run, batches, chosen, adjoint, rows, dtype)
    sweep.sweep(progress)
    return LinearResponseResult(effects_table(chosen, sweep.effects, "linear-response"),
                                rows.table() if rows is not None else None, f_final)


class AdjointSweep:
    """The reverse sweep: blocks of steps from last to first, each rebuilt forward from a
    snapshot of the optimizer state taken in one forward pass over the stored gradients."""

    def __init__(self, run: Run, batches: TrainingBatches, stages: list[Stage],
                 adjoint: dict[str, torch.Tensor], rows: InfluenceRows | None,
                 dtype: torch.dtype, keep: frozenset[int] = frozenset(),
                 stage_effects: bool = True) -> None:
        self.run, self.batches, self.stages, self.rows, self.dtype = run, batches, stages, rows, \
            dtype
        self.keep, self.kept = keep, {}  # steps t whose λ_t to keep → the kept Adjoint
        self.want_effects = stage_effects  # False: only λ (and the sources) are wanted
        self.names = run.param_names
        self.dynamics = Dynamics(run)
        self.adam = self.dynamics.kind != "sgd"
        n_test = next(iter(adjoint.values())).shape[0]
        self.a_theta = adjoint
        zeros = {n: torch.zeros_like(a) for n, a in adjoint.items()}
        self.a_m = zeros  # cotangent of b_s (SGD) or m_s (Adam)
        self.a_v = {n: torch.zeros_like(a) for n, a in adjoint.items()} if self.adam else {}
        self.effects = np.zeros((len(stages), n_test))
        self.alpha = run.clip_factors()
        self.shapes = run.param_shapes
        self.skipped = np.stack([self.dynamics.active[s.start:s.stop].sum(0) for s in stages])
        examples = run.examples.sort_by([("step", "ascending"), ("row", "ascending")])
        self.example_steps = examples.column("step").to_numpy()
        self.example_ids = examples.column("example_id").to_numpy()
        self.captured = run.captured
        self.randomness = "same" if batches.stochastic else "error"

    # -- forward pass: snapshots -----------------------------------------------------------------
    def _snapshots(self, steps: set[int]) -> dict[int, _Snapshot]:
        """The optimizer state before each of `steps` (buffers recomputed from G̃, v recorded)."""
        run, dtype = self.run, self.dtype
        buffers = initial_buffers(run, dtype)
        carry = run.initial_state()
        v0 = {n: (carry[n]["exp_avg_sq"].to(dtype) if "exp_avg_sq" in carry.get(n, {}) else
                  torch.zeros(self.shapes[n], dtype=dtype)) for n in self.names} \
            if self.adam else {}
        taken = {0: _Snapshot(dict(buffers), v0)} if 0 in steps else {}
        for check in predicted_updates(run, dtype, buffers=buffers):
            if check.step + 1 in steps:
                taken[check.step + 1] = _Snapshot(dict(check.buffers),
                                                  {n: x.clone() for n, x in check.v.items()})
        return taken

    def sweep(self, progress: bool) -> None:
        n = self.run.n_steps
        per_step = 4 * 8 * sum(int(np.prod(s)) for s in self.shapes.values())
        block = max(1, min(n, BLOCK_BUDGET_BYTES // per_step))
        starts = list(range(0, n, block))
        boundaries = {s.start for s in self.stages} | {s.stop for s in self.stages}
        self.snapshots = self._snapshots(set(starts) | boundaries)
        self.source = np.zeros_like(self.effects)
        with progress_bar(total=n, progress=progress, desc="linear response (adjoint sweep)",
                  unit="step") as bar:
            for first in reversed(starts):
                stop = min(first + block, n)
                states = self._forward(first, stop)
                contributions = {name: self.run.example_rows(name, first, stop)
                                 .to(self.dtype) for name in self.captured} if self.rows else {}
                for s in range(stop - 1, first - 1, -1):
                    if s + 1 in self.keep:
                        self.kept[s + 1] = Adjoint(*({n: a.clone() for n, a in part.items()}
                                                     for part in (self.a_theta, self.a_m,
                                                                  self.a_v)),
                                                   self.source.copy())
                    if self.want_effects:
                        self._stage_effects(s + 1)
                    self._step(s, states[s - first], {n: c[s - first]
                                                      for n, c in contributions.items()})
                    bar.update(1)
                del states, contributions
                release_freed_memory()

    def _forward(self, first: int, stop: int) -> list[_StepState]:
        snapshot = self.snapshots[first]
        buffers = dict(snapshot.buffers)
        states = []
        for check in predicted_updates(self.run, self.dtype, first, stop, buffers=buffers):
            before = {n: b is None for n, b in states[-1].m.items()} if states else \
                {n: b is None for n, b in snapshot.buffers.items()}
            states.append(_StepState({n: t.to(self.dtype, copy=True) for n, t in
                                      check.theta.items()}, check.grads, check.v,
                                     dict(check.buffers), before))
        return states

    # -- stage effects ---------------------------------------------------------------------------
    def _stage_effects(self, e: int) -> None:
        """Record Δf_S ≈ λ_e · (z_a − z_e) for the stages ending right before step e; the
        adjoint held now is λ_e."""
        for k, stage in enumerate(self.stages):
            if stage.stop != e:
                continue
            theta_a, theta_e = self.run.reconstruct(stage.start), self.run.reconstruct(e)
            before_a, before_e = self.snapshots[stage.start], self.snapshots[e]
            total = self.source[k].copy()
            for name in self.names:
                total += _dot(self.a_theta[name], (theta_a[name] - theta_e[name]).to(self.dtype))
                total += _dot(self.a_m[name], self._buffer_change(name, stage, before_a, before_e))
                if self.adam:
                    total += _dot(self.a_v[name], before_a.v[name] - before_e.v[name])
            self.effects[k] = total

    def _buffer_change(self, name: str, stage: Stage, before_a: _Snapshot, before_e: _Snapshot
                       ) -> torch.Tensor:
        start, end = before_a.buffers[name], before_e.buffers[name]
        zeros = torch.zeros(self.shapes[name], dtype=self.dtype)
        first_momentum_step = start is None and end is not None and not self.adam
        if first_momentum_step and self.dynamics.rule(stage.start, self.names.index(name)
                                                      ).hparams["dampening"]:
            raise NotImplementedError(
                f"linear-response: stage {stage.name!r} holds SGD's first momentum step and "
                "the run uses dampening, whose first-step rule isn't linear in the buffer; "
                "use method='replay' or 'frozen' for it")
        return (zeros if start is None else start) - (zeros if end is None else end)

    def _adam_sources(self, s: int, state: _StepState) -> None:
        """Later updates change when the skipped steps don't tick Adam's count: add each one's
        exact change, at the recorded state, propagated by the adjoint λ_{s+1}."""
        for k, stage in enumerate(self.stages):
            if stage.stop > s:
                continue
            for j, name in enumerate(self.names):
                shift = int(self.skipped[k, j])
                if not self.dynamics.active[s, j] or shift == 0:
                    continue
                rule = self.dynamics.rule(s, j)
                m, v = state.m[name], state.v[name]
                change = (adam_update_scale(rule.hparams, v, rule.count - shift)
                          - adam_update_scale(rule.hparams, v, rule.count)) * m
                self.source[k] += _dot(self.a_theta[name], change)

    # -- one step of the reverse sweep -----------------------------------------------------------
    def _step(self, s: int, state: _StepState, contributions: dict[str, torch.Tensor]) -> None:
        if self.adam:
            self._adam_sources(s, state)
        a_d = {}
        for j, name in enumerate(self.names):
            if not self.dynamics.active[s, j]:
                a_d[name] = torch.zeros_like(self.a_theta[name])
                continue
            rule = self.dynamics.rule(s, j)
            if self.adam:
                a_d[name] = self._adam_back(name, rule, state)
            else:
                a_d[name] = self._sgd_back(name, rule, state.fresh[name])
        a_g = self._unclip(s, a_d, state.grads)
        if self.rows is not None:
            self._examples(s, a_g, contributions)
        for name, hv in self._hvp(s, state.theta, a_g).items():
            self.a_theta[name] = self.a_theta[name] + hv

    def _sgd_back(self, name: str, rule: StepRule, fresh: bool) -> torch.Tensor:
        """Adjoint of d = g + λθ, b = μ b' + w d, u = d + μ b (Nesterov) or b, θ −= η u."""
        h = rule.hparams
        a_u = -h["lr"] * self.a_theta[name]
        a_b = self.a_m[name] + (h["momentum"] * a_u if rule.nesterov else a_u)
        a_d = (a_u if rule.nesterov else 0.0) + momentum_intake(h, fresh) * a_b
        self.a_m[name] = torch.zeros_like(a_b) if fresh else h["momentum"] * a_b
        if h["weight_decay"]:
            self.a_theta[name] = self.a_theta[name] + h["weight_decay"] * a_d
        return a_d

    def _adam_back(self, name: str, rule: StepRule, state: _StepState) -> torch.Tensor:
        """Adjoint of m = β1 m' + (1−β1) d, v = β2 v' + (1−β2) d², θ ← θ(1 − ηλ) − c m / D."""
        h, t = rule.hparams, rule.count
        beta1, beta2, lr, decay = h["beta1"], h["beta2"], h["lr"], h["weight_decay"]
        m, v = state.m[name], state.v[name]
        decoupled = rule.kind == "adamw"
        d = state.grads[name] + (decay * state.theta[name] if decay and not decoupled else 0.0)
        bias2 = 1 - beta2**t
        root = (v / bias2).sqrt()
        denominator = root + h["eps"]
        c = lr / (1 - beta1**t)
        a_theta = self.a_theta[name]
        a_m = self.a_m[name] - c * a_theta / denominator
        a_denominator = c * m * a_theta / denominator**2
        d_root = torch.where(root > 0, 0.5 / (bias2 * root.clamp_min(1e-300)), 0.0)
        a_v = self.a_v[name] + a_denominator * d_root
        a_d = (1 - beta1) * a_m + 2 * (1 - beta2) * d * a_v
        self.a_m[name], self.a_v[name] = beta1 * a_m, beta2 * a_v
        if decay:
            self.a_theta[name] = a_theta * (1 - lr * decay) if decoupled \
                else a_theta + decay * a_d
        return a_d

    def _unclip(self, s: int, a_d: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """Cotangent of G_s from that of the consumed α G_s: α (I − ĝĝᵀ) when clipping acted."""
        alpha = float(self.alpha[s])
        if alpha >= 1 - 1e-9:
            return a_d
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        unit = {n: g / norm for n, g in grads.items()}
        along = sum(_dot(a_d[n], unit[n], numpy=False) for n in a_d)
        return {n: alpha * (a - along.reshape(-1, *[1] * unit[n].dim()) * unit[n])
                for n, a in a_d.items()}

    def _examples(self, s: int, a_g: dict[str, torch.Tensor],
                  contributions: dict[str, torch.Tensor]) -> None:
        lo, hi = np.searchsorted(self.example_steps, [s, s + 1])
        ids = self.example_ids[lo:hi]
        data = StepData(self.rows, s, ids)
        for name, stored in contributions.items():
            flat = a_g[name].reshape(a_g[name].shape[0], -1)
            influence = data_influence(self.run, name, self.shapes[name], stored[: len(ids)],
                                       flat, 1.0, self.dtype)
            data.add(name, influence)
        data.close()

    def _hvp(self, s: int, theta: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        """H_s v for every test point's v: Σ over micro-batches of vmapped jvp(grad(loss))."""
        total = {n: torch.zeros_like(v) for n, v in vectors.items()}
        for batch in self.batches.micro_batches(s):
            def directional(v, batch=batch):
                return jvp(grad(lambda p: self.batches.micro_loss(p, batch)), (theta,), (v,))[1]
            for name, value in vmap(directional, randomness=self.randomness)(vectors).items():
                total[name] += value
        return total


def _dot(batched: torch.Tensor, vector: torch.Tensor, numpy: bool = True):
    """(n_test, *shape) · (*shape) → (n_test,)."""
    out = batched.reshape(batched.shape[0], -1) @ vector.reshape(-1).to(batched.dtype)
    return out.cpu().numpy() if numpy else out
