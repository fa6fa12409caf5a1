"""Where the GPT's trajectory recording cost goes: the same recorded steps, writing the step
arrays to the disk, to tmpfs (/dev/shm), or not at all (the store's append is skipped), each
beside plain steps in one process (harness.run_block, close() included); and the floor: plain
steps while a bare thread writes the same bytes per block the way the recorder writes chunks
(one file per tensor, no recorder).
Run: `python benchmarks/write_cost.py [--steps N]`.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import tempfile
import threading
from pathlib import Path

import torch
from harness import WORKLOADS, print_table, run_block

from attrib.recorder.direct_io import aligned_zeros, write_file
from attrib.recorder.store import RunStore, block_steps


class BareWriter:
    """The floor of writing the trajectory: each step's parameters (the bytes of its gradients)
    copied into a row of a block buffer on the training thread (two buffers, reused), and every
    full block written by a background thread the way the recorder writes chunks
    (recorder/direct_io.py: past the page cache where the file system allows), one file per
    tensor; the last block is written and waited for at the last step, as close() does."""

    def __init__(self, directory: str, steps: int) -> None:
        self.directory, self.steps = Path(directory), steps
        self.queue: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._write_all, daemon=True)
        self.thread.start()
        self.block: list[torch.Tensor] = []
        self.rows = self.depth = 0

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        if not self.depth:
            per_step = sum(p.numel() * p.element_size() for p in params)
            self.depth = block_steps(per_step)
            for _ in range(2):
                self.free.put([aligned_zeros((self.depth, *p.shape), p.dtype) for p in params])
        if not self.rows:
            self.block = self.free.get()
        torch._foreach_copy_([b[self.rows] for b in self.block], params)
        self.rows += 1
        if self.rows == self.depth or step == self.steps - 1:
            self.queue.put((step, self.block, self.rows))
            self.rows = 0
        if step == self.steps - 1:
            self.queue.put(None)
            self.thread.join()

    def _write_all(self) -> None:
        while (item := self.queue.get()) is not None:
            step, block, rows = item
            for k, buffer in enumerate(block):
                write_file(self.directory / f"{step}_{k}",
                           buffer[:rows].reshape(-1).view(torch.uint8).numpy())
            self.free.put(block)


def ratios(steps: int, where: str | None, repeats: int = 2) -> list[float]:
    work = WORKLOADS["gpt"]
    out = []
    for _ in range(repeats):
        plain = run_block(work, steps, None, None)
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            out.append(run_block(work, steps, {"capture": False}, f"{tmp}/run") / plain)
    return out


def floor_ratios(steps: int, repeats: int = 2) -> list[float]:
    work = WORKLOADS["gpt"]
    out = []
    for _ in range(repeats):
        plain = run_block(work, steps, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            out.append(run_block(work, steps, None, None, BareWriter(tmp, steps)) / plain)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for label, where in (("disk (the temporary directory)", None), ("tmpfs (/dev/shm)",
                                                                      "/dev/shm")):
        r = ratios(args.steps, where)
        rows.append({"step arrays written to": label, "ratio": round(statistics.median(r), 3)})
    append = RunStore.append_steps
    RunStore.append_steps = lambda self, first, values: 0  # no bytes written
    try:
        r = ratios(args.steps, None)
    finally:
        RunStore.append_steps = append
    rows.append({"step arrays written to": "nowhere (append skipped)",
                 "ratio": round(statistics.median(r), 3)})
    rows.append({"step arrays written to": "floor: no recorder, a bare thread writes the bytes",
                 "ratio": round(statistics.median(floor_ratios(args.steps)), 3)})
    print_table(f"GPT LM, {args.steps} recorded steps vs plain, gradients (default codec)", rows)


if __name__ == "__main__":
    main()
