"""SQL at scale: the standard queries over 10⁶, 10⁷ and 10⁸ rows of `shifts` and `influence`.

A real recorded run (a 4-layer MLP of 512-wide Linear layers, TopK capture, tokens) gets its
`shifts` and `tokens` tables replaced by synthetic rows in the recorder's own layout: Parquet
files of `COMPACT_ROWS` rows, each covering a step range, zstd, as `Recorder.close()` leaves
them. Rows: 1,000 per step (TopK(1000)), batch 32 from 100,000 examples, shifts spread over the
four weights with a few hot neurons; tokens: 64 per example from a Zipf-distributed vocabulary
of 10,000. The run also gets a stored analysis with as many `influence` rows (100 test points,
examples, steps; one Parquet file as `attrib.analyze.save` writes it) for the influence top-n
per test point. Each query runs through `attrib.sql` / the named queries, the way users run
them; seconds are the median of 3 runs (DuckDB on every core).
Run: `python benchmarks/shift_queries.py [--max-rows 1e8]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import attrib
from attrib.analyzer.queries import named_query
from attrib.cli.render import aligned, human_bytes
from attrib.recorder.store import COMPACT_ROWS
from attrib.schemas import format as fmt

WIDTH, LAYERS, ROWS_PER_STEP, EXAMPLES, TOKENS_PER_EXAMPLE, VOCAB = 512, 4, 1000, 100_000, 64, \
    10_000
HOT = f"{LAYERS - 1}:7"  # a hot output neuron of the last layer


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def recorded_run(path: Path) -> attrib.Run:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with attrib.Recorder(path, net, opt, capture=attrib.TopK(8), record_grads=False,
                         vocabulary=[f"tok{i}" for i in range(VOCAB)]) as rec:
        rec.examples([0, 1], tokens=torch.zeros(2, 4, dtype=torch.long))
        net(torch.randn(2, WIDTH)).pow(2).mean().backward()
        opt.step()
    return attrib.open_run(path)


def shift_rows(first_step: int, steps: int, g: np.random.Generator) -> pa.Table:
    n = steps * ROWS_PER_STEP
    step = np.repeat(np.arange(first_step, first_step + steps), ROWS_PER_STEP)
    batch = g.integers(0, EXAMPLES, (steps, 32))
    example = batch[np.repeat(np.arange(steps), ROWS_PER_STEP), g.integers(0, 32, n)]
    layer = g.integers(0, LAYERS, n)
    row = np.where(g.random(n) < 0.05, 7, g.integers(0, WIDTH, n))  # neuron 7 is hot
    col = g.integers(0, WIDTH, n)
    names = np.array([f"{i}.weight" for i in range(LAYERS)], dtype=object)
    shift = (g.standard_cauchy(n) * 1e-4).astype(np.float32)
    return pa.table({"step": step, "epoch": step // 3000, "example_id": example,
                     "param": pa.array(names[layer]).dictionary_encode().cast(pa.string()),
                     "flat_index": row * WIDTH + col, "row": row, "col": col, "shift": shift,
                     "grad": shift * 10}).cast(fmt.SHIFTS)


def token_rows(g: np.random.Generator) -> pa.Table:
    ids = np.repeat(np.arange(EXAMPLES), TOKENS_PER_EXAMPLE)
    token_ids = np.minimum(g.zipf(1.2, len(ids)) - 1, VOCAB - 1)
    return pa.table({"example_id": ids, "position": np.tile(np.arange(TOKENS_PER_EXAMPLE,
                                                                      dtype=np.int32), EXAMPLES),
                     "token_id": token_ids,
                     "token": pa.array([f"tok{i}" for i in range(VOCAB)])
                     .take(pa.array(token_ids))}).cast(fmt.TOKENS)


def fill(run: attrib.Run, rows: int) -> int:
    """Replace the run's shifts and tokens tables with synthetic parts; returns shift bytes."""
    g = np.random.default_rng(0)
    manifest_path = run.dir / fmt.MANIFEST_FILE
    manifest = fmt.read_json(manifest_path)
    steps_per_file = COMPACT_ROWS // ROWS_PER_STEP
    total_steps, parts, size = rows // ROWS_PER_STEP, [], 0
    for index, first in enumerate(range(0, total_steps, steps_per_file)):
        steps = min(steps_per_file, total_steps - first)
        relative = fmt.table_part_name("shifts", first, first + steps - 1, 10_000 + index)
        (run.dir / relative).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(shift_rows(first, steps, g), run.dir / relative, compression="zstd")
        size += (run.dir / relative).stat().st_size
        parts.append(relative)
    tokens = fmt.table_part_name("tokens", 0, 0, 99_999)
    pq.write_table(token_rows(g), run.dir / tokens, compression="zstd")
    manifest["tables"]["shifts"], manifest["tables"]["tokens"] = parts, [tokens]
    fmt.write_json_atomic(manifest_path, manifest)
    return size


