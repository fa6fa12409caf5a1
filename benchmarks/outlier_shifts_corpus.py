"""Outlier parameter shifts on real text, end to end (METHODS.md §5 and §6's outlier-shift LM,
scaled to 2 CPU cores).

Corpus: the English of Python's own documentation topics (`pydoc_data.topics`, shipped with
every CPython), lower-cased words and punctuation, words seen once → <unk>, cut into 35-token
examples. Model: a 2-layer causal transformer LM (d 64, 4 heads, feed-forward 128, dropout 0.2),
StepLR γ 0.95 per epoch, gradient clipping at norm 0.5, batch 20, as in the original study, but
AdamW (lr 3e-3) instead of its SGD lr 5.0: at this scale SGD lr 5.0 did not learn in 3 epochs
(loss 5.33, one token predicted everywhere; AdamW: loss 4.12, 32 distinct predictions).
Recorder: TopK(1000) over the feed-forward weights (embeddings, attention and
unembedding excluded), tokens kept per example. Then: the top feed-forward neurons by outlier
shift count, each one's enriched tokens (m, r, c knobs) and a zero-weight ablation over 400
training examples: per token, the share of predictions that flip, notable tokens vs the rest.
Run: `python benchmarks/outlier_shifts_corpus.py [--epochs 10] [--neurons 6] [--r 20] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from tqdm import tqdm

import attrib
from attrib.analyzer.shifts import flips_summary
from attrib.cli.render import aligned

CONTEXT, BATCH, D, HEADS, FF, LAYERS = 35, 20, 64, 4, 128, 2


def corpus() -> tuple[torch.Tensor, list[str]]:
    """(examples, CONTEXT + 1) token ids and the vocabulary."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())
    counts = Counter(words)
    vocabulary = ["<unk>", *sorted(w for w, n in counts.items() if n > 1)]
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = torch.tensor([index.get(w, 0) for w in words])
    n = (len(ids) - 1) // CONTEXT
    rows = torch.stack([ids[i * CONTEXT: i * CONTEXT + CONTEXT + 1] for i in range(n)])
    return rows, vocabulary


class LanguageModel(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, D)
        self.position = torch.nn.Embedding(CONTEXT, D)
        layer = torch.nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.2, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = torch.nn.Linear(D, vocab)
        for embedding in (self.embed.weight, self.head.weight):  # the study's initialisation
            torch.nn.init.uniform_(embedding, -0.1, 0.1)
        torch.nn.init.zeros_(self.head.bias)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        h = self.embed(tokens) + self.position(positions)
        return self.head(self.body(h, mask=self.mask, is_causal=True))


def train(path: str, rows: torch.Tensor, vocabulary: list[str], epochs: int) -> float:
    model = LanguageModel(len(vocabulary))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.95)
    g = torch.Generator().manual_seed(1)
    capture = attrib.TopK(1000, params=("*linear*",))
    started = time.perf_counter()
    with attrib.Recorder(path, model, opt, capture=capture, record_grads=False,
                         checkpoint_every=200, vocabulary=vocabulary) as rec:
        steps = epochs * math.ceil(len(rows) / BATCH)
        with tqdm(total=steps, desc="training (recorded)", unit="step") as bar:
            for epoch in range(epochs):
                rec.epoch(epoch)
                for ids in torch.randperm(len(rows), generator=g).split(BATCH):
                    batch = rows[ids]
                    rec.examples(ids, tokens=batch)
                    logits = model(batch[:, :-1])
                    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                    opt.step()
                    opt.zero_grad()
                    rec.log(loss=loss)
                    bar.update(1)
                schedule.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--neurons", type=int, default=6, help="neurons to enrich and ablate")
    parser.add_argument("--r", type=int, default=20, help="enrichment: tokens kept by relative "
                        "frequency (the study's 200 of 28k words; 20 of our 2.4k)")
    parser.add_argument("--out", help="keep the recorded run here (default: a temporary dir)")
    args = parser.parse_args()
    rows, vocabulary = corpus()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or f"{tmp}/run"
        seconds = train(path, rows, vocabulary, args.epochs)
        run = attrib.open_run(path)
        losses = run.steps.column("loss").to_numpy()
        print(f"# outlier_shifts_corpus.py: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores,"
              f" torch {torch.__version__}; pydoc_data.topics: {rows.numel():,} tokens, "
              f"{len(rows):,} examples, vocabulary {len(vocabulary):,}; {run.n_steps} steps in "
              f"{seconds:.0f} s; loss {losses[:20].mean():.2f} (first 20 steps) → "
              f"{losses[-20:].mean():.2f} (last 20); {run.shifts.num_rows:,} shift rows")
        neurons = attrib.analyze.top_neurons(run, param="*linear1*", n=args.neurons)
        print("\n## top feed-forward neurons (linear1 rows) by outlier-shift count")
        print(aligned(neurons))
        inputs = rows[:400, :-1]
        summary = []
        for spec in neurons["neuron"].to_pylist():
            print(f"\n## {spec}: enriched tokens (m=20, r={args.r}, c=5)")
            print(aligned(attrib.analyze.token_enrichment(run, spec, r=args.r)))
            flips = attrib.analyze.ablate(
                run, lambda: LanguageModel(len(vocabulary)), inputs, spec, r=args.r)
            print(f"\n## {spec}: zero-weight ablation over 400 training examples "
                  "(tokens with ≥ 3 flips)")
            print(aligned(flips.filter(pc.field("flips") >= 3), 15))
            summary.append({"neuron": spec, **{k: round(v, 3) if isinstance(v, float) else v
                                               for k, v in flips_summary(flips).items()},
                            "flipped_positions": int(pc.sum(flips["flips"]).as_py() or 0) // 2,
                            "positions": inputs.numel()})
        print("\n## notable (enriched) tokens vs the rest: share of their predictions that flip")
        print(aligned(pa.Table.from_pylist(summary)))


if __name__ == "__main__":
    main()
