"""Gold standards for attribution scores (METHODS.md §3): `attrib.evaluate`.

- LDS (linear datamodeling score): train M models on random α-subsets of the training set,
  then per test point the Spearman correlation, over the models, between the predicted
  Σ_{i∈S_j} τ(x)_i and the model's actual f(x). Trained models' outputs are stored as Parquet
  in an evaluation directory (one file per model, written atomically), so an interrupted
  evaluation resumes where it stopped and several attribution methods share one set of models.
- Further training (final-model-only): from θ_N, short further training with example i left
  out (its loss, scaled by 1/n, subtracted in every batch), averaged over seeds, minus the
  mean over the left-out examples: the gold vector a method's scores are compared to by cosine.

Scores come in two orientations. A contribution is the predicted change of f from training on
i (path kernel, linear response, TRAK); TracIn, Grad-Dot, Grad-Cos, the influence function
and projected influence score ∇f·∇ℓ_i, the opposite sign. `method` says which, so both
compare alike.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.func import functional_call, grad, vmap

from attrib.analyzer import targets
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.run import Run

ORIENTATION = {"contribution": 1, "path-kernel": 1, "linear-response": 1, "trak": 1,
               "tracin": -1, "grad-dot": -1, "grad-cos": -1, "influence": -1, "projected": -1}
TrainFn = Callable[[np.ndarray, int], torch.nn.Module]


def contributions(scores: pa.Table | np.ndarray, method: str, n_test: int,
                  n_train: int, target: str | None = None) -> np.ndarray:
    """(n_test, n_train) contributions from a score table (test_id, example_id, value; other
    axes such as step or term are summed) or matrix, oriented by `method`. `target`: the f the
    gold standard measures; a score table that records another (targets.with_target) is
    refused, since loss and margin move in opposite directions."""
    if method not in ORIENTATION:
        raise ValueError(f"method={method!r}: one of {sorted(ORIENTATION)} (a contribution is "
                         "the predicted change of f from training on the example)")
    scored = targets.target_of(scores) if isinstance(scores, pa.Table) else None
    if targets.named(target) and targets.named(scored) and scored != target:
        raise ValueError(
            f"the scores were computed for target={scored!r}, the gold standard measures "
            f"target={target!r}: their signs and scales differ (the loss falls as the margin "
            f"rises), so the comparison would come out flipped or meaningless; compute the "
            f"scores with target={target!r} or the gold standard with target={scored!r}")
    if isinstance(scores, np.ndarray):
        matrix = scores.astype(np.float64)
    else:
        rows = scores.filter(pc.is_valid(scores["example_id"])).group_by(
            ["test_id", "example_id"]).aggregate([("value", "sum")])
        matrix = np.zeros((n_test, n_train))
        matrix[rows["test_id"].to_numpy(), rows["example_id"].to_numpy()] = \
            rows["value_sum"].to_numpy()
    if matrix.shape != (n_test, n_train):
        raise ValueError(f"scores cover {matrix.shape}, expected ({n_test}, {n_train}) "
                         "(test points, training examples)")
    return ORIENTATION[method] * matrix


# -- LDS ------------------------------------------------------------------------------------------
@dataclass
class SubsetModels:
    subsets: np.ndarray  # (M, n_train) bool: which examples model j trained on
    outputs: np.ndarray  # (M, n_test): f(x) of model j
    target: str | None = None  # the f of `outputs`, as evaluation.json records it


@dataclass
class LDSResult:
    mean: float
    standard_error: float
    per_test: pa.Table  # (test_id, spearman)


def subset(n_train: int, alpha: float, seed: int, model: int) -> np.ndarray:
    """Model `model`'s training indices: a seeded α-subset, the same on every machine."""
    rng = np.random.default_rng([seed, model])
    return np.sort(rng.permutation(n_train)[: round(alpha * n_train)])