def fill_influence(run: attrib.Run, rows: int) -> None:
    """A stored analysis with `rows` influence rows (test_id, term, example_id, step, value)."""
    g = np.random.default_rng(1)
    folder = run.dir / "analysis" / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    chunk = 10**7
    schema = None
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        index = np.arange(start, start + n)
        table = pa.table({
            "test_id": (index % 100).astype(np.int32),
            "term": pa.DictionaryArray.from_arrays(np.zeros(n, np.int8), ["data"]),
            "example_id": g.integers(0, EXAMPLES, n), "step": index // 3200,
            "value": g.standard_normal(n) * 1e-3,
            "analysis": pa.DictionaryArray.from_arrays(np.zeros(n, np.int8), ["synthetic"]),
            "method": pa.DictionaryArray.from_arrays(np.zeros(n, np.int8), ["path-kernel"])})
        if writer is None:
            schema = table.schema
            writer = pq.ParquetWriter(folder / "influence.parquet", schema, compression="zstd")
        writer.write_table(table)
    writer.close()


def timed(fn) -> tuple[float, int]:
    seconds, rows = [], 0
    for _ in range(3):
        started = time.perf_counter()
        rows = fn().num_rows
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rows", type=float, default=1e8)
    args = parser.parse_args()
    sizes = [n for n in (10**6, 10**7, 10**8) if n <= args.max_rows]
    queries = {
        "top_shifts_per_step (k=10)": lambda run: attrib.sql(
            run, "SELECT count(*) AS n, sum(abs(shift)) AS mass FROM ("
                 + named_query("top_shifts_per_step").text + ")",
            {"k": 10, "param": "*"}),
        "top_neurons (per-neuron aggregation)": lambda run: attrib.analyze.top_neurons(run),
        "neuron_examples (hot neuron)": lambda run: attrib.analyze.neuron_examples(run, HOT),
        "token_enrichment (hot neuron)": lambda run: attrib.analyze.token_enrichment(run, HOT),
        "step range: count of 1,000 steps": lambda run: attrib.sql(
            run, "SELECT count(*) FROM shifts WHERE step BETWEEN 1000 AND 1999"),
        "influence top-10 examples per test point": lambda run: attrib.sql(
            run, "SELECT test_id, unnest(max_by(example_id, total, 10)) AS example_id FROM "
                 "(SELECT test_id, example_id, sum(value) AS total FROM influence "
                 "GROUP BY ALL) GROUP BY test_id"),
    }
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            run = recorded_run(Path(tmp) / f"run{n}")
            size = fill(run, n)
            fill_influence(run, n)
            run = attrib.open_run(run.dir)  # the manifest now lists the synthetic parts
            for name, query in queries.items():
                seconds, result_rows = timed(lambda q=query, r=run: q(r))
                out.append({"shift_rows": f"{n:.0e}", "parquet": human_bytes(size),
                            "files": len(run.table_files("shifts")), "query": name,
                            "seconds": round(seconds, 3), "result_rows": result_rows})
            print(f"done {n:.0e}", flush=True)
    print(f"# shift_queries.py: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
          f"duckdb {__import__('duckdb').__version__}; {ROWS_PER_STEP} shift rows per step, "
          f"files of {COMPACT_ROWS:,} rows; median of 3")
    print(aligned(pa.Table.from_pylist(out), 100))


if __name__ == "__main__":
    main()
