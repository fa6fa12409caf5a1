"""TracIn-CP, Grad-Dot and Grad-Cos (METHODS.md §3) over a run's stored checkpoints.

All three score a training example i against a test point x by gradient inner products at
checkpoints: TracIn-CP = Σ_c η_c ∇f(x; θ_c) · ∇ℓ_i(θ_c); Grad-Dot the same at the final θ only;
Grad-Cos its cosine. They share one routine, with exact or randomly projected gradients (the
recorder's projection, so stored projected features and these agree).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from attrib.analyzer import targets
from attrib.analyzer.aggregate import owned
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.run import Run
from attrib.analyzer.training import check_training_set
from attrib.schemas import projection

SCORES = pa.schema([pa.field("test_id", pa.int32()), pa.field("example_id", pa.int64()),
                    pa.field("value", pa.float64())])


def features(model, params, inputs, labels, target, k: int | None, seed: int, kind: str,
              shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    """(n, P) flattened gradients, or (n, Σ k) projected per parameter tensor."""
    grads = targets.gradients(model, params, inputs, labels, target)
    parts = []
    for name, g in grads.items():
        if k is not None and np.prod(shapes[name]) > k:
            g = projection.project(g, shapes[name], kind, k, seed, name)
        parts.append(g.reshape(g.shape[0], -1))
    return torch.cat(parts, dim=1)


def checkpoint_scores(run: Run, model_fn: Callable[[], torch.nn.Module], train_set, test_set,
                      checkpoints: list[int], weights: list[float], target: targets.Target,
                      loss: targets.Target = "loss", cosine: bool = False,
                      k: int | None = None, seed: int = 0, kind: str = "kron",
                      batch_size: int = 256, dtype: torch.dtype = torch.float64,
                      progress: bool = True, check_data: bool = True) -> pa.Table:
    """Σ_c w_c ⟨∇f(x; θ_c), ∇ℓ_i(θ_c)⟩ (or cosines) for every test point and training example.

    `train_set[i]` must be the example with example_id i, as recorded by `rec.examples`;
    `check_data` verifies that it reproduces the recorded gradient (check_training_set).
    """
    if check_data:
        check_training_set(run, model_fn, train_set, "TracIn / Grad-Dot / Grad-Cos")
    model = run.build_model(model_fn, dtype).eval()
    test_x, test_y = targets.as_tensors(test_set, dtype)
    train_x, train_y = targets.as_tensors(train_set, dtype)
    shapes = run.param_shapes
    scores = torch.zeros(len(test_y), len(train_y), dtype=dtype)
    for index, weight in progress_bar(list(zip(checkpoints, weights)), progress=progress,
                              desc="checkpoint gradients", unit="checkpoint"):
        params = {n: v.to(dtype) for n, v in run.checkpoint(index).items()}
        test_features = features(model, params, test_x, test_y, target, k, seed, kind, shapes)
        if cosine:
            test_features = torch.nn.functional.normalize(test_features, dim=1)
        for start in range(0, len(train_y), batch_size):
            stop = start + batch_size
            train_features = features(model, params, train_x[start:stop], train_y[start:stop],
                                       loss, k, seed, kind, shapes)
            if cosine:
                train_features = torch.nn.functional.normalize(train_features, dim=1)
            scores[:, start:stop] += weight * test_features @ train_features.T
    return score_table(scores, target)


def score_table(scores: torch.Tensor, target: targets.Target) -> pa.Table:
    """A (test points, training examples) matrix as the long (test_id, example_id, value),
    over copied values (`owned`), its target in the schema metadata (targets.with_target)."""
    n_test, n_train = scores.shape
    return targets.with_target(pa.table(
        {"test_id": np.repeat(np.arange(n_test, dtype=np.int32), n_train),
         "example_id": np.tile(np.arange(n_train, dtype=np.int64), n_test),
         "value": owned(scores.reshape(-1))}, schema=SCORES), target)


def tracin(run: Run, model_fn, train_set, test_set, target: targets.Target = "loss",
           checkpoints: str | list[int] = "all", **options) -> pa.Table:
    """TracIn-CP: Σ_c η_c ∇f(x; θ_c) · ∇ℓ_i(θ_c) over the run's checkpoints ("all",
    "last:K", or a list of checkpoint indices); η_c is the learning rate at step c (group 0)."""
    indices = choose_checkpoints(run, checkpoints)
    lr = run.hparams()["lr"][:, 0]
    steps = run.checkpoint_steps
    weights = [float(lr[min(steps[i], run.n_steps - 1)]) for i in indices]
    return checkpoint_scores(run, model_fn, train_set, test_set, indices, weights, target,
                             **options)


def grad_dot(run: Run, model_fn, train_set, test_set, target: targets.Target = "loss",
             **options) -> pa.Table:
    """∇f(x; θ_N) · ∇ℓ_i(θ_N) at the final checkpoint."""
    return checkpoint_scores(run, model_fn, train_set, test_set, [len(run.checkpoint_steps) - 1],
                             [1.0], target, **options)


def grad_cos(run: Run, model_fn, train_set, test_set, target: targets.Target = "loss",
             **options) -> pa.Table:
    """The cosine of ∇f(x; θ_N) and ∇ℓ_i(θ_N) at the final checkpoint."""
    return checkpoint_scores(run, model_fn, train_set, test_set, [len(run.checkpoint_steps) - 1],
                             [1.0], target, cosine=True, **options)


def choose_checkpoints(run: Run, checkpoints: str | list[int]) -> list[int]:
    count = len(run.checkpoint_steps)
    if checkpoints == "all":
        return list(range(count))
    if isinstance(checkpoints, str) and checkpoints.startswith("last:"):
        return list(range(max(0, count - int(checkpoints.removeprefix("last:"))), count))
    if isinstance(checkpoints, list) and all(0 <= i < count for i in checkpoints):
        return checkpoints
    raise ValueError(f"checkpoints={checkpoints!r}: use 'all', 'last:K' or indices below {count}")
