"""Scaling: how recording and analysis cost grow with batch size, parameter count and steps.

An MLP 784-H-10 (tanh) on random data, AdamW, recorded with the aggregate trajectory and
Project(256, kron) per-example capture; then the path kernel (projected, 4 test points, float64).
Three sweeps around H = 256, batch 64, 100 steps: H ∈ {64, 256, 1024}, batch ∈ {16, 64, 256},
steps ∈ {50, 100, 200}. Columns: plain and recorded milliseconds per step (recorded includes
close(), the writer's backlog), their ratio, stored bytes per step, and the path kernel's
seconds in total and per step. Linear growth shows as a constant per-step column along the
steps sweep, and as per-step costs proportional to H·784 or the batch in the other sweeps.
Run: `python benchmarks/scaling.py [--quick]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from harness import print_table

import attrib
from attrib.cli.render import human_bytes


def make(hidden: int):
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.Tanh(),
                                   torch.nn.Linear(hidden, 10))
    return model


def train(hidden: int, batch: int, steps: int, path: str | None) -> float:
    model = make(hidden)()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4096, 784, generator=g), torch.randint(0, 10, (4096,), generator=g)
    batches = [torch.randint(0, 4096, (batch,), generator=g) for _ in range(steps)]
    rec = (attrib.Recorder(path, model, opt, capture=attrib.Project(256), checkpoint_every=50)
           if path else None)
    started = time.perf_counter()
    for ids in batches:
        if rec is not None:
            rec.examples(ids)
        torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        opt.zero_grad()
    if rec is not None:
        rec.close()
    return time.perf_counter() - started


def row(sweep: str, hidden: int, batch: int, steps: int, tmp: str) -> dict:
    plain = min(train(hidden, batch, steps, None) for _ in range(2))
    path = f"{tmp}/{sweep}-{hidden}-{batch}-{steps}"
    recorded = train(hidden, batch, steps, path)
    run = attrib.open_run(path)
    g = torch.Generator().manual_seed(2)
    test = torch.randn(4, 784, generator=g), torch.randint(0, 10, (4,), generator=g)
    started = time.perf_counter()
    attrib.analyze.path_kernel(run, make(hidden), test, progress=False)
    analysis = time.perf_counter() - started
    return {"sweep": sweep, "hidden": hidden, "params": 795 * hidden + 10, "batch": batch,
            "steps": steps, "plain_ms": round(1e3 * plain / steps, 2),
            "recorded_ms": round(1e3 * recorded / steps, 2),
            "ratio": round(recorded / plain, 1),
            "stored_per_step": human_bytes(run.info()["dense_bytes_stored"] / steps),
            "analysis_s": round(analysis, 2),
            "analysis_ms_per_step": round(1e3 * analysis / steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    scale = 5 if args.quick else 1
    configs = ([("params", h, 64, 100 // scale) for h in (64, 256, 1024)]
               + [("batch", 256, b, 100 // scale) for b in (16, 64, 256)]
               + [("steps", 256, 64, s // scale) for s in (50, 100, 200)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            rows.append(row(*config, tmp))
            print(f"done {config}", flush=True)
    print_table("MLP 784-H-10, AdamW, Project(256, kron), path kernel on 4 test points", rows)


if __name__ == "__main__":
    main()
