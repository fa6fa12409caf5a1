"""TRAK (Park et al. 2023; METHODS.md §3) over checkpoints of one recorded run.

Per checkpoint c: features φ_i = R ∇m_i(θ_c) of the margin m (log-odds of the correct class),
projected with the recorder's own projections (same seed, kind and per-tensor k, so they equal
the stored Project features of the same gradients); the kernel part
K_c(x, i) = φ(x)ᵀ (ΦᵀΦ + λI)⁻¹ φ_i, solved once per checkpoint by Cholesky, in the k × k primal
or, when there are fewer training examples than features, the n × n dual
(φ(x)ᵀ Φᵀ (ΦΦᵀ + λI)⁻¹ φ_i: the same number). As in the TRAK library, the ensemble averages the
kernel part over checkpoints and multiplies by the average of Q_i = 1 − p_i (p_i the probability
of example i's correct class): τ(x)_i = mean_c K_c(x, i) · mean_c Q_c,i.
τ(x)_i is a contribution: the predicted change of x's margin from training on example i.

Stored features: when the run projected per-example gradients with the same (k, seed, kind)
and a checkpoint's step saw every training example once (full-batch training), its stored rows
R c_{s,i} are the features up to a known factor: c_{s,i} = w ∇ℓ_i and, for cross-entropy,
∇ℓ_i = −(1 − p_i) ∇m_i. The loss weight w (1/batch for a mean) is fitted on a few examples
whose features are computed; the training set's gradients are then never recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyarrow as pa
import torch

from attrib.analyzer import targets
from attrib.analyzer.checkpoint_methods import choose_checkpoints, features, score_table
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.run import Run
from attrib.analyzer.training import check_training_set
from attrib.schemas import projection
from attrib.schemas.factored import FactorRows


def trak(run: Run, model_fn: Callable[[], torch.nn.Module], train_set, test_set,
         checkpoints: str | list[int] = "last:5", k: int | None = 2048, seed: int = 0,
         kind: str = "kron", damping: float = 0.0, batch_size: int = 256,
         dtype: torch.dtype = torch.float64, use_stored: bool = True,
         progress: bool = True, target: targets.Target = "margin",
         check_data: bool = True) -> pa.Table:
    """TRAK scores (test_id, example_id, value) for every test point and training example.

    `checkpoints`: "all", "last:K" or indices of the run's stored checkpoints; `k`: projection
    size per tensor (None: exact gradients); `damping`: λ added to the kernel's diagonal (raise
    it when the solve reports a singular kernel); `use_stored`: take the training features
    from the run's stored projections where they match (see the module docstring).
    `target` can only be "margin": TRAK's features are gradients of the margin and its
    weights 1 − p come from the cross-entropy loss; score another f with TracIn, the
    influence function or the path kernel. `check_data`: first verify that `train_set`
    reproduces the recorded gradient (wrong labels or order are refused).
    """
    if target != "margin":
        raise ValueError(f"target={targets.name(target)!r}: TRAK is defined for the margin "
                         "only (features ∇ of the margin, weights 1 − p from the loss); use "
                         "tracin, influence or path_kernel for another target")
    if check_data:
        check_training_set(run, model_fn, train_set, "TRAK")
    indices = choose_checkpoints(run, checkpoints)
    model = run.build_model(model_fn, dtype).eval()
    test_x, test_y = targets.as_tensors(test_set, dtype)
    train_x, train_y = targets.as_tensors(train_set, dtype)
    shapes = run.param_shapes
    kernel = torch.zeros(len(test_y), len(train_y), dtype=dtype)
    q = torch.zeros(len(train_y), dtype=dtype)
    for index in progress_bar(indices, progress=progress, desc="TRAK checkpoints",
                              unit="checkpoint"):
        params = {n: v.to(dtype) for n, v in run.checkpoint(index).items()}

        def phi(x, y, params=params):
            return features(model, params, x, y, "margin", k, seed, kind, shapes)

        with torch.no_grad():
            p = _correct_probability(model, params, train_x, train_y, batch_size)
        stored = stored_features(run, index, len(train_y), k, seed, kind) if use_stored \
            else None
        train_features = (from_stored(stored, p, phi(train_x[:4], train_y[:4]))
                          if stored is not None else None)
        if train_features is None:
            train_features = torch.cat([phi(train_x[i: i + batch_size],
                                            train_y[i: i + batch_size])
                                        for i in range(0, len(train_y), batch_size)])
        kernel += solve_kernel(phi(test_x, test_y), train_features, damping) / len(indices)
        q += (1 - p) / len(indices)
    return score_table(kernel * q, "margin")


def stored_features(run: Run, index: int, n_train: int, k: int | None, seed: int,
                    kind: str) -> torch.Tensor | None:
    """The stored contributions of checkpoint `index`'s step as TRAK's features up to scale,
    rows in example-id order: projected rows where their projection is the one features()
    applies, exact (Full or Factored) rows projected here (Factored ones from their factors);
    None when a tensor has neither or the step did not see every example once."""
    step = run.checkpoint_steps[index]
    if k is None or step >= run.n_steps:
        return None
    examples = run.table_where("examples", step).sort_by("row")
    ids = torch.tensor(examples.column("example_id").to_numpy())
    if len(ids) != n_train or not torch.equal(ids.sort().values, torch.arange(n_train)):
        return None
    parts = []
    for name, shape in run.param_shapes.items():
        part = _stored_part(run, name, shape, step, len(ids), k, seed, kind)
        if part is None:
            return None
        parts.append(part.reshape(len(ids), -1))
    return torch.cat(parts, dim=1)[ids.argsort()]


def _stored_part(run: Run, name: str, shape: tuple[int, ...], step: int, n: int, k: int,
                 seed: int, kind: str) -> torch.Tensor | None:
    """One tensor's rows of the step in features()'s space, or None."""
    if math.prod(shape) <= k:  # features() keeps small tensors exact
        return run.contribution_rows(name, step, step + 1)[0, :n] if run.exact_rows(name) \
            else None
    if run.exact_rows(name):
        rows = run.example_rows(name, step, step + 1)[0, :n]
        split = projection.split_for(kind, k, shape)
        if isinstance(rows, FactorRows) and split is not None:
            return rows.kron(*projection.kron_factors(seed, name, split,
                                                      *projection.matrix_view(shape)))
        rows = rows.dense() if isinstance(rows, FactorRows) else rows
        return projection.project(rows.double(), shape, kind, k, seed, name)
    stored = run.capture.get(name, {}).get("project")
    if stored is None or (stored["k"], stored["seed"], stored["kind"]) != (k, seed, kind) \
            or projection.recorded_split(stored, shape) != projection.split_for(kind, k, shape):
        return None  # not the projection features() applies, split and all
    return run.contribution_rows(name, step, step + 1)[0, :n]


def from_stored(stored: torch.Tensor, p: torch.Tensor, computed: torch.Tensor
                ) -> torch.Tensor | None:
    """φ_i = −R c_i / (w (1 − p_i)), w fitted on the first rows whose φ is `computed`;
    None when the stored rows are not proportional to the computed ones (another loss)."""
    stored = stored.to(computed.dtype)
    scaled = -stored[: len(computed)] / (1 - p[: len(computed), None])
    w = (scaled * computed).sum() / (computed * computed).sum()
    if not torch.isfinite(w) or w == 0 or \
            (scaled - w * computed).norm() > 1e-3 * scaled.norm():
        return None
    return -stored / (w * (1 - p[:, None]))


def solve_kernel(test: torch.Tensor, train: torch.Tensor, damping: float) -> torch.Tensor:
    """φ(x)ᵀ (ΦᵀΦ + λI)⁻¹ Φᵀ for test rows `test` (m, k) and training rows `train` (n, k),
    solved in float64 and returned in the features' dtype.

    Refuses a kernel the solve can't trust, with a damping to try: undamped with fewer
    examples than features (ΦᵀΦ has rank ≤ n < k; the minimum-norm solve then interpolates
    the training features, and one example takes nearly all of a test point's score), or
    one whose condition number κ (power and inverse iteration on the factored kernel) makes
    the solve's rounding error κ·ε exceed SOLVE_ERROR_LIMIT. Also refuses a negative damping
    and features that are not finite."""
    if not damping >= 0:  # NaN included
        raise ValueError(f"damping={damping!r}: λ ≥ 0, added to the kernel's diagonal")
    if not (torch.isfinite(train).all() and torch.isfinite(test).all()):
        raise ValueError("the TRAK features (margin gradients at a checkpoint) are not finite: "
                         "the model's outputs overflowed there; check the run (attrib verify) "
                         "or analyse fewer checkpoints")
    n, k = train.shape
    dual = n < k
    wanted, test, train = test.dtype, test.double(), train.double()
    gram = train @ train.T if dual else train.T @ train
    if damping == 0 and dual:
        raise ValueError(f"the TRAK kernel ΦᵀΦ ({k}×{k}) has rank at most {n}: {n} training "
                         f"examples can't determine {k} feature dimensions, and the undamped "
                         "solve would only interpolate them (one example takes nearly all of "
                         f"each test point's score): pass damping > 0 (e.g. "
                         f"{_suggested_damping(gram):.3g}) or a smaller k")
    gram = gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype)
    factor, info = torch.linalg.cholesky_ex(gram)
    condition = condition_number(gram, factor) if int(info) == 0 else math.inf
    if condition * torch.finfo(gram.dtype).eps > SOLVE_ERROR_LIMIT:
        raise ValueError(f"the TRAK kernel ({'ΦΦᵀ' if dual else 'ΦᵀΦ'}, {gram.shape[0]}×"
                         f"{gram.shape[0]}) is singular or ill-conditioned (condition number "
                         f"≥ {condition:.3g}): pass damping > 0 (e.g. "
                         f"{_suggested_damping(gram):.3g})")
    if dual:  # (ΦᵀΦ + λI)⁻¹ Φᵀ = Φᵀ (ΦΦᵀ + λI)⁻¹
        return torch.cholesky_solve((test @ train.T).T, factor).T.to(wanted)
    return (torch.cholesky_solve(test.T, factor).T @ train.T).to(wanted)


SOLVE_ERROR_LIMIT = 1e-2  # the largest relative rounding error (κ·ε) of the kernel solve
CONDITION_ITERATIONS = 30


def condition_number(gram: torch.Tensor, factor: torch.Tensor) -> float:
    """κ of a symmetric positive definite matrix from its Cholesky factor: the largest
    eigenvalue by power iteration, the smallest by inverse iteration (a solve with the factor
    per step, O(m²) against the factorisation's O(m³)); at least the ratio of the factor's
    squared pivots. Iterations converge from below, so this never overstates κ."""
    g = torch.Generator().manual_seed(0)
    large = small = torch.randn(gram.shape[0], 1, generator=g, dtype=gram.dtype)
    for _ in range(CONDITION_ITERATIONS):
        large = gram @ large
        large = large / large.norm()
        small = torch.cholesky_solve(small, factor)
        small = small / small.norm()
    top = float((large.T @ gram @ large).squeeze())
    bottom = float((small.T @ gram @ small).squeeze())
    pivots = factor.diagonal()
    return max(top / bottom if bottom > 0 else math.inf,
               float((pivots.max() / pivots.min()) ** 2))


def _suggested_damping(gram: torch.Tensor) -> float:
    """1e-3 times the mean nonzero eigenvalue of the kernel (its trace over its rank bound):
    small against the directions the data determines, large against rounding."""
    return 1e-3 * float(gram.diagonal().sum()) / gram.shape[0]


def _correct_probability(model, params, inputs, labels, batch_size: int) -> torch.Tensor:
    from torch.func import functional_call

    out = [functional_call(model, params, (inputs[i: i + batch_size],), strict=False)
           .softmax(-1).gather(1, labels[i: i + batch_size, None]).squeeze(1)
           for i in range(0, len(labels), batch_size)]
    return torch.cat(out)
