"""Background-writer throughput per codec, alone (no training competing for the cores).

Writes blocks of a workload's trajectory (format v2: the consumed gradient of every parameter
tensor) through the recorder's own RunStore, for each codec and for no compression at all,
blocks as deep as the recorder makes them (64 MiB, at most 64 steps). Prints raw MiB/s, the
median over blocks after a warm-up block: encode and hand-off to the file system (chunks of
64 KiB and more past the page cache, recorder/direct_io.py), the writer's own throughput;
MiB per CPU second (every thread of the process), what writing costs the cores that train; and
the compression ratio. One row per workload writes the default codec buffered (through the page
cache), as the writer did before, for comparison.
Run: `python benchmarks/writer_throughput.py`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from harness import WORKLOADS

from attrib.analyzer.guarded_store import chunk_files
from attrib.cli.render import aligned
from attrib.recorder import direct_io
from attrib.recorder.direct_io import aligned_zeros
from attrib.recorder.store import ArraySpec, Codec, Codecs, RunStore, block_steps

CODECS = {"zstd-3-bitshuffle": Codec(),
          "zstd-3-bitshuffle, no crc32c": Codec(checksum=False),
          "lz4-5-shuffle": Codec("lz4", 5, "shuffle"),
          "lz4-1-noshuffle": Codec("lz4", 1, "noshuffle"),
          "none (crc32c; default)": Codec("none"), "none, no crc32c": Codec("none", checksum=False)}


ROUNDS = 2  # every row is measured once per round; deleting one row's files and the kernel's
# writeback of them slow whichever row comes next, so the faster round is the writer's own speed


BUFFERED = "none (crc32c), page cache"  # the default codec written buffered, for comparison


def measure(workload: str, name: str, codec: Codec, blocks: int = 6):
    shapes = {n: tuple(p.shape) for n, p in WORKLOADS[workload].model().named_parameters()}
    specs = [ArraySpec(f"grads/{n}", s, "float32") for n, s in shapes.items()]
    depth = block_steps(sum(s.step_bytes for s in specs))
    rng = np.random.default_rng(0)
    values = {s.path: aligned_zeros((depth, *s.step_shape), torch.float32).numpy()
              for s in specs}  # aligned as the recorder's block buffers are
    for v in values.values():
        v[:] = rng.standard_normal(v.shape) * 1e-3
    raw = sum(v.nbytes for v in values.values())
    with tempfile.TemporaryDirectory() as tmp, _page_cache_only(name == BUFFERED):
        store = RunStore(Path(tmp), {}, [], Codecs.of(codec))
        store.create_step_arrays(specs, depth, {})
        store.append_steps(0, values)  # warm-up: creates the chunk files, first page faults
        os.sync()  # no dirty pages left: measure the writer, not earlier rows' writeback
        times, cpu = [], []
        for b in range(1, blocks + 1):
            started, cpu_started = time.perf_counter(), time.process_time()
            store.append_steps(b * depth, values)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        seconds = statistics.median(times)
        stored = sum(f.stat().st_size for f in chunk_files(Path(tmp)))
    return {"workload": workload, "codec": name, "arrays": len(specs), "steps_per_block": depth,
            "MiB_per_s": round(raw / seconds / 2**20),
            "MiB_per_cpu_s": round(raw / statistics.median(cpu) / 2**20),
            "compression": round((blocks + 1) * raw / stored, 2)}


@contextlib.contextmanager
def _page_cache_only(on: bool):
    """Chunks written buffered, as before recorder/direct_io.py, while `on`."""
    direct, direct_io._O_DIRECT = direct_io._O_DIRECT, 0 if on else direct_io._O_DIRECT
    try:
        yield
    finally:
        direct_io._O_DIRECT = direct


def main() -> None:
    cases = [(w, name, codec) for w in ("mlp", "transformer", "gpt")
             for name, codec in [*CODECS.items(), (BUFFERED, Codec("none"))]]
    rounds = [[measure(*case) for case in cases] for _ in range(ROUNDS)]
    rows = [max(tries, key=lambda r: r["MiB_per_s"]) for tries in zip(*rounds)]
    print(f"# writer_throughput.py: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; random "
          "N(0, 1e-3) float32 gradient blocks, writer alone (O_DIRECT where the file system "
          "allows, no fsync)")
    print(aligned(pa.Table.from_pylist(rows)))


if __name__ == "__main__":
    main()
