"""Stage accountability: what one adjoint sweep costs next to training, and how well each
estimator agrees with replay (retraining with the stage skipped) by stage length, position and
learning rate, and the hybrid (a replay window after the stage, then the adjoint) by window.

Runs METHODS.md §4's prototype (`attrib.setups.stage_scenario`: tanh MLP 12-32-4 on teacher
data, batch 32, 120 steps, cosine LR; SGD + momentum 0.9 + weight decay 5e-3, or AdamW with
weight decay 0.05; 9 stages early / middle / late × 5 / 10 / 20 steps; 40 test points; target:
test loss). Three tables:
1. cost: seconds of plain (unrecorded, float32) training beside the linear-response sweep in
   float64 and float32, the frozen-gradient estimator and replay of all 9 stages, also on a
   784-256-256-10 MLP (batch 128) where compute, not Python, dominates;
2. agreement per stage (Pearson r and sign agreement over the 40 test points, vs replay);
3. agreement pooled over the 9 stages vs learning rate, with replay's drift;
4. the hybrid by window (0 = linear response, fixed W, "auto"): pooled agreement and seconds;
5. the grokking demo's run (Adam near zero loss): hybrid (auto) and replay per stage, seconds.
Run: `python benchmarks/stage_accountability.py [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

import attrib
from attrib.cli.render import aligned
from attrib.setups import ADAMW_LR, SGD_LR, stage_scenario, train_scenario

LEARNING_RATES = {"sgd": (0.02, SGD_LR, 0.1, 0.2), "adamw": (0.003, ADAMW_LR, 0.03)}
ESTIMATORS = ("linear-response", "frozen", "hybrid")
WINDOWS = (0, 2, 8, "auto")
WINDOW_SETTINGS = (("sgd", SGD_LR), ("sgd", 0.1), ("sgd", 0.2), ("adamw", ADAMW_LR))


def wide_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 10))


def random_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def timed(fn, repeats: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def cost_row(label: str, run, model_fn, train, test, stages, train_seconds: float) -> dict:
    def analysis(method, dtype=torch.float64):
        return lambda: attrib.analyze.stages(run, model_fn, train, test, stages=stages,
                                             method=method, dtype=dtype, progress=False)

    row = {"setup": label, "steps": run.n_steps, "stages": len(stages),
           "test_points": len(test[1]), "train_s": round(train_seconds, 3)}
    for name, fn in {"linear_response_f64": analysis("linear-response"),
                     "linear_response_f32": analysis("linear-response", torch.float32),
                     "frozen": analysis("frozen"), "hybrid_auto": analysis("hybrid"),
                     "replay": analysis("replay")}.items():
        seconds = timed(fn)
        row[f"{name}_s"] = round(seconds, 2)
        row[f"{name}_x"] = round(seconds / train_seconds, 1)
    return row


def costs(tmp: str, quick: bool) -> list[dict]:
    rows = []
    for optimizer in ("sgd", "adamw"):
        scenario = stage_scenario(f"{tmp}/cost-{optimizer}", optimizer)
        plain = timed(lambda: train_scenario(optimizer), repeats=3)  # noqa: B023
        rows.append(cost_row(f"{optimizer}, mlp 12-32-4", scenario.run, scenario.model,
                             scenario.train, scenario.test, scenario.stages, plain))
    steps = 20 if quick else 40
    train, test = random_data(4096, 0), random_data(8 if quick else 40, 1)
    stages = {"early": range(2, 7), "middle": range(steps // 2 - 5, steps // 2 + 5),
              "late": range(steps - 10, steps)}
    for optimizer in ("sgd", "adamw"):
        kwargs = dict(optimizer=optimizer, steps=steps, batch=128, model_fn=wide_mlp,
                      train=train, lr=0.01 if optimizer == "sgd" else 1e-3)
        train_scenario(recorder_path=f"{tmp}/wide-{optimizer}", **kwargs)
        plain = timed(lambda: train_scenario(**kwargs), repeats=3)  # noqa: B023
        rows.append(cost_row(f"{optimizer}, mlp 784-256-256-10 batch 128",
                             attrib.open_run(f"{tmp}/wide-{optimizer}"), wide_mlp, train, test,
                             stages, plain))
    return rows


def agreements(tmp: str, quick: bool) -> tuple[list[dict], list[dict]]:
    per_stage, pooled = [], []
    for optimizer, rates in LEARNING_RATES.items():
        for lr in rates[1:2] if quick else rates:
            scenario = stage_scenario(f"{tmp}/{optimizer}-{lr}", optimizer, lr=lr)
            report = attrib.analyze.stage_report(
                scenario.run, scenario.model, scenario.train, scenario.test,
                stages=scenario.stages, method=(*ESTIMATORS, "replay"), progress=False)
            table = attrib.analyze.agreement(report.table).to_pylist()
            found = {(r["method"], r["stage"]): r for r in table}
            pooled.append({"optimizer": optimizer, "lr": lr,
                           **_scores(found, "(all)"),
                           "replay_drift": f"{report.notes['replay_drift']:.1e}"})
            if lr in (SGD_LR, ADAMW_LR):
                for stage in scenario.stages:
                    reference = found[("linear-response", stage)]
                    per_stage.append({"optimizer": optimizer, "lr": lr, "stage": stage,
                                      "steps": f"{reference['start']}-{reference['end']}",
                                      **_scores(found, stage),
                                      "mean_replay": round(reference["mean_reference"], 4)})
    return per_stage, pooled


def by_window(tmp: str, quick: bool) -> list[dict]:
    """Pooled agreement with replay and seconds of the hybrid per window."""
    rows = []
    for optimizer, lr in WINDOW_SETTINGS[:1] if quick else WINDOW_SETTINGS:
        scenario = stage_scenario(f"{tmp}/window-{optimizer}-{lr}", optimizer, lr=lr)
        common = dict(stages=scenario.stages, progress=False)
        replay = attrib.analyze.stages(scenario.run, scenario.model, scenario.train,
                                       scenario.test, method="replay", **common)
        for window in WINDOWS:
            started = time.perf_counter()
            report = attrib.analyze.stage_report(scenario.run, scenario.model, scenario.train,
                                                 scenario.test, method="hybrid", window=window,
                                                 **common)
            seconds = time.perf_counter() - started
            pooled = {r["stage"]: r for r in attrib.analyze.agreement(
                pa.concat_tables([report.table, replay])).to_pylist()}["(all)"]
            windows = [n["window"] for n in report.notes["hybrid"]]
            rows.append({"optimizer": optimizer, "lr": lr, "window": str(window),
                         "windows_used": " ".join(map(str, windows)),
                         "hybrid_r": round(pooled["pearson"], 3),
                         "hybrid_signs": f"{100 * pooled['sign_agreement']:.1f}%",
                         "hybrid_s": round(seconds, 2)})
    return rows


def grokking(tmp: str) -> list[dict]:
    """The demo's run: the hybrid's auto window against replay per stage (float32, as the
    demo), with each one's seconds."""
    from attrib.demo import detect_stages, record, test_points
    from attrib.grokking import GrokConfig, OneLayerTransformer, modular_addition

    config = GrokConfig()
    data = modular_addition(config)
    run = record(config, data, Path(tmp) / "grokking", progress=False)
    stages, test = detect_stages(run), test_points(data, 8, 4)
    effects, seconds, notes = {}, {}, {}
    for method in ("hybrid", "replay"):
        started = time.perf_counter()
        report = attrib.analyze.stage_report(run, partial(OneLayerTransformer, config),
                                             data.train_set, test, stages=stages,
                                             method=method, dtype=torch.float32,
                                             progress=False)
        seconds[method] = time.perf_counter() - started
        effects[method] = {r["stage"]: [] for r in report.table.to_pylist()}
        for r in report.table.to_pylist():
            effects[method][r["stage"]].append(r["effect"])
        notes.update({n["stage"]: n for n in report.notes.get("hybrid", [])})
    rows = []
    for stage, steps in stages.items():
        hybrid, replay = (np.mean(effects[m][stage]) for m in ("hybrid", "replay"))
        rows.append({"stage": stage, "steps": f"{steps.start}-{steps.stop - 1}",
                     "mean_hybrid": round(float(hybrid), 4),
                     "mean_replay": round(float(replay), 4),
                     "relative_difference": f"{abs(hybrid - replay) / abs(replay):.1e}",
                     "window": notes[stage]["window"],
                     "converged": notes[stage]["converged"]})
    rows.append({"stage": "(seconds)", "steps": "", "mean_hybrid": round(seconds["hybrid"], 1),
                 "mean_replay": round(seconds["replay"], 1), "relative_difference": "",
                 "window": None, "converged": None})
    return rows


