"""Projected influence over stored rows: throughput in process and on Dask, and peak memory.

Records an MLP 256-256-4 with Project(2048) on its first layer, 256 examples per step, then
scores 8 test points against every stored row with `attrib.analyze.projected_influence`:
in this process (one chunk at a time), with Dask's threaded scheduler, and on a 2-worker
LocalCluster (processes). Prints seconds, rows/s, MiB/s of stored rows read, and the driver
process's resident memory before and at its peak during the computation (Linux /proc).
Run: `python benchmarks/projected_influence.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import print_table

import attrib
from attrib.analyzer.projected import projected_influence

K, BATCH, TESTS = 2048, 256, 8


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 4))


def record(path: Path, steps: int) -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(4 * BATCH, 256), torch.randint(0, 4, (4 * BATCH,))
    with attrib.Recorder(path, net, opt, capture=attrib.Project(K, params=("0.weight",))) as rec:
        for step in range(steps):
            ids = torch.arange(BATCH) + (step % 4) * BATCH
            rec.examples(ids)
            torch.nn.functional.cross_entropy(net(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()


def measure(path: str, engine: str) -> dict:
    """One engine in this (fresh) process: seconds and peak RSS."""
    run = attrib.open_run(path)
    tests = {"0.weight": torch.randn(TESTS, 256, 256, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(0))}
    kwargs: dict = {}
    cluster = client = None
    if engine == "dask-cluster":
        import distributed

        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        kwargs = {"engine": "dask", "client": client}
    elif engine == "dask-threads":
        kwargs = {"engine": "dask"}
    before = status_bytes("VmRSS")  # imports, cluster client
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from here (ru_maxrss
    started = time.perf_counter()                   # would include the parent's, at fork)
    table = projected_influence(run, tests, **kwargs)
    seconds = time.perf_counter() - started
    if client is not None:
        client.close()
        cluster.close()
    return {"seconds": seconds, "rows": table.num_rows, "before": before,
            "peak_rss": status_bytes("VmHWM")}


def status_bytes(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run"
        record(path, args.steps)
        stored = args.steps * BATCH * K * 4
        rows = []
        for engine in ("torch", "dask-threads", "dask-cluster"):
            out = subprocess.run([sys.executable, sys.argv[0], "--one", str(path), engine],
                                 check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append({
                "engine": engine, "steps": args.steps, "stored_MiB": round(stored / 2**20),
                "seconds": round(result["seconds"], 2),
                "rows_per_s": round(args.steps * BATCH / result["seconds"]),
                "MiB_per_s": round(stored / 2**20 / result["seconds"]),
                "driver_rss_before_MiB": round(result["before"] / 2**20),
                "driver_peak_rss_MiB": round(result["peak_rss"] / 2**20)})
    print_table(f"MLP 256-256-4, Project({K}) on one layer, {BATCH} examples/step, {TESTS} test "
                "points; each engine in a fresh process (cluster: 2 worker processes)", rows)


if __name__ == "__main__":
    main()
