"""Stage-level accountability (METHODS.md §4): how would f(x) differ had a stage not run?

Every method shares the skip semantics: the stage's steps are not executed (no update, no
optimizer-state change, no step-count tick) and every later step keeps its recorded batch and
learning rate. The effect is Δf_S(x) = f(x; θ_N^{−S}) − f(x; θ_N).

- "linear-response" (default): one adjoint sweep with Hessian-vector products; all stages at
  once (analyzer/linear_response.py);
- "frozen": later gradients held at their recorded values, no forward/backward passes; the
  cheap baseline, wrong for early stages that later training heals (analyzer/frozen.py);
- "replay": retraining with the stage skipped, the ground truth (analyzer/replay.py);
- "hybrid": replay the `window` steps after the stage, then the adjoint from there on; the
  "auto" window grows until the estimate settles (analyzer/hybrid.py);
- "path": f(θ_a) − f(θ_e), minus what the stage's updates changed along the path that
  happened: credit for what the stage did, not a counterfactual (the path kernel's view).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from attrib.analyzer import targets
from attrib.analyzer.frozen import frozen_effects
from attrib.analyzer.hybrid import AUTO_TOL, check_window, hybrid_effects
from attrib.analyzer.linear_response import check_supported, linear_response
from attrib.analyzer.replay import replay_effects
from attrib.analyzer.run import Run
from attrib.analyzer.stage_spec import effects_table, resolve
from attrib.analyzer.training import LossFn, TrainingBatches, check_gradients

METHODS = ("linear-response", "frozen", "replay", "path", "hybrid")

AGREEMENT = pa.schema([
    pa.field("method", pa.string()), pa.field("stage", pa.string()),
    pa.field("start", pa.int64()), pa.field("end", pa.int64()),
    pa.field("n", pa.int64()), pa.field("pearson", pa.float64()),
    pa.field("sign_agreement", pa.float64()), pa.field("mean_effect", pa.float64()),
    pa.field("mean_reference", pa.float64()),
])


@dataclass
class StageReport:
    """The effects table plus what the methods learnt about the run on the way."""

    table: pa.Table
    notes: dict = field(default_factory=dict)  # e.g. replay drift, clipping threshold


def stages(run: Run, model_fn: Callable[[], torch.nn.Module], train_set, test_set,
           target: targets.Target = "loss", stages=None,
           method: str | Sequence[str] = "linear-response", loss_fn: LossFn | None = None,
           accumulation: str = "mean", max_grad_norm: float | str | None = "recorded",
           dtype: torch.dtype = torch.float64, progress: bool = True,
           window: int | str = "auto", window_tol: float = AUTO_TOL) -> pa.Table:
    """Δf_S(x) for every stage and test point: Arrow table (stage, start, end, test_id, effect,
    method); `method` may name several (e.g. ("linear-response", "frozen", "replay")).

    `stages`: None (the recorded rec.stage() names), a list of names, or {name: range(a, b)}.
    `train_set[i]` is the example with example_id i; `loss_fn(output, labels)` one
    micro-batch's training loss (default mean cross-entropy / MSE); `accumulation` "mean" or
    "sum" over micro-batches; `max_grad_norm` the replay's clipping threshold ("recorded":
    implied by the recorded clip factors); `window`, `window_tol`: the hybrid's replay window
    (steps, or "auto": doubled until successive estimates agree within window_tol). See
    `stage_report` for the replay's and the hybrid's diagnostics.
    """
    return stage_report(run, model_fn, train_set, test_set, target, stages, method, loss_fn,
                        accumulation, max_grad_norm, dtype, progress, window, window_tol).table


def stage_report(run: Run, model_fn: Callable[[], torch.nn.Module], train_set, test_set,
                 target: targets.Target = "loss", stages=None,
                 method: str | Sequence[str] = "linear-response",
                 loss_fn: LossFn | None = None, accumulation: str = "mean",
                 max_grad_norm: float | str | None = "recorded",
                 dtype: torch.dtype = torch.float64, progress: bool = True,
                 window: int | str = "auto", window_tol: float = AUTO_TOL) -> StageReport:
    """`stages()` with notes: replay drift (‖θ_N^{baseline} − θ_N‖ / ‖θ_N − θ_start‖), the
    baseline replay compared against ("recorded": the recording stood in, where the retraining
    retraces it bit for bit: analyzer/baseline.py; "retrained"), the clipping threshold
    replay applied, gradient check of the rebuilt losses, and per stage the hybrid's window and
    linearisation check (notes["hybrid"])."""
    with torch.random.fork_rng(devices=[]):  # replayed generator states stay in here
        return _stage_report(run, model_fn, train_set, test_set, target, stages, method,
                             loss_fn, accumulation, max_grad_norm, dtype, progress, window,
                             window_tol)


def _stage_report(run, model_fn, train_set, test_set, target, stages, method, loss_fn,
                  accumulation, max_grad_norm, dtype, progress, window, window_tol
                  ) -> StageReport:
    methods = [method] if isinstance(method, str) else list(method)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
    check_window(window, window_tol)
    chosen = resolve(run, stages)
    model = run.build_model(model_fn, dtype).eval()
    inputs, labels = targets.as_tensors(test_set, dtype)

    def evaluate(params: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            params = {n: t.to(dtype) for n, t in params.items()}
            return targets.evaluate(model, params, inputs, labels, target).cpu().numpy()

    tables, notes = [], {}
    replayable: list[TrainingBatches] = []

    def batches() -> TrainingBatches:
        """The rebuilt training, checked once against the recorded gradients."""
        if not replayable:
            replayable.append(TrainingBatches(run, run.build_model(model_fn, dtype).train(),
                                              train_set, loss_fn, accumulation, dtype))
            notes["gradient_check"] = check_gradients(
                run, replayable[0], sorted({0, run.n_steps // 2, run.n_steps - 1}))
        return replayable[0]

    for name in methods:
        if name == "linear-response":
            result = linear_response(run, model_fn, train_set, test_set, target, chosen,
                                     by=(), loss_fn=loss_fn, accumulation=accumulation,
                                     dtype=dtype, progress=progress)
            tables.append(result.stages)
            continue
        if name == "frozen":
            effects = frozen_effects(run, chosen, evaluate, dtype)
        elif name == "path":
            effects = np.stack([evaluate(run.reconstruct(s.start)) - evaluate(
                run.reconstruct(s.stop)) for s in chosen])
        elif name == "hybrid":
            check_supported(run, "hybrid")
            theta_n = {n: t.to(dtype) for n, t in run.reconstruct(run.n_steps).items()}
            hybrid = hybrid_effects(run, batches(), chosen, targets.gradients(
                model, theta_n, inputs, labels, target), evaluate, window, window_tol,
                max_grad_norm, progress, notes["gradient_check"] == 0)
            effects, notes["hybrid"] = hybrid.effects, hybrid.diagnostics
        else:
            check_supported(run, "replay")
            replayed = replay_effects(run, batches(), chosen, evaluate, max_grad_norm,
                                      progress, notes["gradient_check"] == 0)
            effects = replayed.effects
            notes["replay_drift"], notes["max_grad_norm"] = replayed.drift, \
                replayed.max_grad_norm
            notes["baseline"] = replayed.baseline
        tables.append(effects_table(chosen, effects, name))
    return StageReport(pa.concat_tables(tables), notes)


def agreement(table: pa.Table, reference: str = "replay") -> pa.Table:
    """Per method and stage, and pooled over all stages (stage "(all)"): Pearson r and sign
    agreement of the effects with the reference method's over test points."""
    rows = table.to_pylist()
    ref = {(r["stage"], r["test_id"]): r["effect"] for r in rows if r["method"] == reference}
    if not ref:
        raise ValueError(f"the table has no {reference!r} rows to compare with")
    groups: dict[tuple, list[tuple[float, float]]] = {}
    bounds: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r["method"] == reference:
            continue
        pair = (r["effect"], ref[(r["stage"], r["test_id"])])
        groups.setdefault((r["method"], r["stage"]), []).append(pair)
        groups.setdefault((r["method"], "(all)"), []).append(pair)
        bounds[r["stage"]] = (r["start"], r["end"])
    out = []
    for (method, stage), pairs in groups.items():
        got, want = np.array(pairs).T
        start, end = bounds.get(stage, (None, None))
        out.append({"method": method, "stage": stage, "start": start, "end": end,
                    "n": len(pairs), "pearson": _pearson(got, want),
                    "sign_agreement": float(np.mean(np.sign(got) == np.sign(want))),
                    "mean_effect": float(got.mean()), "mean_reference": float(want.mean())})
    out.sort(key=lambda r: (r["method"], r["start"] is None, r["start"] or 0, r["end"] or 0))
    return pa.Table.from_pylist(out, schema=AGREEMENT)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
