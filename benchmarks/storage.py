"""Storage: compression ratio and speed per codec on real recorded streams, and the
attribution error each lossy option introduces.

Records one run (MLP 784-64-10 on MNIST-shaped random inputs with a learnable rule, AdamW,
batch 32, 60 steps) with Full capture and one with Project(256, kron), then reads back each
stream: deltas Δθ, consumed gradients, Adam's second moment, per-example contributions (full)
and their projections. Every stream is compressed with lossless Blosc settings (the
recorder's default zstd-3 + bit shuffle, lz4) and lossy options: float16, bfloat16, and
numcodecs' BitRound (keep 10 or 7 mantissa bits) before zstd. MB/s is compression
throughput of the raw float32 bytes on one core. For the per-example streams, the lossy
variants are written back into a copy of the run and the path kernel is recomputed: the error
is 1 − Spearman rank correlation of the per-example influences with the float32 ones.
Run: `python benchmarks/storage.py [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numcodecs
import numpy as np
import pyarrow as pa
import torch
import zarr

import attrib
from attrib.analyzer.evaluate import spearman
from attrib.cli.render import aligned
from attrib.schemas import format as fmt

LOSSLESS = {
    "zstd-3 + bitshuffle (default)": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.BITSHUFFLE),
    "lz4-5 + shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
}
ZSTD = numcodecs.Blosc("zstd", 3, numcodecs.Blosc.BITSHUFFLE)


def as_float16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def as_bfloat16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).to(torch.float32).numpy()


def bit_round(keep: int):
    codec = numcodecs.BitRound(keepbits=keep)
    return lambda a: codec.decode(codec.encode(a.copy())).reshape(a.shape).astype(np.float32)


LOSSY = {  # name → (what is stored, round trip)
    "float16 + zstd": (lambda a: a.astype(np.float16), as_float16),
    "bfloat16 + zstd": (lambda a: torch.from_numpy(a).to(torch.bfloat16).view(torch.int16)
                        .numpy(), as_bfloat16),
    "bitround 10 + zstd": (lambda a: bit_round(10)(a), bit_round(10)),
    "bitround 7 + zstd": (lambda a: bit_round(7)(a), bit_round(7)),
}


def make() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 784, generator=g)
    return x, (x[:, :10] @ torch.randn(10, 10, generator=g)).argmax(1)


def record(path: str, capture, steps: int) -> attrib.Run:
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = data()
    g = torch.Generator().manual_seed(2)
    with attrib.Recorder(path, model, opt, capture=capture) as rec:
        for _ in range(steps):
            ids = torch.randint(0, len(y), (32,), generator=g)
            rec.examples(ids)
            torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return attrib.open_run(path)


def streams(run: attrib.Run) -> dict[str, list[zarr.Array]]:
    group = zarr.open_group(run.dir / fmt.STORE_DIR, mode="r")
    out: dict[str, list[zarr.Array]] = {}
    for kind, label in ((fmt.DELTAS, "deltas"), (fmt.GRADS, "gradients"),
                        (fmt.STATE, "adam exp_avg_sq"), (fmt.CONTRIB, "per-example full"),
                        (fmt.PROJ, "per-example projected")):
        if kind not in group:
            continue
        arrays = [a for _, a in group[kind].arrays()] if kind != fmt.STATE else \
            [a for _, g in group[kind].groups() for _, a in g.arrays()]
        out[label] = arrays
    return out


def compress_row(label: str, arrays: list[zarr.Array], name: str, encode) -> dict:
    raw = stored = 0
    seconds = 0.0
    for array in arrays:
        values = np.ascontiguousarray(array[...], dtype=np.float32)
        started = time.perf_counter()
        payload = encode(values)
        seconds += time.perf_counter() - started
        raw += values.nbytes
        stored += len(payload)
    return {"stream": label, "codec": name, "ratio": round(raw / stored, 2),
            "MB_per_s": round(raw / 1e6 / seconds), "raw": raw}


def influence(run_dir: str, test) -> np.ndarray:
    result = attrib.analyze.path_kernel(attrib.open_run(run_dir), make, test, progress=False)
    table = result.table.filter(pa.compute.field("term") == "data")
    table = table.group_by(["test_id", "example_id"]).aggregate([("value", "sum")])
    table = table.sort_by([("test_id", "ascending"), ("example_id", "ascending")])
    return table["value_sum"].to_numpy()


def lossy_error(run: attrib.Run, kind: str, roundtrip, tmp: str, reference: np.ndarray,
                test) -> float:
    copy = f"{tmp}/lossy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run.dir, copy)
    group = zarr.open_group(f"{copy}/{fmt.STORE_DIR}", mode="r+")
    for _, array in group[kind].arrays():
        array[...] = roundtrip(np.asarray(array[...], dtype=np.float32))
    return 1 - spearman(influence(copy, test), reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 12 if args.quick else 60
    x, y = data()
    test = (x[:8] + 0.05, y[:8])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        full = record(f"{tmp}/full", attrib.Full(), steps)
        projected = record(f"{tmp}/proj", attrib.Project(256), steps)
        references = {fmt.CONTRIB: influence(str(full.dir), test),
                      fmt.PROJ: influence(str(projected.dir), test)}
        found = {**streams(full), "per-example projected": streams(projected)[
            "per-example projected"]}
        for label, arrays in found.items():
            for name, codec in LOSSLESS.items():
                rows.append({**compress_row(label, arrays, name, codec.encode),
                             "attribution_error": "0 (lossless)"})
            for name, (stored, roundtrip) in LOSSY.items():
                row = compress_row(label, arrays, name,
                                   lambda a, stored=stored: ZSTD.encode(stored(a)))
                kind, run = ((fmt.CONTRIB, full) if label == "per-example full" else
                             (fmt.PROJ, projected) if label == "per-example projected" else
                             (None, None))
                row["attribution_error"] = (
                    f"{lossy_error(run, kind, roundtrip, tmp, references[kind], test):.1e}"
                    if kind else "n/a (trajectory: keep lossless)")
                rows.append(row)
    print(f"# storage.py: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, numcodecs "
          f"{numcodecs.__version__}; MLP 784-64-10, AdamW, batch 32, {steps} steps; "
          "attribution error = 1 − Spearman(per-example path-kernel influences, float32)")
    for row in rows:
        row["raw"] = f"{row['raw'] / 2**20:.1f} MiB"
    print(aligned(pa.Table.from_pylist(rows), 100))


if __name__ == "__main__":
    main()