def _scores(found: dict, stage: str) -> dict:
    out = {}
    for method in ESTIMATORS:
        r = found[(method, stage)]
        out[f"{method}_r"] = round(r["pearson"], 3)
        out[f"{method}_signs"] = f"{100 * r['sign_agreement']:.1f}%"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings, for a smoke run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cost = costs(tmp, args.quick)
        per_stage, pooled = agreements(tmp, args.quick)
        windows = by_window(tmp, args.quick)
        grok = [] if args.quick else grokking(tmp)
    print(f"# stage_accountability.py: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("\n## cost: seconds, and multiples of the plain training's seconds (_x)")
    print(aligned(pa.Table.from_pylist(cost)))
    print("\n## agreement with replay per stage (40 test points each)")
    print(aligned(pa.Table.from_pylist(per_stage)))
    print("\n## agreement with replay pooled over 9 stages x 40 test points, by learning rate")
    print(aligned(pa.Table.from_pylist(pooled)))
    print("\n## hybrid by window: pooled agreement with replay, and the windows each stage used")
    print(aligned(pa.Table.from_pylist(windows)))
    if grok:
        print("\n## the grokking demo's run (AdamW near zero loss, 32 test pairs, float32): "
              "mean effect per stage")
        print(aligned(pa.Table.from_pylist(grok)))


if __name__ == "__main__":
    main()
