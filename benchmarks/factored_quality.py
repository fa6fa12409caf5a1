"""Per-example influence quality at equal bytes: exact factors, rank-r factors, projections.

One small GPT-style LM run (d 64, 2 blocks, Linear q/k/v + SDPA, tied head, context 64 by
default, AdamW, batch 8, 40 steps) on real text (Python's bundled pydoc topics, one token per
ASCII character: vocabulary 128) is recorded with Full capture (the exact reference) and with
each mode below; `attrib.analyze.path_kernel` then gives every (test point,
example) influence, and `r_vs_exact` is their Pearson correlation with the Full run's. The
modes differ on the 12 block weight matrices only (the embeddings, norms and biases are kept in
full in every run); `floats_per_example` counts what each stores for those matrices per example
and step: rank-r factors r·(d_out + d_in) per matrix, projections k per matrix, exact factors
T·(d_out + d_in) where that is below d_out·d_in (else the row, which Factored() then stores).
Projections (kron, dense Gaussian, sparse JL) use the k that matches rank 8's bytes; each is
recorded with SEEDS projection seeds and `r_vs_exact` is their mean (`r_range`: min–max).
Run: `python benchmarks/factored_quality.py [--quick] [--context T]`.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch
from harness import GPT, print_table

import attrib

VOCAB, D, BATCH = 128, 64, 8
SEEDS = (0, 1, 2)
CONTEXT = 64  # --context sets it
MATRICES = tuple(f"blocks.{b}.{name}.weight" for b in range(2)
                 for name in ("attn.q", "attn.k", "attn.v", "attn.out", "fc", "proj"))


def make() -> torch.nn.Module:
    return GPT(vocab=VOCAB, d=D, layers=2, heads=4, context=CONTEXT)


def shapes() -> dict[str, tuple[int, ...]]:
    params = dict(make().named_parameters())
    return {name: tuple(params[name].shape) for name in MATRICES}


def modes(k_equal: int) -> dict[str, list[list]]:
    """Mode → its capture policies, one list per recording (a projection: one per seed)."""
    rest = attrib.Full(params=tuple(n for n, _ in make().named_parameters()
                                    if n not in MATRICES))
    factored = {"Factored() exact": [[attrib.Factored(params=MATRICES), rest]],
                "Factored(rank=8)": [[attrib.Factored(params=MATRICES, rank=8), rest]],
                "Factored(rank=2)": [[attrib.Factored(params=MATRICES, rank=2), rest]]}
    return {**factored, **{
        f"Project({k_equal}, {kind})": [[attrib.Project(k_equal, seed, kind, MATRICES), rest]
                                        for seed in SEEDS]
        for kind in ("kron", "dense", "sjlt")}}


def corpus() -> torch.Tensor:
    """Python's bundled documentation (pydoc_data.topics) as ASCII character codes."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("ascii", "replace")), dtype=torch.long)


def floats_per_example(mode: str, k_equal: int) -> int:
    if mode.startswith("Project"):
        return k_equal * len(MATRICES)
    tokens = CONTEXT if "exact" in mode else int(mode.split("rank=")[1].rstrip(")"))
    return sum(min(tokens * (m + n), m * n) for m, n in shapes().values())


def sequences(text: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n windows of CONTEXT + 1 characters at seeded random offsets."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - CONTEXT - 1, (n,), generator=g)
    return torch.stack([text[s: s + CONTEXT + 1] for s in starts.tolist()])


def record(path: str, capture, steps: int) -> attrib.Run:
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    text = corpus()
    tokens = sequences(text[: len(text) * 9 // 10], 512, 1)
    with attrib.Recorder(path, model, opt, capture=capture, strict=True) as rec:
        for _ in range(steps):
            ids = torch.randint(0, len(tokens), (BATCH,), generator=g)
            rec.examples(ids)
            batch = tokens[ids]
            loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]),
                                                     batch[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    return attrib.open_run(path)


def sequence_loss(model_at, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each test sequence's mean next-token loss (the model returns every position's logits)."""
    losses = torch.nn.functional.cross_entropy(model_at(inputs), labels.flatten(),
                                               reduction="none")
    return losses.reshape(len(inputs), -1).mean(1)


def influences(run: attrib.Run, n_test: int) -> tuple[np.ndarray, float]:
    text = corpus()
    test = sequences(text[len(text) * 9 // 10:], n_test, 2)  # held-out text
    started = time.perf_counter()
    result = attrib.analyze.path_kernel(run, lambda: make().double(), (test[:, :-1],
                                                                       test[:, 1:]),
                                        target=sequence_loss, by=("example",),
                                        progress=False)
    seconds = time.perf_counter() - started
    table = result.to_arrow().sort_by([("test_id", "ascending"), ("example_id", "ascending")])
    return np.asarray(table.column("value")), seconds


def main() -> None:
    global CONTEXT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", type=int, default=CONTEXT)
    args = parser.parse_args()
    CONTEXT = args.context
    steps, n_test = (6, 2) if args.quick else (40, 8)
    k_equal = round(sum(8 * (m + n) for m, n in shapes().values()) / len(MATRICES))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exact, seconds = influences(record(f"{tmp}/full", attrib.Full(), steps), n_test)
        rows.append({"mode": "Full (reference)", "floats_per_example":
                     sum(math.prod(s) for s in shapes().values()), "r_vs_exact": 1.0,
                     "r_range": "", "analysis_s": round(seconds, 2)})
        for i, (mode, captures) in enumerate(modes(k_equal).items()):
            r, times = [], []
            for j, capture in enumerate(captures):
                values, seconds = influences(record(f"{tmp}/{i}-{j}", capture, steps), n_test)
                r.append(float(np.corrcoef(exact, values)[0, 1]))
                times.append(seconds)
            rows.append({"mode": mode, "floats_per_example": floats_per_example(mode, k_equal),
                         "r_vs_exact": round(float(np.mean(r)), 4),
                         "r_range": f"{min(r):.3f}–{max(r):.3f}" if len(r) > 1 else "",
                         "analysis_s": round(float(np.mean(times)), 2)})
    print_table(f"GPT LM d{D} x2, context {CONTEXT}, pydoc text as ASCII characters, AdamW, "
                f"batch {BATCH}, {steps} steps, {n_test} held-out test sequences; per-example "
                f"path-kernel influence vs Full; projections over seeds {SEEDS}", rows)


if __name__ == "__main__":
    main()
