"""The recorded training batches rebuilt from the user's data: the losses that replay re-runs
and the linear-response sweep differentiates (METHODS.md §4).

A step's loss is the sum over its micro-batches of weight × loss_fn(model(x), y), the examples
and micro-batches as the `examples` table recorded them, the generator states as the `rng`
table recorded them. Whether that is the loss the user trained on is checked, not assumed:
`check_gradients` compares its gradient at the reconstructed θ_s with the recorded G_s.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
from torch.func import functional_call

from attrib.analyzer import targets
from attrib.analyzer.run import Run
from attrib.analyzer.trajectory import TrajectoryError
from attrib.recorder.rng import restore_states, stochastic_modules

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GRADIENT_TOLERANCE = 1e-3  # relative: recorded float32 gradients vs a float64 recomputation
# Near zero loss a float32 gradient is partly rounding (e.g. softmax's p − y with p ≈ 1): the
# check also allows this many times the gap between float32 and float64 recomputations. The
# recorded gradient's own rounding is about one such gap (√2 of one when its kernels differ),
# while a loss 1% off at 0.1% rounding must still be refused.
ROUNDING_ALLOWANCE = 3.0
ROUNDING_WARNING = 1e-2  # warn when rounding is this fraction of a recorded gradient


class ReplayError(ValueError):
    """The run, or the data and loss given for it, can't reproduce the recorded training."""


