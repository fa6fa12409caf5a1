"""Background-writer throughput per codec, alone (no training competing for the cores).

Writes blocks of a workload's aggregate arrays (Δθ, gradient, Adam second moment per parameter
tensor) through the recorder's own RunStore, for each codec and for no compression at all.
Prints raw MiB/s and the compression ratio. Run: `python benchmarks/writer_throughput.py`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from harness import WORKLOADS

from attrib.cli.render import aligned
from attrib.recorder.store import ArraySpec, Codec, RunStore

CODECS = {"zstd-3-bitshuffle (default)": Codec(),
          "zstd-3-bitshuffle, no crc32c": Codec(checksum=False),
          "lz4-5-shuffle": Codec("lz4", 5, "shuffle"),
          "lz4-1-noshuffle": Codec("lz4", 1, "noshuffle"), "none": Codec("none")}


def measure(workload: str, name: str, codec: Codec, depth: int = 2, blocks: int = 6):
    shapes = {n: tuple(p.shape) for n, p in WORKLOADS[workload].model().named_parameters()}
    specs = [ArraySpec(f"{kind}/{n}", s, "float32") for n, s in shapes.items()
             for kind in ("deltas", "grads", "state")]
    rng = np.random.default_rng(0)
    values = {s.path: (rng.standard_normal((depth, *s.step_shape)) * 1e-3).astype("f4")
              for s in specs}
    raw = sum(v.nbytes for v in values.values())
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp), {}, {n: (s, "float32") for n, s in shapes.items()}, codec)
        store.create_step_arrays(specs, depth, {})
        started = time.perf_counter()
        for b in range(blocks):
            store.append_steps(b * depth, values)
        seconds = (time.perf_counter() - started) / blocks
        stored = sum(f.stat().st_size for f in Path(tmp).rglob("*") if "c" in f.parts)
    return {"workload": workload, "codec": name, "arrays": len(specs),
            "MiB_per_s": round(raw / seconds / 2**20),
            "compression": round(blocks * raw / stored, 2)}


def main() -> None:
    rows = [measure(w, name, codec) for w in ("mlp", "transformer")
            for name, codec in CODECS.items()]
    print(f"# writer_throughput.py: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; random "
          "N(0, 1e-3) float32 blocks of 2 steps, writer alone")
    print(aligned(pa.Table.from_pylist(rows)))


if __name__ == "__main__":
    main()
