"""Path-kernel completeness and cost on the demo's run (ReLU transformer, AdamW near zero loss).

Records the default `attrib demo` run (a + b mod 23, 2,000 steps), then runs the demo's path
kernel (32 test pairs, per example and layer, stride 10) with the fixed 2-node rule and the
adaptive rule (the default and the demo's, at the default tolerance 1e-4, at 1e-3, and the
demo's in a float32 analysis instead of float64), then the fixed rule again, and prints per rule
its time (and as a multiple of the fixed rule's, the mean of its two runs), the gradient
evaluations per test pair and segment (their mean over the run, and the largest segment's
mean), the relative gaps
|Σ terms − Δf| / |Δf| over the test pairs, how many gaps their measured quadrature error
bounds, and the largest rounding term (float32 rounding of the updates, relative to Δf).
Run: `python benchmarks/demo_completeness.py` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from harness import print_table

import attrib
from attrib.analyzer.path_kernel import gaps_within_bound
from attrib.demo import detect_stages, record, test_points
from attrib.grokking import GrokConfig, OneLayerTransformer, modular_addition

FIXED = "fixed, 2 nodes"
RULES = [(FIXED, {"quadrature": 2}),
         ("adaptive, tol 1e-3", {"quadrature": "adaptive", "tol": (1e-3, 1e-6)}),
         ("adaptive, tol 1e-4 (the default, the demo's)", {"quadrature": "adaptive"}),
         ("adaptive, tol 1e-4, float32 analysis", {"quadrature": "adaptive",
                                                   "dtype": torch.float32}),
         (FIXED, {"quadrature": 2})]  # again: x_fixed is against both runs' mean, so that
# drift in the machine's speed over the minutes between them counts on both sides


def rounding(result, completeness) -> float:
    """The largest rounding term over the test pairs, relative to their Δf."""
    rows = result.table.filter(pc.equal(result.table["term"], "rounding"))
    per_pair = rows.group_by("test_id").aggregate([("value", "sum")]).sort_by("test_id")
    delta = completeness["delta_f"].to_numpy()[per_pair["test_id"].to_numpy()]
    return float(np.max(np.abs(per_pair["value_sum"].to_numpy()) / np.abs(delta)))


def main() -> None:
    config = GrokConfig()
    data = modular_addition(config)
    with tempfile.TemporaryDirectory() as tmp:
        run = record(config, data, Path(tmp) / "run", progress=False)
        test, stages = test_points(data, 8, 4), detect_stages(run)
        rows = []
        for name, rule in RULES:
            started = time.perf_counter()
            result = attrib.analyze.path_kernel(
                run, partial(OneLayerTransformer, config), test, target="loss",
                by=("example", "layer"), stride=10, similarity=True, stages=stages,
                progress=False, **rule)
            seconds = time.perf_counter() - started
            table = result.completeness()
            relative = table["relative_gap"].to_numpy()
            bounded = gaps_within_bound(table)
            rows.append({"rule": name, "seconds": seconds,
                         "nodes_per_segment": round(float(np.mean(result.nodes)), 2),
                         "most_nodes": round(float(np.max(result.nodes)), 1),
                         "worst_relative_gap": f"{relative.max():.2e}",
                         "median_relative_gap": f"{np.median(relative):.2e}",
                         "within_1e-4": int((relative <= 1e-4).sum()),
                         "within_1e-2": int((relative <= 1e-2).sum()),
                         "bounded": f"{int(bounded.sum())}/{len(bounded)}",
                         "rounding": f"{rounding(result, table):.1e}"})
    fixed = float(np.mean([r["seconds"] for r in rows if r["rule"] == FIXED]))
    rows = [{"rule": r["rule"], "seconds": round(r["seconds"], 1),
             "x_fixed": round(r["seconds"] / fixed, 2),
             **{k: v for k, v in r.items() if k not in ("rule", "seconds")}} for r in rows]
    print_table(f"demo run (a + b mod {config.p}, {config.steps} steps, AdamW), 32 test pairs, "
                "by example and layer, stride 10", rows)


if __name__ == "__main__":
    main()
