"""Recording under DistributedDataParallel: step time per rank with the recorder off and on.

2 gloo processes on CPU (1 torch thread each) train the MLP 784-256-256-10, 64 examples per rank
and step, with AdamW and clipping: plain, then recorded (aggregate trajectory only, and with
Project(1024, kron) per-example capture). Each rank writes its own per-example rows, and rank 0
commits once every rank's marker has reached a block, so the `on` time includes that
coordination. Also prints the same settings in one process over the same global batch (2
threads). Run: `python benchmarks/ddp_overhead.py`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import mlp, print_table

import attrib

LOCAL_BATCH = 64
SETTINGS = {"aggregate only": {"capture": False},
            "Project(1024, kron)": {"capture": attrib.Project(1024)}}


def train(model, opt, steps: int, rank: int, world: int, rec=None) -> float:
    """Seconds per step (the recorder's close included)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, world * LOCAL_BATCH, 784, generator=g)
    y = torch.randint(0, 10, (steps, world * LOCAL_BATCH), generator=g)
    started = time.perf_counter()
    for step in range(steps):
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        if rec is not None:
            rec.examples(torch.arange(LOCAL_BATCH) + rank * LOCAL_BATCH)
        torch.nn.functional.cross_entropy(model(x[step, mine]), y[step, mine]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    if rec is not None:
        rec.close()
    return (time.perf_counter() - started) / steps


def measure(rank: int, world: int, steps: int, where: str, results) -> None:
    """One rank (or the single process, world 1): plain, then each setting."""
    if world > 1:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{where}/init", rank=rank,
                                world_size=world)
    try:
        out = {}
        for name, kwargs in {"plain": None, **SETTINGS}.items():
            net = mlp()
            model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            rec = (attrib.Recorder(f"{where}/{name}-{world}", model, opt, **kwargs)
                   if kwargs is not None else None)
            out[name] = train(model, opt, steps, rank, world, rec)
        results[rank] = out
    finally:
        if world > 1:
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as where:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(measure, args=(2, args.steps, where, results), nprocs=2)
        ranks = [results[r] for r in range(2)]
        single: dict = {}
        measure(0, 1, args.steps, where, single)
    for label, timings in (("DDP, 2 ranks (slowest)", {k: max(r[k] for r in ranks)
                                                       for k in ranks[0]}),
                           ("1 process, same global batch", single[0])):
        for name in SETTINGS:
            rows.append({"setup": label, "recording": name,
                         "off_ms": round(timings["plain"] * 1e3, 2),
                         "on_ms": round(timings[name] * 1e3, 2),
                         "ratio": round(timings[name] / timings["plain"], 2)})
    print_table(f"MLP 784-256-256-10, {LOCAL_BATCH} examples per rank and step, AdamW + "
                f"clipping, {args.steps} steps, gloo on {os.cpu_count()} CPU cores", rows)


if __name__ == "__main__":
    main()