def subset_models(directory: str | Path, train_fn: TrainFn, test_set, n_train: int,
                  models: int = 50, alpha: float = 0.5, target: targets.Target = "margin",
                  seed: int = 0, workers: int = 2, progress: bool = True) -> SubsetModels:
    """Train (or resume) M models on α-subsets; `train_fn(indices, seed)` returns a trained
    model (a module-level function: workers are separate processes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {"n_train": n_train, "alpha": alpha, "seed": seed,
                "target": target if isinstance(target, str) else repr(target)}
    settings_file = directory / "evaluation.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(f"{directory} holds models trained with "
                         f"{json.loads(settings_file.read_text())}, not {settings}; use another "
                         "directory (or the same settings to resume)")
    settings_file.write_text(json.dumps(settings, indent=1))
    todo = [j for j in range(models) if not (directory / f"model-{j:05d}.parquet").exists()]
    inputs, labels = targets.test_tensors(test_set)
    # numpy, not tensors: sending a tensor to a worker moves the caller's tensor into shared
    # memory, behind the back of anything viewing its old memory
    inputs, labels = inputs.detach().cpu().numpy().copy(), labels.detach().cpu().numpy().copy()
    jobs = [(train_fn, subset(n_train, alpha, seed, j), j, inputs, labels, target)
            for j in todo]
    with progress_bar(total=models, initial=models - len(todo), progress=progress,
              desc="LDS subset models", unit="model") as bar:
        for j, f in _run_jobs(jobs, workers):
            table = pa.table({"test_id": np.arange(len(f), dtype=np.int32), "f": f})
            tmp = directory / f".model-{j:05d}.parquet.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, directory / f"model-{j:05d}.parquet")
            bar.update(1)
    return load_subset_models(directory, models)


def load_subset_models(directory: str | Path, models: int | None = None) -> SubsetModels:
    directory = Path(directory)
    settings = json.loads((directory / "evaluation.json").read_text())
    files = sorted(directory.glob("model-*.parquet"))
    if models is not None:
        files = files[:models]
    indices = [int(f.stem.removeprefix("model-")) for f in files]
    masks = np.zeros((len(files), settings["n_train"]), bool)
    for row, j in enumerate(indices):
        masks[row, subset(settings["n_train"], settings["alpha"], settings["seed"], j)] = True
    outputs = np.stack([pq.read_table(f).sort_by("test_id")["f"].to_numpy() for f in files])
    return SubsetModels(masks, outputs, settings.get("target"))


def _run_jobs(jobs: list, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job[2], _train_one(*job)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_train_one, *job): job[2] for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def _train_one(train_fn: TrainFn, indices: np.ndarray, model_index: int, inputs: np.ndarray,
               labels: np.ndarray, target) -> np.ndarray:
    torch.set_num_threads(1)
    inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
    model = train_fn(indices, model_index).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        return targets.evaluate(model, params, inputs.to(next(iter(params.values())).dtype)
                                if inputs.is_floating_point() else inputs, labels,
                                target).double().numpy()


def lds(scores: pa.Table | np.ndarray, method: str, directory: str | Path,
        train_fn: TrainFn | None = None, test_set=None, n_train: int | None = None,
        models: int = 50, alpha: float = 0.5, target: targets.Target = "margin",
        seed: int = 0, workers: int = 2, progress: bool = True) -> LDSResult:
    """LDS of attribution `scores` (of f = `target`) against models retrained on subsets.

    With `train_fn` (and `test_set`, `n_train`) the missing models are trained first
    (resumable); without it the models already in `directory` are used.
    """
    if train_fn is not None:
        trained = subset_models(directory, train_fn, test_set, n_train, models, alpha, target,
                                seed, workers, progress)
    else:
        trained = load_subset_models(directory, models)
    n_test = trained.outputs.shape[1]
    tau = contributions(scores, method, n_test, trained.subsets.shape[1],
                        trained.target or targets.name(target))
    predicted = trained.subsets.astype(np.float64) @ tau.T  # (M, n_test)
    rho = np.array([spearman(predicted[:, t], trained.outputs[:, t]) for t in range(n_test)])
    valid = rho[~np.isnan(rho)]
    return LDSResult(float(valid.mean()), float(valid.std(ddof=1) / np.sqrt(len(valid))),
                     pa.table({"test_id": np.arange(n_test, dtype=np.int32), "spearman": rho}))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for a constant input."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, ranks)
    return (sums / np.bincount(inverse))[inverse]


# -- further training -----------------------------------------------------------------------------
def further_training(run: Run, model_fn: Callable[[], torch.nn.Module], train_set, test_set,
                     examples: int | np.ndarray = 50, seeds: int = 3,
                     steps: tuple[int, ...] = (1, 10, 100), lr: float | None = None,
                     batch_size: int | None = None, target: targets.Target = "margin",
                     seed: int = 0, dtype: torch.dtype = torch.float64,
                     progress: bool = True) -> pa.Table:
    """Gold leave-one-out scores from further training θ_N with plain SGD (the final-model-
    only study's recipe): (steps, example_id, test_id, effect), effect = f(x; θ_T^{−i})
    averaged over seeds, minus its mean over the left-out examples.

    `examples`: how many to sample (or which ids); `lr`: default a tenth of the last recorded
    learning rate; `batch_size`: default the recorded examples per step; `target`: the f
    measured, the margin by default as for TRAK and LDS (recorded in the table's metadata).
    """
    train_x, train_y = targets.as_tensors(train_set, dtype)
    test_x, test_y = targets.as_tensors(test_set, dtype)
    n = len(train_y)
    ids = (np.asarray(examples) if not np.isscalar(examples) else
           np.sort(np.random.default_rng(seed).choice(n, int(examples), replace=False)))
    lr = lr if lr is not None else float(run.hparams()["lr"][-1, 0]) / 10
    batch_size = batch_size or int(np.median(run.steps.column("n_examples").to_numpy()))
    model = run.build_model(model_fn, dtype).eval()
    start = {k: v.to(dtype) for k, v in run.reconstruct(run.n_steps).items()}
    loss = targets.per_example

    def objective(params, left_out_x, left_out_y, batch_x, batch_y):
        batch = loss(functional_call(model, params, (batch_x,)), batch_y, "loss").mean()
        left = loss(functional_call(model, params, (left_out_x[None],)), left_out_y[None],
                    "loss")[0]
        return batch - left / n

    step_grad = vmap(grad(objective), in_dims=(0, 0, 0, None, None))
    totals = np.zeros((len(steps), len(ids), len(test_y)))
    with progress_bar(total=seeds * max(steps), progress=progress, desc="further training",
              unit="step") as bar:
        for s in range(seeds):
            params = {k: v.expand(len(ids), *v.shape).clone() for k, v in start.items()}
            g = torch.Generator().manual_seed(seed * 1000 + s)
            order = torch.cat([torch.randperm(n, generator=g)
                               for _ in range(max(steps) * batch_size // n + 1)])
            for t in range(1, max(steps) + 1):
                batch = order[(t - 1) * batch_size: t * batch_size]
                grads = step_grad(params, train_x[ids], train_y[ids], train_x[batch],
                                  train_y[batch])
                params = {k: v - lr * grads[k] for k, v in params.items()}
                bar.update(1)
                if t in steps:
                    with torch.no_grad():
                        f = vmap(lambda p: targets.evaluate(model, p, test_x, test_y, target))(
                            params)
                    totals[steps.index(t)] += f.cpu().numpy() / seeds
    gold = totals - totals.mean(axis=1, keepdims=True)
    n_steps, n_ids, n_test = gold.shape
    return targets.with_target(pa.table({
        "steps": np.repeat(np.array(steps, dtype=np.int64), n_ids * n_test),
        "example_id": np.tile(np.repeat(ids.astype(np.int64), n_test), n_steps),
        "test_id": np.tile(np.arange(n_test, dtype=np.int32), n_steps * n_ids),
        "effect": gold.reshape(-1)}), target)


def further_training_cosine(scores: pa.Table | np.ndarray, method: str,
                            gold: pa.Table) -> pa.Table:
    """Per amount of further training: mean and standard error over test points of the cosine
    between the gold leave-one-out vector (centred over the left-out examples) and the
    scores' prediction of it (−contribution, not centred). Scores recording another named
    target than the gold's are refused (see contributions)."""
    n_test = int(pc.max(gold["test_id"]).as_py()) + 1
    ids = np.unique(gold["example_id"].to_numpy())
    n_train = (int(pc.max(scores["example_id"]).as_py()) + 1 if isinstance(scores, pa.Table)
               else scores.shape[1])
    predicted = -contributions(scores, method, n_test, n_train, targets.target_of(gold))[:, ids]
    rows = []
    for steps in np.unique(gold["steps"].to_numpy()):
        part = gold.filter(pc.field("steps") == steps).sort_by([("example_id", "ascending"),
                                                                ("test_id", "ascending")])
        vectors = part["effect"].to_numpy().reshape(len(ids), n_test).T
        cos = (vectors * predicted).sum(1) / (np.linalg.norm(vectors, axis=1)
                                              * np.linalg.norm(predicted, axis=1))
        rows.append({"steps": int(steps), "cosine": float(cos.mean()),
                     "standard_error": float(cos.std(ddof=1) / np.sqrt(len(cos)))})
    return pa.Table.from_pylist(rows)
