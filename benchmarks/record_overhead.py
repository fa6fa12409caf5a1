"""Step time with the recorder on / off, measured side by side in one process.

Plain and recorded blocks of steps alternate (so drift and noise hit both alike); the recorded
time includes `close()`, i.e. the background writer's backlog is paid for, not hidden. Prints one
row per workload and recording setting: ms/step off and on, their ratio, raw bytes recorded per
step, the compression achieved, the writer's own seconds per step, and the floor ratio
(plain step + writer time) / plain step that a recorder sharing the machine's cores can't beat.
Run: `python benchmarks/record_overhead.py [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import torch

import attrib
from attrib.cli.render import aligned, human_bytes


@dataclass
class Workload:
    name: str
    model: Callable[[], torch.nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


class TransformerLM(torch.nn.Module):
    """2-layer causal transformer LM: d 256, 4 heads, feed-forward 1024, context 64."""

    def __init__(self, vocab: int = 512, d: int = 256, context: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, d)
        self.position = torch.nn.Parameter(torch.zeros(context, d))
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.body(h, mask=self.mask, is_causal=True)).flatten(0, 1)


def mlp_batch(g: torch.Generator):
    return torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)


def lm_batch(g: torch.Generator):
    tokens = torch.randint(0, 512, (16, 64), generator=g)
    return tokens, torch.roll(tokens, -1, 1).flatten()


WORKLOADS = [
    Workload("mlp 784-256-256-10, batch 128", mlp, mlp_batch),
    Workload("transformer LM d256 x2, seq 64, batch 16", TransformerLM, lm_batch),
]
SETTINGS = {
    "full (zstd)": {},
    "no grads (zstd)": {"record_grads": False},
    "full (lz4)": {"codec": attrib.Codec(cname="lz4", clevel=5, shuffle="shuffle")},
}


def run_block(work: Workload, steps: int, settings: dict | None, out_dir: str | None):
    """Seconds per step over `steps` steps (+ the writer's flush when recording)."""
    model = work.model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    batches = [work.batch(g) for _ in range(steps + 2)]

    def step(rec, x, y, i):
        if rec is not None:
            rec.examples(torch.arange(i * len(x), (i + 1) * len(x)))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if rec is not None:
            rec.log(loss=loss)

    for i, (x, y) in enumerate(batches[:2]):  # warm-up, untimed
        step(None, x, y, i)
    rec = (attrib.Recorder(out_dir, model, opt, checkpoint_every=1000, **settings)
           if out_dir else None)
    started = time.perf_counter()
    for i, (x, y) in enumerate(batches[2:]):
        step(rec, x, y, i)
    if rec is not None:
        rec.close()
    return (time.perf_counter() - started) / steps


def measure(work: Workload, setting: str, steps: int, repeats: int) -> dict:
    plain, recorded, writer = [], [], []
    info = {}
    for r in range(repeats):
        plain.append(run_block(work, steps, None, None))
        with tempfile.TemporaryDirectory() as tmp:
            recorded.append(run_block(work, steps, SETTINGS[setting], f"{tmp}/run{r}"))
            run = attrib.open_run(f"{tmp}/run{r}")
            info = run.info()
            writer.append(sum(run.steps.column("write_seconds").to_pylist()) / steps)
    off, on, write = (statistics.median(v) for v in (plain, recorded, writer))
    return {
        "workload": work.name,
        "params": info["numel"],
        "recording": setting,
        "off_ms": round(off * 1e3, 2),
        "on_ms": round(on * 1e3, 2),
        "ratio": round(on / off, 2),
        "raw_per_step": human_bytes(info["dense_bytes_raw"] / steps),
        "compression": round(info["compression_ratio"], 2),
        "writer_ms": round(write * 1e3, 2),
        "floor_ratio": round((off + write) / off, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    args = parser.parse_args()
    steps, repeats = (10, 1) if args.quick else (48, 3)
    rows = [measure(w, s, steps, repeats) for w in WORKLOADS for s in SETTINGS]
    print(f"# record_overhead: {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; {steps} steps x {repeats} interleaved repeats, AdamW + clipping")
    print(aligned(pa.Table.from_pylist(rows)))


if __name__ == "__main__":
    main()