def default_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for integer labels, mean squared error otherwise."""
    return targets.per_example(output, labels, "loss").mean()


@dataclass
class MicroBatch:
    ids: np.ndarray
    weight: float  # its loss's factor in the step's loss
    rng: list[tuple[str, bytes]] | None  # generator states before its forward


class TrainingBatches:
    """Per step, the micro-batches of the recorded training, with their data and losses.

    `train_set[i]` (or row i of an (inputs, labels) pair) must be the example with
    example_id i. `accumulation` says how micro-batch losses made the step's loss: "mean"
    (each divided by their number: `(loss / k).backward()`) or "sum".
    """

    def __init__(self, run: Run, model: torch.nn.Module, train_set,
                 loss_fn: LossFn | None = None, accumulation: str = "mean",
                 dtype: torch.dtype = torch.float64) -> None:
        if accumulation not in ("mean", "sum"):
            raise ValueError(f"accumulation={accumulation!r}: use 'mean' or 'sum'")
        self.run, self.model, self.dtype = run, model, dtype
        missing = sorted(set(run.param_names) - dict(model.named_parameters()).keys())
        if missing:
            raise ReplayError(f"model_fn() builds a model without the recorded parameters "
                              f"{missing}; pass the factory of the architecture you trained")
        self.loss_fn = loss_fn or default_loss
        self.accumulation = accumulation
        self.inputs, self.labels = targets.as_tensors(train_set, dtype)
        examples = run.examples
        if examples.num_rows == 0:
            raise ReplayError(f"{run.dir} recorded no example ids (rec.examples(ids)); replaying "
                              "its training needs them")
        # DDP: each rank ran its own forwards (own dropout masks, own batch-norm statistics),
        # rank r's examples being rows [r·B, (r+1)·B); the step's gradient is the ranks' mean
        # (a DDP run recorded without per-example capture before 2026-11-29 has no row
        # layout, examples_per_step 0: its ranks' examples replay as one forward)
        per_step = int(run.meta.get("examples_per_step") or 0)
        self.world = int((run.meta.get("distributed") or {}).get("world_size", 1)) \
            if per_step else 1
        ranks = examples.column("row").to_numpy() // (per_step // self.world) \
            if self.world > 1 else np.zeros(examples.num_rows, np.int64)
        order = np.lexsort((examples.column("slot").to_numpy(),
                            examples.column("micro_batch").to_numpy(), ranks,
                            examples.column("step").to_numpy()))
        self._steps = examples.column("step").to_numpy()[order]
        self._ranks = ranks[order]
        self._micro = examples.column("micro_batch").to_numpy()[order]
        self._ids = examples.column("example_id").to_numpy()[order]
        if self._ids.min() < 0 or self._ids.max() >= len(self.labels):
            raise ReplayError(f"example ids run from {self._ids.min()} to {self._ids.max()} but "
                              f"the training set has {len(self.labels)} examples: pass the "
                              "training set whose i-th item is the example with example_id i")
        self.stochastic = stochastic_modules(model)
        self._rng = self._rng_states(run)

    def _rng_states(self, run: Run) -> dict[tuple[int, int], list[tuple[str, bytes]]]:
        if not self.stochastic:
            return {}
        table = run.table("rng")
        if table.num_rows == 0:
            raise ReplayError(
                f"the model draws random numbers in training mode ({', '.join(self.stochastic)})"
                f" but {run.dir} holds no generator states, so its masks can't be replayed: "
                "record with Recorder(..., rng=True), or build the model without dropout")
        ranks = table.column("rank").fill_null(0).to_pylist()
        if self.world > 1 and set(ranks) != set(range(self.world)):
            raise ReplayError(
                f"the model draws random numbers in training mode ({', '.join(self.stochastic)})"
                f" and {run.dir} was recorded under DDP, where each rank draws its own masks, "
                f"but it holds generator states of ranks {sorted(set(ranks))} only (recorded "
                "by an attrib before 2026-11-29). Use method='frozen' or 'path', or the path "
                "kernel, which need no replay")
        states: dict[tuple[int, int, int], list[tuple[str, bytes]]] = {}
        for rank, step, forward, device, state in zip(ranks, *(
                table.column(c).to_pylist() for c in ("step", "forward", "device", "state"))):
            states.setdefault((rank, step, forward), []).append((device, state))
        return states

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """The step's forwards: each rank's micro-batches (one rank outside DDP), weighted so
        their losses add up to the step's loss."""
        lo, hi = np.searchsorted(self._steps, [step, step + 1])
        ranks, micro, ids = self._ranks[lo:hi], self._micro[lo:hi], self._ids[lo:hi]
        batches = []
        for rank in np.unique(ranks).tolist():
            mine = ranks == rank
            indices = np.unique(micro[mine])
            weight = (1.0 / len(indices) if self.accumulation == "mean" else 1.0) / self.world
            for k, m in enumerate(indices):
                rng = None
                if self.stochastic:
                    rng = self._rng.get((rank, step, k))
                    if rng is None:
                        raise ReplayError(
                            f"step {step} has no generator state for micro-batch {k}"
                            + (f" of rank {rank}" if self.world > 1 else "")
                            + ": the recorded forwards don't match its micro-batches")
                batches.append(MicroBatch(ids[mine & (micro == m)], weight, rng))
        return batches

    def recast(self, dtype: torch.dtype) -> TrainingBatches:
        """The same batches computed in `dtype` (the recording's float32, say)."""
        other = copy.copy(self)
        other.dtype, other.model = dtype, copy.deepcopy(self.model).to(dtype)
        if self.inputs.is_floating_point():
            other.inputs = self.inputs.to(dtype)
        return other

    def micro_loss(self, params: dict[str, torch.Tensor], batch: MicroBatch) -> torch.Tensor:
        """weight × loss_fn(model(x), y) at `params`, with the recorded generator state."""
        if batch.rng is not None:
            restore_states(batch.rng, self.inputs.device)
        ids = torch.from_numpy(batch.ids)
        output = functional_call(self.model, params, (self.inputs[ids],), strict=False)
        return batch.weight * self.loss_fn(output, self.labels[ids])

    def gradient(self, params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """∇ of the step's loss at `params` (G_s, before clipping, when params = θ_s)."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        total = sum(self.micro_loss(leaves, b) for b in self.micro_batches(step))
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g
                for (n, p), g in zip(leaves.items(), grads)}


def check_gradients(run: Run, batches: TrainingBatches, steps: list[int],
                    tolerance: float = GRADIENT_TOLERANCE) -> float:
    """Largest relative error ‖∇L_s(θ_s) − G_s‖ / ‖G_s‖ over `steps`; raises ReplayError
    naming the likely causes when the given data and loss don't reproduce the recording.

    The error allowed is `tolerance` relative, plus what float32 rounding explains:
    the same gradient recomputed in the recorded precision measures it. Where rounding is a
    noticeable part of G_s (loss near zero), a warning says so: attributions there rest on
    gradients that are partly rounding noise."""
    try:
        run.require_trajectory("replaying training (the stage estimators)")
    except TrajectoryError as e:
        raise ReplayError(str(e)) from None
    worst, noisiest = 0.0, (0.0, 0)
    alphas = run.clip_factors()
    recorded_dtype = getattr(torch, run.params.column("dtype")[0].as_py())
    # the same batches in the recorded precision: what rounding alone moves G_s by
    low = batches.recast(recorded_dtype) if recorded_dtype != batches.dtype else None
    for step in steps:
        stored = run.reconstruct(step)
        theta = {n: t.to(batches.dtype) for n, t in stored.items()}
        got = batches.gradient(theta, step)
        recorded = {n: run.grads(n, step, step + 1)[0].to(batches.dtype) / alphas[step]
                    for n in run.param_names}
        scale = float(_norm(recorded.values())) or 1e-30
        error = float(_norm(got[n] - recorded[n] for n in recorded))
        rounding = 0.0 if low is None else float(_norm(
            g.to(batches.dtype) - got[n] for n, g in low.gradient(stored, step).items()))
        worst = max(worst, error / scale)
        noisiest = max(noisiest, (rounding / scale, step))
        if error > tolerance * scale + ROUNDING_ALLOWANCE * rounding:
            raise ReplayError(
                f"the loss rebuilt from the training set doesn't reproduce the gradient recorded "
                f"at step {step} (relative error {error / scale:.2g}, of which float32 rounding "
                f"explains {rounding / scale:.2g}). Check that train_set[i] is "
                "example i, that loss_fn is the loss you trained with (reduction mean or sum), "
                "that accumulation= matches how micro-batch losses were combined, and that "
                "the model has no unrecorded randomness (augmentation, dropout without rng)")
    if noisiest[0] > ROUNDING_WARNING:
        warnings.warn(
            f"attrib: at step {noisiest[1]} float32 rounding is {noisiest[0]:.1%} of the recorded "
            f"gradient (the loss there is {_loss_at(run, noisiest[1])}): the training has run "
            "into float32's resolution, so effects estimated from those steps partly measure "
            "rounding. Analyze the steps before that, or train in float64", stacklevel=3)
    return worst


DATA_CHECK_TOLERANCE = 2e-2  # relative gradient error a training set may show (see below)


def check_training_set(run: Run, model_fn: Callable[[], torch.nn.Module], train_set,
                       method: str, dtype: torch.dtype = torch.float64) -> None:
    """Refuse a training set that doesn't reproduce the gradients recorded at a few steps
    (the first, middle and last with example ids: wrong labels, examples in another order)
    before `method` scores its examples by their loss gradients, which it does with the
    default loss (cross-entropy for integer labels, else MSE). The tolerance,
    DATA_CHECK_TOLERANCE, is loose (mixed precision moves a gradient by ~0.3%, wrong labels by
    ~100%): this guards the data, check_gradients' default guards a replay. A step's gradient
    can't see the order of the examples inside its batch; stored per-example rows can
    (_check_example_rows), so only a run without them lets a permutation within one batch
    (any permutation, under full-batch training) pass. Skipped where the run can't tell: no
    example ids or no gradients recorded, or random masks without generator states;
    micro-batch losses may have been averaged or summed. A training set shorter than the
    recorded example ids (its first n examples, scored alone) is not checked."""
    if run.n_steps == 0 or run.examples.num_rows == 0:
        return
    try:
        run.require_trajectory(f"checking the training set given to {method}")
    except TrajectoryError:
        return
    model = run.build_model(model_fn, dtype).train()
    if stochastic_modules(model) and run.table("rng").num_rows == 0:
        return
    inputs, labels = targets.as_tensors(train_set, dtype)
    if int(pc.max(run.examples.column("example_id")).as_py()) >= len(labels):
        return  # a prefix of the training set, scored on its own: no step to check it on
    batches = TrainingBatches(run, model, (inputs, labels), dtype=dtype)
    with_ids = np.unique(run.examples.column("step").to_numpy())
    steps = sorted({int(with_ids[0]), int(with_ids[len(with_ids) // 2]), int(with_ids[-1])})
    several = any(len(batches.micro_batches(s)) > 1 for s in steps)
    failures = []
    for accumulation in ("mean", "sum") if several else ("mean",):
        batches.accumulation = accumulation
        try:
            check_gradients(run, batches, steps, DATA_CHECK_TOLERANCE)
            break
        except ReplayError as e:
            failures.append(str(e))
    else:
        raise ReplayError(f"{method}: {failures[0]}. (If you trained with another loss than "
                          f"{method}'s, e.g. label smoothing, pass check_data=False)")
    _check_example_rows(run, model, inputs, labels, steps[0], method, dtype)


ROW_AGREEMENT = 0.99  # cosine of an example's stored row with its recomputed loss gradient
EXAMPLES_CHECKED = 16
ROW_CHECK_BYTES = 256 << 20  # per-example gradients the row check may hold at once


def _check_example_rows(run: Run, model: torch.nn.Module, inputs: torch.Tensor,
                        labels: torch.Tensor, step: int, method: str, dtype: torch.dtype
                        ) -> None:
    """Each of a step's first EXAMPLES_CHECKED examples' stored per-example row against the
    loss gradient of train_set[its id] (in the rows' space; by cosine, since micro-batch
    weights and the batch mean only scale a row): this sees a reordering inside a batch,
    which leaves the batch's gradient unchanged. Skipped for models whose one per-example
    gradient in float64 exceeds ROW_CHECK_BYTES, without exact or projected rows
    (rank-limited factors only approximate a row), for a step whose rows were dropped, and
    for models whose examples' gradients aren't separable (batch norm) or random."""
    names = [n for n in run.captured
             if (run.capture[n].get("factored") or {}).get("rank") is None]
    separable = not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        for m in model.modules()) and not stochastic_modules(model)
    if not names or not separable or step in run.dropped_steps():
        return
    one = 8 * sum(math.prod(shape) for shape in run.param_shapes.values())  # float64 bytes
    if one > ROW_CHECK_BYTES:  # a large model: the gradient check above has to do
        return
    ids, rows = run.contributions(step)
    ids = ids[: min(EXAMPLES_CHECKED, ROW_CHECK_BYTES // one)]
    theta = {n: t.to(dtype) for n, t in run.reconstruct(step).items()}  # inputs may be ids
    grads = targets.gradients(model, theta, inputs[ids], labels[ids], "loss")
    got = torch.cat([run.in_row_space(n, grads[n]).double() for n in names], dim=1)
    want = torch.cat([rows[n][: len(ids)].reshape(len(ids), -1).double() for n in names], dim=1)
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    bad = (cosine < ROW_AGREEMENT) & (want.norm(dim=1) > 0)
    if bad.any():
        raise ReplayError(
            f"{method}: the training set's examples don't match the per-example rows recorded "
            f"at step {step}: examples {ids[bad][:5].tolist()} (cosine of the stored row with "
            f"train_set[id]'s loss gradient {[round(c, 3) for c in cosine[bad][:5].tolist()]}). "
            "train_set[i] must be "
            "the example recorded with id i; a reordering inside a batch leaves the batch's "
            "gradient unchanged but not its examples' rows. (If you trained with another loss "
            f"than {method}'s, pass check_data=False)")


def _norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def _loss_at(run: Run, step: int) -> str:
    loss = run.table_where("steps", step).column("loss")[0].as_py()
    return "not logged" if loss is None else f"{loss:.2g}"
