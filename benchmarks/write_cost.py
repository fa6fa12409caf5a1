"""Where the GPT's trajectory recording cost goes: the same recorded steps, writing the step
arrays to the disk, to tmpfs (/dev/shm), or not at all (the store's append is skipped), each
beside plain steps in one process (harness.run_block, close() included).
Run: `python benchmarks/write_cost.py [--steps N]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from harness import WORKLOADS, print_table, run_block

from attrib.recorder.store import RunStore


def ratios(steps: int, where: str | None, repeats: int = 2) -> list[float]:
    work = WORKLOADS["gpt"]
    out = []
    for _ in range(repeats):
        plain = run_block(work, steps, None, None)
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            out.append(run_block(work, steps, {"capture": False}, f"{tmp}/run") / plain)
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
    RunStore.append_steps = lambda self, first, values: None
    try:
        r = ratios(args.steps, None)
    finally:
        RunStore.append_steps = append
    rows.append({"step arrays written to": "nowhere (append skipped)",
                 "ratio": round(statistics.median(r), 3)})
    print_table(f"GPT LM, {args.steps} recorded steps vs plain, gradients (default codec)", rows)


if __name__ == "__main__":
    main()
