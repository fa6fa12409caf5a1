"""Attribution quality against the two gold standards: LDS (retraining on subsets) and
further-training cosine (final model only), on a real bundled dataset.

Data: scikit-learn's digits (1,797 8×8 images that ship with the package; `pip install
'.[bench]'`), 1,000 training and 50 test images, inputs scaled to [0, 1]. Model: MLP 64-64-10
(tanh), batch 64, 10 epochs (160 steps), recorded twice (Full capture and Project(256, kron)),
checkpoint every 16 steps; once with SGD (lr 0.1, momentum 0.9, weight decay 1e-3) and once
with AdamW (lr 3e-3, weight decay 0.05). f is the margin (TRAK's and LDS's convention) for
every method. LDS: 50 models, each trained from the same initialisation with the same recipe
on a seeded half of the training set (batch order seeded by the model), Spearman per test
point, mean ± standard error. Further training: 40 left-out examples, 3 seeds, plain SGD at lr
0.01 (a tenth of SGD's) from θ_N; cosine per test point after 1, 16, 160 and 800 steps (up to
50 epochs). TRAK: k = 64 per tensor and damping 1.0, chosen by the sweep
`python benchmarks/attribution_quality.py --trak-sweep` (the margin gradients of a softmax
layer sum to zero over classes, so the kernel is singular without damping).
Run: `python benchmarks/attribution_quality.py [--quick]`.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from functools import partial

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

import attrib
from attrib.cli.render import aligned

N_TRAIN, N_TEST, BATCH, EPOCHS = 1000, 50, 64, 10
FURTHER_STEPS = (1, 16, 160, 800)  # 1/16, 1, 10 and 50 epochs
RECIPES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
}


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_TEST]
    return (x[train], y[train]), (x[test], y[test])


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


def fit(recipe: str, indices: np.ndarray, seed: int, path: str | None = None,
        capture=None) -> torch.nn.Module:
    """The training recipe, on the examples `indices`, recorded into `path` if given."""
    (x, y), _ = digits()
    model = mlp()
    opt = RECIPES[recipe](model.parameters())
    g = torch.Generator().manual_seed(seed)
    indices = torch.as_tensor(indices)
    recorder = (attrib.Recorder(path, model, opt, capture=capture, checkpoint_every=16)
                if path else None)
    for _ in range(EPOCHS):
        for batch in indices[torch.randperm(len(indices), generator=g)].split(BATCH):
            if recorder is not None:
                recorder.examples(batch)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
            opt.zero_grad()
    if recorder is not None:
        recorder.close()
    return model


def methods(full: attrib.Run, projected: attrib.Run, train, test) -> dict:
    """name → (scores, orientation, seconds)."""
    analyze = attrib.analyze
    jobs = {
        "path-kernel (exact)": (lambda: analyze.path_kernel(
            full, mlp, test, target="margin", progress=False).to_arrow(), "path-kernel"),
        "path-kernel (projected 256)": (lambda: analyze.path_kernel(
            projected, mlp, test, target="margin", progress=False).to_arrow(), "path-kernel"),
        "linear-response": (lambda: analyze.linear_response(
            full, mlp, train, test, target="margin", progress=False).influence,
            "linear-response"),
        "tracin (all checkpoints)": (lambda: analyze.tracin(
            full, mlp, train, test, target="margin", progress=False), "tracin"),
        "grad-dot": (lambda: analyze.grad_dot(full, mlp, train, test, target="margin",
                                              progress=False), "grad-dot"),
        "grad-cos": (lambda: analyze.grad_cos(full, mlp, train, test, target="margin",
                                              progress=False), "grad-cos"),
        "influence (GGN, CG)": (lambda: analyze.influence(
            full, mlp, train, test, target="margin", damping=1e-3, progress=False).scores,
            "influence"),
        "trak (1 checkpoint)": (lambda: analyze.trak(
            full, mlp, train, test, checkpoints="last:1", k=64, damping=1.0, progress=False),
            "trak"),
        "trak (5 checkpoints)": (lambda: analyze.trak(
            full, mlp, train, test, checkpoints="last:5", k=64, damping=1.0, progress=False),
            "trak"),
        "trak (all 11 checkpoints)": (lambda: analyze.trak(
            full, mlp, train, test, checkpoints="all", k=64, damping=1.0, progress=False),
            "trak"),
    }
    out = {}
    for name, (job, orientation) in jobs.items():
        started = time.perf_counter()
        scores = job()
        out[name] = (scores, orientation, time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 LDS models, 1 seed")
    parser.add_argument("--trak-sweep", action="store_true",
                        help="LDS of TRAK by projection size, damping and checkpoints (SGD)")
    args = parser.parse_args()
    if args.trak_sweep:
        trak_sweep(20 if args.quick else 50)
        return
    train, test = digits()
    models, seeds = (8, 1) if args.quick else (50, 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in RECIPES:
            everyone = np.arange(N_TRAIN)
            fit(recipe, everyone, 0, f"{tmp}/{recipe}-full", attrib.Full())
            fit(recipe, everyone, 0, f"{tmp}/{recipe}-proj", attrib.Project(256))
            full = attrib.open_run(f"{tmp}/{recipe}-full")
            projected = attrib.open_run(f"{tmp}/{recipe}-proj")
            with torch.no_grad():
                accuracy = float((mlp_at(full)(test[0]).argmax(1) == test[1]).float().mean())
            started = time.perf_counter()
            attrib.evaluate.subset_models(f"{tmp}/{recipe}-lds", partial(fit, recipe), test,
                                          N_TRAIN, models=models, target="margin")
            lds_seconds = time.perf_counter() - started
            started = time.perf_counter()
            gold = attrib.evaluate.further_training(full, mlp, train, test, examples=40,
                                                    seeds=seeds, steps=FURTHER_STEPS, lr=0.01,
                                                    target="margin")
            ft_seconds = time.perf_counter() - started
            print(f"{recipe}: test accuracy {accuracy:.3f}; {models} LDS models in "
                  f"{lds_seconds:.0f} s, further training in {ft_seconds:.0f} s", flush=True)
            for name, (scores, orientation, seconds) in methods(full, projected, train,
                                                                 test).items():
                result = attrib.evaluate.lds(scores, orientation, f"{tmp}/{recipe}-lds")
                cosine = {r["steps"]: r for r in attrib.evaluate.further_training_cosine(
                    scores, orientation, gold).to_pylist()}
                rows.append({"optimizer": recipe, "method": name,
                             "lds": f"{result.mean:.3f} ± {result.standard_error:.3f}",
                             **{f"ft_cos_{s}": f"{cosine[s]['cosine']:.3f}" for s in cosine},
                             "seconds": round(seconds, 1)})
    print(f"# attribution_quality.py: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; digits, MLP 64-64-10, {N_TRAIN} train / {N_TEST} test, "
          f"{EPOCHS} epochs of batch {BATCH} ({math.ceil(N_TRAIN / BATCH) * EPOCHS} steps); "
          f"LDS over {models} half-subset models; further training {seeds} seeds")
    print(aligned(pa.Table.from_pylist(rows), 100))


def trak_sweep(models: int) -> None:
    train, test = digits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fit("sgd", np.arange(N_TRAIN), 0, f"{tmp}/full", attrib.Full())
        run = attrib.open_run(f"{tmp}/full")
        attrib.evaluate.subset_models(f"{tmp}/lds", partial(fit, "sgd"), test, N_TRAIN,
                                      models=models, target="margin")
        for k in (64, 256, None):
            for damping in (1e-3, 1e-1, 1.0):
                row = {"k": str(k or "exact"), "damping": damping}
                for checkpoints in ("last:1", "last:5", "all"):
                    scores = attrib.analyze.trak(run, mlp, train, test, checkpoints=checkpoints,
                                                 k=k, damping=damping, progress=False)
                    result = attrib.evaluate.lds(scores, "trak", f"{tmp}/lds")
                    row[f"lds_{checkpoints}"] = round(result.mean, 3)
                rows.append(row)
    print(f"# attribution_quality.py --trak-sweep: {time.strftime('%Y-%m-%d')}; SGD run, "
          f"LDS over {models} models")
    print(aligned(pa.Table.from_pylist(rows)))


def mlp_at(run: attrib.Run) -> torch.nn.Module:
    model = mlp()
    model.load_state_dict(run.reconstruct(run.n_steps))
    return model.eval()


if __name__ == "__main__":
    main()
