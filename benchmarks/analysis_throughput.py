"""Path-kernel analysis throughput: influence scores per second, exact vs projected vs strided.

Records the same MLP run (784-64-10 on random data, SGD + momentum, batch 32) with Full capture,
with Factored capture (exact, weights as factors) and with Project(kron, k) for several k, then
times `attrib.analyze.path_kernel` over each, and over the Full run with strides K. A score is one
(training example seen at a step) × (test point) influence; scores/s counts them. Also the
per-example agreement of each approximate mode with the exact one (Pearson r of the summed
example influences), the peak RSS of each analysis (own subprocess), and the adaptive
quadrature's cost beside fixed q = 2 with the gradient evaluations it used per segment, and the
analysis in float32 beside float64 (`max_error_vs_exact`: the largest per-example influence
difference from exact mode, relative to the largest influence).
Run: `python benchmarks/analysis_throughput.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import numpy as np
import torch
from harness import print_table, run_isolated

import attrib

PROJECTIONS = (256, 1024, 4096)
# mode → (run, stride, quadrature, analysis dtype)
MODES = {"exact (Full, stride 1)": ("full", 1, "2", "float64"),
         "exact (Factored, stride 1)": ("factored", 1, "2", "float64"),
         "exact (Factored), float32": ("factored", 1, "2", "float32"),
         **{f"projected (kron {k})": (f"project{k}", 1, "2", "float64") for k in PROJECTIONS},
         "exact, stride 5": ("full", 5, "2", "float64"),
         "exact, stride 20": ("full", 20, "2", "float64"),
         "exact, adaptive quadrature": ("full", 1, "adaptive", "float64")}


def make() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


def record(path: str, capture, steps: int) -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2048, 784, generator=g), torch.randint(0, 10, (2048,), generator=g)
    with attrib.Recorder(path, model, opt, capture=capture) as rec:
        for _ in range(steps):
            ids = torch.randint(0, 2048, (32,), generator=g)
            rec.examples(ids)
            torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()


def analyse(path: str, stride: int, n_test: int, quadrature: str, dtype: str) -> dict:
    g = torch.Generator().manual_seed(2)
    test = torch.randn(n_test, 784, generator=g), torch.randint(0, 10, (n_test,), generator=g)
    run = attrib.open_run(path)
    started = time.perf_counter()
    result = attrib.analyze.path_kernel(run, make, test, stride=stride, progress=False,
                                        quadrature=int(quadrature) if quadrature.isdigit()
                                        else quadrature, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - started
    scores = run.examples.num_rows * n_test
    top = result.top("example", test=0, n=10**9).sort_by("example")
    return {"seconds": seconds, "scores_per_s": scores / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "max_relative_gap": float(np.max(result.completeness()["relative_gap"])),
            "nodes": float(np.mean(result.nodes)), "values": top["value"].to_pylist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(analyse(args.one[0], int(args.one[1]), int(args.one[2]),
                                 args.one[3], args.one[4])))
        return
    steps, n_test = (20, 4) if args.quick else (200, 16)
    rows, exact = [], None
    with tempfile.TemporaryDirectory() as tmp:
        record(f"{tmp}/full", attrib.Full(), steps)
        record(f"{tmp}/factored", attrib.Factored(), steps)
        for k in PROJECTIONS:
            record(f"{tmp}/project{k}", attrib.Project(k, kind="kron"), steps)
        for mode, (capture, stride, quadrature, dtype) in MODES.items():
            result = run_isolated(f"{tmp}/{capture}", str(stride), str(n_test), quadrature,
                                  dtype)
            exact = exact or result["values"]
            error = np.abs(np.subtract(result["values"], exact)).max() / np.abs(exact).max()
            rows.append({"mode": mode, "steps": steps, "test_points": n_test,
                         "seconds": round(result["seconds"], 2),
                         "scores_per_s": round(result["scores_per_s"]),
                         "r_vs_exact": round(float(np.corrcoef(exact, result["values"])[0, 1]), 4),
                         "max_error_vs_exact": f"{error:.1e}",
                         "max_relative_gap": f"{result['max_relative_gap']:.1e}",
                         "nodes_per_segment": round(result["nodes"], 2),
                         "peak_rss": f"{result['peak_rss_mib']:.0f} MiB"})
    print_table("784-64-10 MLP, SGD momentum 0.9, batch 32, float64 analysis unless float32, "
                "2 Gauss-Legendre nodes unless adaptive", rows)


if __name__ == "__main__":
    main()
