"""TRAK throughput beside TRAK's own library (PyPI `traker`) and `dattri`, same model, data,
checkpoints and projection size, on the CPU.

The digits MLP of attribution_quality.py (SGD run, 1,000 training / 50 test images), the
last 5 stored checkpoints, margin features. attrib: `attrib.analyze.trak` with k = 512 per
tensor (the recorder's kron projections) and with exact gradients. traker: TRAKer with its CPU
BasicProjector (dense Gaussian, proj_dim 512 over all parameters, float32). dattri:
TRAKAttributor with its CPU projector (proj_dim 512). Scores per second
count (training example × test point) scores; `spearman_vs_attrib_exact` is the mean over test
points of the rank correlation with attrib's exact-gradient TRAK (same damping: none). Peers are
installed only in a benchmark environment, never as attrib dependencies:
`python -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 traker dattri &&
/tmp/peers/bin/pip install -e .`, then `/tmp/peers/bin/python benchmarks/trak_peers.py`.
A peer that is missing or cannot run on the CPU gets a row saying why.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
from attribution_quality import N_TRAIN, digits, fit, mlp

import attrib
from attrib.analyzer.evaluate import contributions, spearman
from attrib.cli.render import aligned

CHECKPOINTS, PROJ_DIM, DAMPING = 5, 512, 1e-3


def ours(run, train, test, k) -> np.ndarray:
    scores = attrib.analyze.trak(run, mlp, train, test, checkpoints=f"last:{CHECKPOINTS}", k=k,
                                 damping=DAMPING, progress=False)
    return contributions(scores, "trak", len(test[1]), len(train[1]))


def traker_scores(run, train, test, tmp: str) -> np.ndarray:
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = mlp().eval()
    grad_dim = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(grad_dim, PROJ_DIM, 0, ProjectionType.normal, "cpu",
                               dtype=torch.float32)
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(train[1]),
                    save_dir=f"{tmp}/trak", device="cpu", projector=projector,
                    proj_dim=PROJ_DIM, use_half_precision=False, lambda_reg=DAMPING,
                    logging_level=40)
    indices = list(range(len(run.checkpoint_steps)))[-CHECKPOINTS:]
    states = [run.checkpoint(i) for i in indices]
    for model_id, state in enumerate(states):
        traker.load_checkpoint(state, model_id=model_id)
        for start in range(0, len(train[1]), 100):
            traker.featurize(batch=(train[0][start:start + 100], train[1][start:start + 100]),
                             num_samples=len(train[1][start:start + 100]))
    traker.finalize_features()
    for model_id, state in enumerate(states):
        traker.start_scoring_checkpoint("bench", state, model_id, num_targets=len(test[1]))
        traker.score(batch=test, num_samples=len(test[1]))
    return np.asarray(traker.finalize_scores("bench")).T  # (test, train)


def dattri_scores(run, train, test) -> np.ndarray:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp().eval()

    def margin(params, pair):  # dattri's TRAK target: the log-odds of the correct class
        x, y = pair
        logp = -torch.nn.functional.cross_entropy(
            functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, pair):
        x, y = pair
        return torch.exp(-torch.nn.functional.cross_entropy(
            functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0)))

    indices = list(range(len(run.checkpoint_steps)))[-CHECKPOINTS:]
    task = AttributionTask(loss_func=margin, model=model,
                           checkpoints=[run.checkpoint(i) for i in indices])
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                device="cpu", regularization=DAMPING,
                                projector_kwargs={"device": "cpu", "proj_dim": PROJ_DIM})
    attributor.cache(DataLoader(TensorDataset(*train), batch_size=100))
    return np.asarray(attributor.attribute(DataLoader(TensorDataset(*test), batch_size=50))).T


def main() -> None:
    train, test = digits()
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        fit("sgd", np.arange(N_TRAIN), 0, f"{tmp}/run", attrib.Full())
        run = attrib.open_run(f"{tmp}/run")
        methods = {"attrib trak (exact gradients)": lambda: ours(run, train, test, None),
                   f"attrib trak (kron k={PROJ_DIM} per tensor)":
                       lambda: ours(run, train, test, PROJ_DIM),
                   f"traker 0.3 (BasicProjector, proj_dim {PROJ_DIM})":
                       lambda: traker_scores(run, train, test, tmp),
                   f"dattri 0.3 TRAKAttributor (proj_dim {PROJ_DIM})":
                       lambda: dattri_scores(run, train, test)}
        for name, job in methods.items():
            try:
                started = time.perf_counter()
                scores = job()
                seconds = time.perf_counter() - started
            except Exception as e:  # a peer that is missing or fails on the CPU says why
                rows.append({"method": name, "note": f"{type(e).__name__}: {e}"[:140]})
                continue
            reference = scores if reference is None else reference
            rho = np.nanmean([spearman(scores[t], reference[t]) for t in range(len(test[1]))])
            rows.append({"method": name, "seconds": round(seconds, 2),
                         "scores_per_s": round(scores.size / seconds),
                         "spearman_vs_attrib_exact": round(float(rho), 3), "note": None})
    print(f"# trak_peers.py: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; digits MLP 64-64-10, {len(train[1])} train x {len(test[1])} "
          f"test, last {CHECKPOINTS} checkpoints, damping {DAMPING}")
    print(aligned(pa.Table.from_pylist(rows)))


if __name__ == "__main__":
    main()
