"""Shared benchmark harness: workloads and side-by-side recorder on/off measurement.

Each (workload, setting) runs in its own subprocess, so its peak RSS is its own. Inside it,
plain and recorded blocks of steps alternate (noise and drift hit both alike); the recorded time
includes `close()`, so the background writer's backlog is paid for. `fixed_s` is what a run
pays once (the first recorded step beyond a plain one: creating the arrays; and `close()`:
draining the writer, trimming the arrays), `steady_ratio` the ratio with it taken out: what a
run of many more steps than the block's pays per step. The first Recorder of a process pins
glibc's heap thresholds (recorder/allocator.py), which can speed up a plain loop too; the harness
pins them before anything runs, so every plain block runs as fast as it can and the ratios
never credit the recorder with that. A script defines SETTINGS
(name → Recorder keyword arguments) and calls `main(__doc__, SETTINGS)`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import torch

import attrib
from attrib.cli.render import aligned, human_bytes
from attrib.recorder.allocator import pin_heap_thresholds

pin_heap_thresholds()  # see the module docstring


@dataclass
class Workload:
    name: str
    model: Callable[[], torch.nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    steps: int  # per timed block (full run)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(32 * 12 * 12, 10))


class TransformerLM(torch.nn.Module):
    """2-layer causal transformer LM: d 256, 4 heads, feed-forward 1024, context 64."""

    def __init__(self, vocab: int = 512, d: int = 256, context: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, d)
        self.position = torch.nn.Embedding(context, d)
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self.embed(tokens) + self.position(positions)
        return self.head(self.body(h, mask=self.mask, is_causal=True)).flatten(0, 1)


class CausalSelfAttention(torch.nn.Module):
    """Linear q, k, v and output projections around scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.out = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.fc, self.proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(torch.nn.Module):
    """GPT-style LM (nanoGPT's layout): d 256, 2 pre-LayerNorm blocks of 4 heads, Linear
    q/k/v with scaled_dot_product_attention, GELU MLP 4d, learned positions, output weights
    tied to the token embedding; context 64, vocabulary 512."""

    def __init__(self, vocab: int = 512, d: int = 256, layers: int = 2, heads: int = 4,
                 context: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(context, d)
        self.blocks = torch.nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2 and nanoGPT do

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h)).flatten(0, 1)


class GRULM(torch.nn.Module):
    """Recurrent LM: embedding 128, one batch-first GRU of 256, a Linear head per token;
    vocabulary 512 (recorder/recurrent.py's closed form captures the GRU)."""

    def __init__(self, vocab: int = 512, d: int = 128, hidden: int = 256) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, d)
        self.rnn = torch.nn.GRU(d, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out).flatten(0, 1)


def mlp_batch(g: torch.Generator):
    return torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)


def cnn_batch(g: torch.Generator):
    return torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)


def lm_batch(g: torch.Generator):
    tokens = torch.randint(0, 512, (16, 64), generator=g)
    return tokens, torch.roll(tokens, -1, 1).flatten()


WORKLOADS = {
    "mlp": Workload("mlp 784-256-256-10, batch 128", mlp, mlp_batch, 32),
    "cnn": Workload("cnn 2 conv + linear, 28x28, batch 64", cnn, cnn_batch, 32),
    "transformer": Workload("transformer LM d256 x2, seq 64, batch 16", TransformerLM, lm_batch,
                            16),
    "gpt": Workload("GPT LM d256 x2, q/k/v + SDPA, tied, seq 64, batch 16", GPT, lm_batch, 16),
    "gru": Workload("GRU LM d128 h256, seq 64, batch 16", GRULM, lm_batch, 16),
}


def per_example_peer(name: str, model: torch.nn.Module):
    """The peer way of getting per-example gradients: (model to call, backward(x, y)) where
    backward leaves the per-example gradients in memory and the mean in .grad."""
    if name == "opacus":  # hooks fill p.grad_sample, then the usual backward fills .grad
        from opacus import GradSampleModule

        wrapped = GradSampleModule(model)

        def opacus_backward(x, y):
            torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        return opacus_backward
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())

    def loss_one(p, xi, yi):  # one example; a sequence model's tokens stay together
        out = functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi.reshape(-1))

    def func_backward(x, y):
        labels = y.reshape(len(x), -1) if y.numel() != len(x) else y
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(
            {k: v.detach() for k, v in params.items()}, x, labels)
        for name_, p in params.items():
            p.grad = grads[name_].mean(0)
    return func_backward


