"""Exact path-kernel influences (ExPLAIND; METHODS.md §2) over a recorded run.

f(x; θ_N) − f(x; θ_0) = Σ_s ḡ_s(x) · Δθ_s, ḡ_s the test gradient averaged along the segment
θ_s → θ_{s+1} (Gauss–Legendre quadrature). Each Δθ_s splits into per-example, regularization,
carry-in and residual parts (METHODS.md §1), so the sum splits into influences. The optimizer's
memory is handled by the backward recursion of METHODS.md §2: one vector per parameter per test
point, never a per-example momentum buffer.

The run is processed in blocks from last to first: a block's ḡ_s are computed forward from θ at
its start, then the recursion runs backward through it; memory holds one block of ḡ.
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.func import vmap

from attrib.analyzer import targets
from attrib.analyzer.aggregate import (
    AXES,
    COLUMNS,
    InfluenceRows,
    StepData,
    data_influence,
    owned,
)
from attrib.analyzer.path_kernel.quadrature import ADAPTIVE, MAX_NODES, Integrator
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.run import Run
from attrib.analyzer.stream import iter_steps
from attrib.recorder.optimizers import adam_update_scale, momentum_intake

# replay: a v2 run's replay gap (stored θ − replayed θ at a checkpoint, part of that step's Δθ),
# zero where the replay is bit for bit (the same kernels as training)
# rounding: Σ_s ḡ_s·Δθ_s minus the other terms (the training dtype's rounding of the updates)
TERMS = ("data", "residual", "regularization", "carry_in", "replay", "rounding")


BLOCK_STEPS = None  # steps held in memory at once; None: the run's steps_per_chunk (each
# stored chunk is then read once), fewer if their ḡ would exceed GBAR_BUDGET_BYTES
GBAR_BUDGET_BYTES = 128 << 20
# similarity=True: the test points' gradients at up to this many steps' θ in one vmapped call
# (per step, functorch's per-call overhead was most of the time: 15 of the demo's 84 s),
# within this many bytes of gradients per call
SIMILARITY_STEPS, SIMILARITY_BUDGET_BYTES = 16, 64 << 20
TRIM_BYTES = 32 << 20  # a block whose ḡ held this much hands freed heap back (malloc_trim
# walks the heap: 20 ms a call, 1.3 s of the demo's path kernel, whose blocks hold 11 MB)
AUTO = "auto"  # stride=: merge steps into a segment while the fixed rule meets their share
AUTO_STRIDE = 32  # the longest segment stride="auto" tries
HELPFUL_SIGN = {"loss": -1, "margin": 1}  # the sign of a change of f that helps the model
ORDERS = ("desc", "asc", "abs", "helpful", "harmful")


def _effect(value: float, target: str | None, helps: int | None) -> str:
    """What a change of f by `value` did, in words: helpful / harmful where the target says
    which direction is good, else raised / lowered f."""
    if value == 0:
        return "none"
    moved = f"{'raised' if value > 0 else 'lowered'} the {target}" if helps else \
        f"{'raised' if value > 0 else 'lowered'} f"
    if helps is None:
        return moved
    return f"{'helpful' if (value > 0) == (helps > 0) else 'harmful'} ({moved})"


def gaps_within_bound(completeness: pa.Table) -> np.ndarray:
    """Per test point of a completeness() table: whether |gap| ≤ quadrature_error, allowing
    float rounding (the bound holds exactly in real arithmetic)."""
    ends = np.abs(completeness.column("f_initial").to_numpy()) + \
        np.abs(completeness.column("f_final").to_numpy())
    return np.abs(completeness.column("gap").to_numpy()) <= \
        completeness.column("quadrature_error").to_numpy() * (1 + 1e-9) + 1e-12 * (1 + ends)


@dataclass
class PathKernelResult:
    """Influences as a long Arrow table (test_id, term, kept axes, value) plus f at both ends."""

    table: pa.Table
    f_initial: np.ndarray
    f_final: np.ndarray
    by: tuple[str, ...]
    quadrature_error: np.ndarray  # per test point: Σ over segments of |Σ_q w ∇f·Δθ − Δf|
    similarity: pa.Table | None = None  # per layer: test points' kernel (similarity=True)
    nodes: np.ndarray | None = None  # per segment, in step order: gradient evaluations
    # per test point (their mean; the adaptive rule spends more where kinks are)
    rounding: np.ndarray | None = None  # per test point: the rounding term over all params
    segments: np.ndarray | None = None  # each segment's first step, in order (with `nodes`)
    rounding_scale: np.ndarray | None = None  # per test point: what rounding in the training
    # dtype can move the sum by, ε·(Σ |each term before the split into examples| over steps
    # and params + Σ_s |ḡ_s|·|θ_{s+1}|): the updates' arithmetic and θ's storage

    def to_arrow(self) -> pa.Table:
        return self.table

    def completeness(self) -> pa.Table:
        """Per test point: f(θ_0), f(θ_N), their difference, the sum of all terms, the gap,
        the quadrature error: over every segment, the rule's Σ_q w_q ∇f(θ_s + t_q Δθ)·Δθ
        against the exact integral f(θ_s + Δθ) − f(θ_s) (two forwards per segment), absolute
        values added. The terms of a segment sum to the first, so |gap| ≤ quadrature_error up
        to float rounding, for any rule and model (ReLU kinks included). And the rounding
        term, part of the sum: what float32 rounding of the updates left out of the others
        (a warning says when it is too large to be rounding)."""
        sums = self.table.group_by("test_id").aggregate([("value", "sum")]).sort_by("test_id")
        total = np.zeros(len(self.f_initial))
        total[sums.column("test_id").to_numpy()] = sums.column("value_sum").to_numpy()
        delta = self.f_final - self.f_initial
        return pa.table({"test_id": np.arange(len(total), dtype=np.int32),
                         "f_initial": self.f_initial, "f_final": self.f_final,
                         "delta_f": delta, "sum_terms": total, "gap": total - delta,
                         "relative_gap": np.abs(total - delta) / (np.abs(delta) + 1e-12),
                         "quadrature_error": self.quadrature_error,
                         "rounding": (self.rounding if self.rounding is not None
                                      else np.zeros(len(total)))})

    def top(self, axis: str = "example", test: int = 0, n: int = 10, order: str = "desc"
            ) -> pa.Table:
        """The n entries of `axis` with the largest ("desc"), smallest ("asc") or largest
        absolute ("abs") data influence on test point `test`, or the most "helpful" /
        "harmful" ones (target loss or margin). A value is the change of f the entry's
        training caused; the `effect` column says what it did (for target="loss" a negative
        value lowered the loss: helpful)."""
        if axis not in self.by:
            raise ValueError(f"axis {axis!r} was summed out; analyse with by=(..., {axis!r})")
        if order not in ORDERS:
            raise ValueError(f"order={order!r}: one of {', '.join(ORDERS)}")
        if not 0 <= test < len(self.f_initial):
            raise ValueError(f"test={test}: this analysis has test points 0 to "
                             f"{len(self.f_initial) - 1}")
        target = targets.target_of(self.table)
        helps = HELPFUL_SIGN.get(target)
        if order in ("helpful", "harmful") and helps is None:
            raise ValueError(f"order={order!r} needs target 'loss' or 'margin' (this analysis "
                             f"has target {target!r}); use 'desc' (raised f most) or 'asc'")
        rows = self.table.filter(pc.and_(pc.equal(self.table["test_id"], test),
                                         pc.equal(self.table["term"], "data")))
        summed = rows.group_by(COLUMNS[axis]).aggregate([("value", "sum")]).rename_columns(
            [axis, "value"])
        if order in ("helpful", "harmful"):  # only entries of that sign, strongest first
            rising = (helps > 0) == (order == "helpful")
            summed = summed.filter(pc.greater(summed["value"], 0) if rising
                                   else pc.less(summed["value"], 0))
            order = "desc" if rising else "asc"
        key = {"desc": pc.negate(summed["value"]), "asc": summed["value"],
               "abs": pc.negate(pc.abs(summed["value"]))}[order]
        chosen = summed.take(pc.sort_indices(key)[:n])
        return chosen.append_column("effect", pa.array(
            [_effect(v, target, helps) for v in chosen["value"].to_pylist()], pa.string()))


def _constant(run: Run, names: tuple[str, ...]) -> None:
    """The recursion assumes momentum / betas stay fixed within a param group."""
    hp = run.hparams()
    for name in names:
        values = hp[name]
        if not np.allclose(values, values[:1], equal_nan=True):
            raise NotImplementedError(f"{name} changes during the run; the path-kernel "
                                      "recursion needs it constant within a param group")


def path_kernel(run: Run, model_fn: Callable[[], torch.nn.Module], test_set,
                target: targets.Target = "loss", by: tuple[str, ...] = ("example",),
                quadrature: int | str = ADAPTIVE, stride: int | str | None = None,
                similarity: bool = False,
                stages: dict[str, range] | None = None, dtype: torch.dtype = torch.float64,
                progress: bool = True, tol: tuple[float, float] = (1e-4, 1e-6),
                max_nodes: int = MAX_NODES
                ) -> PathKernelResult:
    """Influence of every recorded training example, step and parameter on f at test points.

    `model_fn()` builds the architecture (parameters come from the run); `test_set` is a tuple
    (inputs, labels) or a Dataset of pairs; `target` is "loss", "margin", "logit:K" or a callable
    f(model, inputs, labels). `by` chooses the axes kept (any of example, step, stage, param,
    layer; a stage is a recorded rec.stage() name, a layer a parameter's module); the rest are
    summed while streaming. Per-example terms need Full capture (exact) or Project capture
    (projected: an unbiased estimate, the residual term absorbs its error so totals stay exact).
    `quadrature`: "adaptive" (the default): Gauss–Legendre q = 2, and where a test point
    misses its share of `tol` = (rtol, atol), i.e. rtol·|f(θ_N) − f(θ_0)| + atol per test
    point over the run, its own partition of the segment, cut at its ReLU kinks and bisected,
    up to `max_nodes` gradient evaluations per test point and segment (see
    quadrature.Integrator); where two nodes meet the share (smooth models) it costs what the
    fixed rule does. Or a fixed rule: Gauss–Legendre nodes per segment (an int),
    "midpoint:K" or "left".
    `stride=K` integrates one ḡ per segment of K steps, shared by its steps: completeness stays
    exact, only the credit within a segment is approximated (K = 1, the default, is exact).
    `stride="auto"` grows segments (doubling up to 32 steps) while q = 2 over the merged steps
    meets their share of `tol` for every test point, and halves them where it does not.
    `similarity=True` adds, per layer, the similarity of test points from the model's
    perspective (METHODS.md §2): Sim_ℓ(x, x') = Σ_s A_s(x)_ℓ · ∇ℓ(x'; θ_s)_ℓ, the path kernel
    restricted to layer ℓ with x' as a training example, and its cosine-style normalisation,
    per stage as well as over the whole run. `stages` ({name: range of steps}) replaces the
    recorded rec.stage() names, for the stage axis and the similarity, with analysis-time ones.
    """
    unknown = set(by) - set(AXES)
    if unknown:
        raise ValueError(f"by={by!r}: unknown axes {sorted(unknown)}; choose from {AXES}")
    if run.n_steps == 0:
        raise ValueError(f"{run.dir} has no committed steps to analyse")
    automatic = stride == AUTO
    stride = 1 if automatic else stride or 1
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride={stride!r}: use a positive number of steps per segment or "
                         f"{AUTO!r}")
    run.require_trajectory("the path kernel (θ_s and the consumed gradient of every step)")
    kind = run.optimizer["kind"]
    _constant(run, ("momentum", "dampening") if kind == "sgd" else ("beta1", "beta2", "eps"))
    model = run.build_model(model_fn, dtype).eval()
    inputs, labels = targets.as_tensors(test_set, dtype)
    names = run.param_names
    theta_0 = {n: v.to(dtype) for n, v in run.reconstruct(0).items()}
    final = run.reconstruct(run.n_steps)  # θ_N in the training dtype, whose ε bounds rounding
    eps = max(torch.finfo(v.dtype).eps for v in final.values())
    theta_final = {n: v.to(dtype) for n, v in final.items()}
    f_initial = f_at(model, theta_0, inputs, labels, target)
    f_final = f_at(model, theta_final, inputs, labels, target)
    integrator = Integrator(model, names, inputs, labels, target, quadrature,
                            tolerance=tol[0] * np.abs(f_final - f_initial) + tol[1],
                            steps=run.n_steps, max_nodes=max_nodes)

    stored = {"length": stride, "theta": torch.zeros(len(labels), dtype=dtype)}

    def forward(first: int, stop: int, theta_stop: dict[str, torch.Tensor]):
        """θ_s and ḡ_s for steps [first, stop); `first` starts a segment. Each segment runs
        along the chord between the θ its ends have (θ_stop: the next block's first), so
        the segments' exact integrals telescope to f(θ_N) − f(θ_0) and the measured error
        bounds the gap; summing the recorded Δθ instead would drift from θ by rounding."""
        gbars, thetas, gaps = [], [], []
        for view in iter_steps(run, first, stop):
            thetas.append({n: view.theta[n].to(dtype, copy=True) for n in names})
            gaps.append((view.gap, view.buffer_gap))
        thetas.append(theta_stop)
        start, length, grow = first, stored["length"], True
        while start < stop:
            end = min(start + length, stop)
            begin, finish = thetas[start - first], thetas[end - first]
            gbar = integrator.segment(start, begin, {n: finish[n] - begin[n] for n in names},
                                      steps=end - start, trial=automatic and end - start > 1)
            if gbar is None:  # stride="auto": the merged steps miss their share; halve, and
                length, grow = max(1, length // 2), False  # don't double right after
                continue
            gbars.extend([gbar] * (end - start))
            for n in names:  # Σ_s |ḡ_s|·|θ_{s+1}|: what storing θ rounded can move f by
                moved = sum(thetas[j - first][n].abs() for j in range(start + 1, end + 1))
                stored["theta"] += gbar[n].abs().flatten(1) @ moved.reshape(-1)
            start = end
            if automatic:
                length, grow = (min(2 * length, AUTO_STRIDE) if grow else length), True
        stored["length"] = length  # the next block (earlier steps) starts from it
        return gbars, thetas[:-1], gaps

    # Blocks from the last to the first: each block's ḡ is computed forward from θ at its
    # start, then consumed by the backward recursion, whose state carries into the previous
    # block. Every ḡ is computed once; memory holds one block, not the whole run.
    step_stages = step_stage_names(run, stages)
    rows = InfluenceRows(tuple(by), len(labels), run.examples.column("example_id").to_numpy(),
                         step_stages,
                         dict(zip(run.param_names, run.params.column("module").to_pylist())))
    train_gradient = ((lambda theta: targets.gradients(model, theta, inputs, labels, "loss"))
                      if similarity else None)
    recursion = _Recursion(run, kind, len(labels), dtype, rows, train_gradient, step_stages)
    # one ḡ per segment: a block of `stride`-step segments holds 1/stride of a ḡ per step (the
    # similarity's training gradients are made SIMILARITY_STEPS at a time as the block is read)
    per_step = len(labels) * sum(v.numel() for v in theta_0.values()) * 8
    steps = BLOCK_STEPS or min(run.meta["steps_per_chunk"],
                               max(1, GBAR_BUDGET_BYTES // per_step) * stride)
    block = max(1, steps // stride) * stride
    with progress_bar(total=run.n_steps, progress=progress, desc="path-kernel influences",
              unit="step") as bar:
        theta_stop = theta_final
        for first in reversed(range(0, run.n_steps, block)):
            stop = min(first + block, run.n_steps)
            gbars, thetas, gaps = forward(first, stop, theta_stop)
            recursion.steps(first, gbars, thetas, gaps)
            theta_stop = thetas[0]
            held = len({id(g) for g in gbars}) * per_step
            del gbars, thetas, gaps
            if held >= TRIM_BYTES:
                release_freed_memory()
            bar.update(stop - first)
    recursion.carry_in()
    rounding, starts = recursion.rounding(integrator.along), sorted(integrator.nodes)
    result = PathKernelResult(targets.with_target(rows.table(), target), f_initial, f_final,
                              tuple(by), integrator.error.cpu().numpy(),
                              recursion.similarity_table() if similarity else None,
                              nodes=np.array([integrator.nodes[s] for s in starts]),
                              rounding=rounding.cpu().numpy(),
                              segments=np.array(starts, dtype=np.int64),
                              rounding_scale=(eps * (recursion.scale + stored["theta"]))
                              .cpu().numpy())
    _warn_where_incomplete(result, quadrature, tol, max_nodes)
    return result


ROUNDING_WARN = 100  # rounding term over rounding_scale beyond which rounding can't explain it


def _warn_where_incomplete(result: PathKernelResult, quadrature, tol: tuple[float, float],
                           max_nodes: int) -> None:
    """Say so when the adaptive rule ran out of budget on some test points, or when the
    rounding term is larger than rounding can be (the terms then miss part of the updates)."""
    delta = np.abs(result.f_final - result.f_initial)
    if quadrature == ADAPTIVE:
        over = result.quadrature_error > tol[0] * delta + tol[1]
        if over.any():
            worst = float(np.max(result.quadrature_error / (delta + 1e-300)))
            warnings.warn(f"quadrature='adaptive' left {int(over.sum())} of {len(over)} test "
                          f"points above tol={tol} (measured error up to {worst:.1e} of Δf): "
                          f"raise max_nodes (now {max_nodes}), lower stride or analyse in float64; "
                          "completeness() gives each one's gap and bound", stacklevel=3)
    ratio = np.abs(result.rounding) / np.maximum(result.rounding_scale, 1e-300)
    if (ratio > ROUNDING_WARN).any():
        warnings.warn(f"the rounding term reaches {ratio.max():.0f}x what rounding in the "
                      "training dtype can produce: the recorded trajectory "
                      "and the optimizer's recursion disagree (hyperparameters or parameters "
                      "changed outside the optimizer?); `attrib verify` checks the run",
                      stacklevel=3)


def f_at(model: torch.nn.Module, params: dict[str, torch.Tensor], inputs, labels,
         target: targets.Target) -> np.ndarray:
    with torch.no_grad():
        return targets.evaluate(model, params, inputs, labels, target).cpu().numpy()


def step_stage_names(run: Run, stages: dict[str, range] | None) -> list[str | None]:
    """Each step's stage: the recorded name, or the analysis-time `stages` (None outside)."""
    if stages is None:
        return run.steps.sort_by("step").column("stage").to_pylist()
    names: list[str | None] = [None] * run.n_steps
    for name, steps in stages.items():
        if steps.start < 0 or steps.stop > run.n_steps:
            raise ValueError(f"stage {name!r} ({steps.start}..{steps.stop - 1}) lies outside the "
                             f"run's {run.n_steps} committed steps")
        for step in steps:
            names[step] = name
    return names


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Each step allocates several ~MB tensors; glibc's adaptive mmap threshold keeps such sizes
    on heap arenas that fragment, so without this the analysis of a 96-step benchmark run
    peaked at 3.5 GB instead of 2.0 GB (measured in benchmarks/analysis_throughput.py's setup).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Recursion:
    """METHODS.md §2's backward recursion, run over blocks of steps from last to first.

    Per parameter it holds Q (Adam: Σ_{s≥r} β1^{s−r} (−η_s / ((1−β1^{t_s}) D_s)) ḡ_s) or B (SGD:
    Σ_{s≥r} μ^{s−r} (−η_s) ḡ_s), one (n_test, *shape) tensor, and emits each step's terms.
    """

    def __init__(self, run: Run, kind: str, n_test: int, dtype, rows: InfluenceRows,
                 train_gradient: Callable | None = None,
                 step_stages: list[str | None] | None = None) -> None:
        self.run, self.kind, self.dtype, self.rows = run, kind, dtype, rows
        self.train_gradient = train_gradient
        self.layers = run.params.column("module").to_pylist()
        named = list(dict.fromkeys(x for x in (step_stages or []) if x is not None))
        # per stage only when there are several (one stage would repeat the whole run)
        self.step_stages = step_stages if len(named) > 1 else [None] * run.n_steps
        # (layer, stage) → kernel; stage None is the whole run
        self.kernel = {(layer, stage): torch.zeros(n_test, n_test, dtype=dtype)
                       for layer in dict.fromkeys(self.layers)
                       for stage in [None, *(named if len(named) > 1 else [])]}
        self.names = run.param_names
        self.groups = run.params.column("group").to_pylist()
        self.shapes = [tuple(s) for s in run.params.column("shape").to_pylist()]
        self.nesterov = [g.get("nesterov", False) for g in run.optimizer["groups"]]
        self.hp, self.alpha = run.hparams(), run.clip_factors()
        self.active, self.counts = run.active(), run.step_counts()
        self.carry = run.initial_state()
        examples = run.examples.sort_by([("step", "ascending"), ("row", "ascending")])
        self.example_steps = examples.column("step").to_numpy()
        self.example_ids = examples.column("example_id").to_numpy()
        self.first_active = [int(np.argmax(self.active[:, j])) if self.active[:, j].any()
                             else -1 for j in range(len(self.names))]
        self.memory = {n: torch.zeros((n_test, *shape), dtype=dtype)
                       for n, shape in zip(self.names, self.shapes)}
        self.block: dict = {}  # the current block's stored arrays (see steps)
        # per parameter: the sum of every term emitted so far (see rounding); per test point:
        # the sum of their sizes
        self.accounted = {n: torch.zeros(n_test, dtype=dtype) for n in self.names}
        self.scale = torch.zeros(n_test, dtype=dtype)

    def steps(self, first: int, gbars: list, thetas: list, gaps: list) -> None:
        """Process steps first + len(gbars) − 1 down to first.

        Each stored array of the block is read once (a per-step read decompresses whole chunks
        again and again) and converted to the analysis dtype once: per-step conversions made
        ~10 MB temporaries every step, which glibc's adaptive mmap threshold moved onto heap
        arenas that fragment (peak RSS 3.5 GB vs 0.9 GB, measured on the benchmark run).
        """
        stop = first + len(gbars)
        run, dtype = self.run, self.dtype
        self.block = {
            "grads": {n: run.grads(n, first, stop).to(dtype) for n in self.names},
            "contrib": {n: run.example_rows(n, first, stop).to(dtype) for n in run.captured},
            "v": ({n: run.state(n, "exp_avg_sq", first, stop).to(dtype) for n in self.names}
                  if self.kind != "sgd" else {}),
        }
        at_once = self._similarity_steps()
        lo, chunk = None, []  # the training gradients of block steps lo, lo + 1, …
        for s in range(stop - 1, first - 1, -1):
            i = s - first
            if lo != i - i % at_once:  # the loop entered the next chunk (backwards)
                lo = i - i % at_once
                chunk = self._training_gradients(thetas[lo: lo + at_once])
            theta_gaps, buffer_gaps = gaps[s - first]
            for name, gap in buffer_gaps.items():  # carried into steps s+1…: like a carry-in
                if s + 1 < run.n_steps:
                    j = self.names.index(name)
                    self._emit("replay", self._buffer_term(j, s + 1, gap), s, name)
            self.step(s, i, gbars[i], thetas[i], chunk[i - lo])
            for name, gap in theta_gaps.items():  # ḡ_s · (stored − replayed θ_{s+1})
                g = gbars[s - first][name]
                self._emit("replay", g.reshape(g.shape[0], -1) @ gap.reshape(-1).to(dtype),
                           s, name)
        self.block = {}

    def _similarity_steps(self) -> int:
        """Steps whose training gradients one vmapped call makes (within the budget)."""
        per_step = sum(t.numel() for t in self.memory.values()) * self.dtype.itemsize
        return max(1, min(SIMILARITY_STEPS, SIMILARITY_BUDGET_BYTES // max(1, per_step)))

    def _training_gradients(self, thetas: list[dict]) -> list[dict | None]:
        """Per step of `thetas`, the test points' gradients as training examples at θ_s (the
        similarity's ∇ℓ(x'; θ_s)), None without similarity: several steps per vmapped call,
        whose batched products may round differently from one call per step (1e-15 relative
        in float64, 1e-6 in float32)."""
        if self.train_gradient is None:
            return [None] * len(thetas)
        at_once = self._similarity_steps()
        out: list[dict | None] = []
        for lo in range(0, len(thetas), at_once):
            part = [{n: t.to(self.dtype) for n, t in theta.items()}
                    for theta in thetas[lo: lo + at_once]]
            try:
                stacked = vmap(self.train_gradient)({n: torch.stack([p[n] for p in part])
                                                     for n in part[0]})
            except RuntimeError:  # no batching rule (a recurrent kernel): step by step
                out += [self.train_gradient(theta) for theta in part]
                continue
            out += [{n: v[k] for n, v in stacked.items()} for k in range(len(part))]
        return out

    def step(self, s: int, i: int, gbar: dict, thetas: dict, as_training: dict | None
             ) -> None:
        """Step s, the i-th of the loaded block; `as_training`: see _training_gradients."""
        run, rows, dtype = self.run, self.rows, self.dtype
        lo, hi = np.searchsorted(self.example_steps, [s, s + 1])
        ids = self.example_ids[lo:hi]
        stored = {n: c[i, : len(ids)] for n, c in self.block["contrib"].items()}
        data = StepData(rows, s, ids)
        for j, name in enumerate(self.names):
            if not self.active[s, j]:
                continue  # the optimizer skipped it: no update, no state change
            group = self.groups[j]
            h = {k: float(v[s, group]) for k, v in self.hp.items()}
            g, theta = gbar[name], thetas[name]
            if self.kind == "sgd":
                mu = h["momentum"]
                self.memory[name] = -h["lr"] * g + mu * self.memory[name]
                first = (s == self.first_active[j]
                         and "momentum_buffer" not in self.carry.get(name, {}))
                w = momentum_intake(h, first)
                a = (-h["lr"] * g + mu * w * self.memory[name] if self.nesterov[group]
                     else w * self.memory[name])
            else:
                t = int(self.counts[s, j])
                v = self.block["v"][name][i]
                self.memory[name] = adam_update_scale(h, v, t) * g \
                    + h["beta1"] * self.memory[name]
                a = (1 - h["beta1"]) * self.memory[name]
            flat_a = a.reshape(a.shape[0], -1)
            if as_training is not None:
                product = flat_a @ as_training[name].reshape(flat_a.shape[0], -1).T
                self.kernel[(self.layers[j], None)] += product
                if self.step_stages[s] is not None:
                    self.kernel[(self.layers[j], self.step_stages[s])] += product
            if h["weight_decay"]:
                if self.kind == "adamw":  # decoupled: −η λ θ_s enters Δθ_s directly
                    reg = -h["lr"] * h["weight_decay"] * (g.reshape(g.shape[0], -1)
                                                          @ theta.reshape(-1))
                else:  # coupled L2: λθ_s is part of the gradient d_s
                    reg = h["weight_decay"] * (flat_a @ theta.reshape(-1))
                self._emit("regularization", reg, s, name)
            consumed = self.block["grads"][name][i].reshape(-1)
            total = flat_a @ consumed
            self.accounted[name] += total  # data + residual
            self.scale += total.abs()
            influence = data_influence(run, name, self.shapes[j], stored.get(name), flat_a,
                                        float(self.alpha[s]), dtype)
            if influence is not None:
                total = total - influence.sum(0)
                data.add(name, influence)
            rows.add("residual", total, s, name)
        data.close()

    def similarity_table(self) -> pa.Table:
        """(layer, stage, test_id, other_id, value, normalized): stage null over the whole run;
        normalized = value / √(|value(x,x)| |value(x',x')|)."""
        parts = []
        for (layer, stage), kernel in self.kernel.items():
            n = kernel.shape[0]
            scale = kernel.diagonal().abs().sqrt()
            normalized = kernel / (scale[:, None] * scale[None, :]).clamp_min(1e-300)
            parts.append(pa.table({
                "layer": pa.array([layer or "(model)"] * (n * n), pa.string()),
                "stage": pa.array([stage] * (n * n), pa.string()),
                "test_id": np.repeat(np.arange(n, dtype=np.int32), n),
                "other_id": np.tile(np.arange(n, dtype=np.int32), n),
                "value": owned(kernel.reshape(-1)),
                "normalized": owned(normalized.reshape(-1))}))
        return pa.concat_tables(parts)

    def carry_in(self) -> None:
        """Optimizer state present before step 0, propagated like one more gradient."""
        for j, name in enumerate(self.names):
            key = "momentum_buffer" if self.kind == "sgd" else "exp_avg"
            buffer = self.carry.get(name, {}).get(key)
            if buffer is None or self.first_active[j] < 0:
                continue
            self._emit("carry_in", self._buffer_term(j, self.first_active[j], buffer), None, name)

    def rounding(self, along: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the terms leave of Σ_s ḡ_s·Δθ_s, per parameter: the terms expand each update
        by the optimizer's formula in the analysis dtype, while θ moved by that update rounded
        in the training dtype. Where AdamW's decay and its gradient step nearly cancel (near
        zero loss, at weight-decay equilibrium), float32 rounding of each is a large part of
        Δθ: 1e-3 of Δf on the demo run. Emitted without a step, like carry_in; returns its
        sum over parameters per test point."""
        total = torch.zeros_like(self.scale)
        for name in self.names:
            if name in along:
                rounding = along[name] - self.accounted[name]
                self.rows.add("rounding", rounding, None, name)
                total += rounding
        return total

    def _emit(self, term: str, values: torch.Tensor, step: int | None, name: str) -> None:
        self.rows.add(term, values, step, name)
        self.accounted[name] += values
        self.scale += values.abs()

    def _buffer_term(self, j: int, step: int, buffer: torch.Tensor) -> torch.Tensor:
        """The effect on f of a momentum buffer / first moment held before `step`, through
        every later update: the recursion's memory (all steps ≥ step, processed) times the
        buffer, times the factor the first update applies to it (μ, μ² with Nesterov, β1)."""
        h = {k: float(v[step, self.groups[j]]) for k, v in self.hp.items()}
        factor = (h["momentum"] ** (2 if self.nesterov[self.groups[j]] else 1)
                  if self.kind == "sgd" else h["beta1"])
        memory = self.memory[self.names[j]]
        return factor * (memory.reshape(memory.shape[0], -1) @ buffer.to(self.dtype).reshape(-1))