def run_block(work: Workload, steps: int, settings: dict | None, out_dir: str | None,
              after_step: Callable[[int, torch.nn.Module], None] | None = None,
              parts: dict[str, float] | None = None) -> float:
    """Seconds per step over `steps` AdamW steps with clipping (+ close() when recording);
    settings {"peer": "torch.func" | "opacus"} time a peer's per-example gradients instead;
    `after_step(i, model)` runs after each timed step, inside the timing. `parts`, when
    given, receives the seconds of the first timed step ("first") and of close() ("close")."""
    model = work.model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    batches = [work.batch(g) for _ in range(steps + 2)]
    peer = per_example_peer(settings["peer"], model) if settings and "peer" in settings \
        else None

    def step(rec, x, y, i):
        if rec is not None:
            rec.examples(torch.arange(i * len(x), (i + 1) * len(x)))
        if peer is not None:
            peer(x, y)
        else:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if rec is not None:
            rec.log(loss=loss)

    for i, (x, y) in enumerate(batches[:2]):  # warm-up, untimed
        step(None, x, y, i)
    rec = (attrib.Recorder(out_dir, model, opt, checkpoint_every=1000, strict=True, **settings)
           if out_dir and peer is None else None)
    started = time.perf_counter()
    for i, (x, y) in enumerate(batches[2:]):
        step(rec, x, y, i)
        if after_step is not None:
            after_step(i, model)
        if i == 0 and parts is not None:
            parts["first"] = time.perf_counter() - started
    closing = time.perf_counter()
    if rec is not None:
        rec.close()
    if parts is not None:
        parts["close"] = time.perf_counter() - closing
    return (time.perf_counter() - started) / steps


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_peer(work: Workload, setting: str, settings: dict, steps: int,
                 repeats: int) -> dict:
    """A peer's per-example gradients (kept in memory, nothing stored) against plain steps."""
    row = {"workload": work.name, "recording": setting}
    baseline_rss = _peak_rss_mib()
    plain, peer = [], []
    try:
        for _ in range(repeats):
            plain.append(run_block(work, steps, None, None))
            peer.append(run_block(work, steps, settings, None))
    except Exception as e:  # a peer that cannot run this model says why
        return {**row, "note": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    off, on = statistics.median(plain), statistics.median(peer)
    return {**row, "off_ms": round(off * 1e3, 2), "on_ms": round(on * 1e3, 2),
            "ratio": round(on / off, 2),
            "extra_peak_rss": f"{_peak_rss_mib() - baseline_rss:.0f} MiB",
            "note": "peer: per-example gradients in memory, nothing stored"}


def measure_here(work: Workload, setting: str, settings: dict, steps: int, repeats: int,
                 versus: tuple[str, dict] | None = None) -> dict:
    """One row; with `versus` (a setting's name and keywords), blocks recorded that way
    alternate with the plain and recorded ones in this process (before the recorded block on
    even repeats, after it on odd ones), and `vs_ms`, `vs_ratio` compare the two recordings
    directly; `extra_peak_rss` is then the larger of the two recordings' peaks."""
    if "peer" in settings:
        return measure_peer(work, setting, settings, steps, repeats)
    row = {"workload": work.name, "recording": setting}
    plain, recorded, writer, fixed = [run_block(work, steps, None, None)], [], [], []
    reference: list[float] = []
    baseline_rss = _peak_rss_mib()
    info: dict = {}
    try:
        for r in range(repeats):
            if r:
                plain.append(run_block(work, steps, None, None))
            if versus is not None and r % 2 == 0:  # alternate which of the two goes first
                reference.append(_recorded_block(work, steps, versus[1]))
            with tempfile.TemporaryDirectory() as tmp:
                parts: dict[str, float] = {}
                recorded.append(run_block(work, steps, settings, f"{tmp}/run", parts=parts))
                fixed.append(parts["first"] + parts["close"] - plain[-1])
                run = attrib.open_run(f"{tmp}/run")
                info = run.info()
                writer.append(sum(run.steps.column("write_seconds").to_pylist()) / steps)
            if versus is not None and r % 2 == 1:
                reference.append(_recorded_block(work, steps, versus[1]))
    except ValueError as e:  # a setting the recorder refuses for this model (with the reason)
        return {**row, "note": str(e).split(";")[0]}
    off, on, write, once = (statistics.median(v) for v in (plain, recorded, writer, fixed))
    return {
        **row,
        "params": info["numel"],
        "off_ms": round(off * 1e3, 2),
        "on_ms": round(on * 1e3, 2),
        "ratio": round(on / off, 2),
        "fixed_s": round(once, 2),
        "steady_ratio": round((on * steps - once) / (off * steps), 2),
        "raw_per_step": human_bytes(info["dense_bytes_raw"] / steps),
        "compression": round(info["compression_ratio"], 2),
        "bytes_per_param_step": round(info["bytes_per_param_step"], 2),
        "writer_ms": round(write * 1e3, 2),
        "floor_ratio": round((off + write) / off, 2),
        "extra_peak_rss": f"{_peak_rss_mib() - baseline_rss:.0f} MiB",
        **({"versus": versus[0], "vs_ms": round(statistics.median(reference) * 1e3, 2),
            "vs_ratio": round(on / statistics.median(reference), 2)} if versus else {}),
    }


def _recorded_block(work: Workload, steps: int, settings: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return run_block(work, steps, settings, f"{tmp}/run")


def print_table(description: str, rows: list[dict], max_rows: int = 100) -> None:
    """A benchmark's output: a header line (script, date, cores, torch) and the rows."""
    print(f"# {os.path.basename(sys.argv[0])}: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} "
          f"cores, torch {torch.__version__}; {description}")
    print(aligned(pa.Table.from_pylist(rows), max_rows))


def run_isolated(*args: str) -> dict:
    """Run this script again as `--one ARGS...` in a fresh process (its own peak RSS, no
    state carried over) and return the JSON object it prints last."""
    out = subprocess.run([sys.executable, sys.argv[0], "--one", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(doc: str, settings: dict[str, dict], workloads: list[str] | None = None,
         steps: dict[str, int] | None = None) -> None:
    """Measure every (workload, setting) in its own process; `steps` overrides a workload's
    timed steps per block (long enough that opening and closing a run, ~1 s for the LMs,
    is paid for the way a real run pays for it: once)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int,
                        help="timed steps per block for every workload (default: the script's)")
    parser.add_argument("--setting", action="append", choices=list(settings),
                        help="measure only these settings (repeatable; default: all)")
    parser.add_argument("--workload", action="append", choices=list(workloads or WORKLOADS),
                        help="measure only these workloads (repeatable; default: all)")
    parser.add_argument("--versus", choices=list(settings),
                        help="also record each block this way, interleaved in the same "
                             "process, and report on_ms against it (vs_ratio)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per row (default 2)")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    repeats = 1 if args.quick else args.repeats or 2
    if args.one:
        work = WORKLOADS[args.one[0]]
        count = 4 if args.quick else args.steps or work.steps
        versus = (args.versus, settings[args.versus]) if args.versus else None
        print(json.dumps(measure_here(work, args.one[1], settings[args.one[1]], count, repeats,
                                      versus)))
        return
    rows = []
    for name in args.workload or workloads or list(WORKLOADS):
        for setting in args.setting or settings:
            count = args.steps or (steps or {}).get(name)
            rows.append(run_isolated(name, setting, *(["--quick"] if args.quick else []),
                                     *(["--steps", str(count)] if count else []),
                                     *(["--versus", args.versus] if args.versus else []),
                                     *(["--repeats", str(repeats)] if args.repeats else [])))
    print(f"# {os.path.basename(sys.argv[0])}: {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; {repeats} interleaved repeats per row, AdamW + clipping"
          + (f"; vs_ratio: on_ms against {args.versus!r} blocks interleaved in the same process"
             if args.versus else ""))
    columns = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k)
                     if k in rows[0] else len(rows[0]))
    print(aligned(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]),
                  max_rows=100))
