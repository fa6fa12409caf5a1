"""Grokking on modular addition (METHODS.md §6; ExPLAIND's case study), sized for a CPU.

Inputs [a, '+', b, '='], label (a + b) mod p; a one-layer transformer without biases in
attention, without mask, LayerNorm or positions, a ReLU MLP and a bias-free unembedding,
prediction at the last position; AdamW, full batch. The model memorises the training pairs
first, then (with strong weight decay) generalises: grokking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GrokConfig:
    """One grokking setting. The default groks in ~2,000 full-batch steps on 2 CPU cores;
    `published()` is the ExPLAIND setup (p 113, unordered pairs, 4,000 training pairs)."""

    p: int = 23
    train_fraction: float = 0.5
    train_size: int | None = None  # overrides train_fraction
    unordered: bool = False  # unordered pairs a ≤ b only (the published setup)
    d_model: int = 32
    heads: int = 4
    mlp: int = 128
    lr: float = 1e-2
    weight_decay: float = 1.0
    steps: int = 2000
    seed: int = 0
    per_example_k: int | None = 16  # Project(k) per-example capture; None: outlier shifts only

    @staticmethod
    def published() -> GrokConfig:
        # per-example projections of 4,000 pairs would write ~10 GB over 4,000 steps: the
        # per-layer path kernel is exact without them (its residual term holds the rest)
        return GrokConfig(p=113, train_size=4000, unordered=True, d_model=64, heads=4,
                          mlp=512, lr=1e-3, weight_decay=4.0, steps=4000, per_example_k=None)

    @staticmethod
    def quick() -> GrokConfig:
        return GrokConfig(p=13, d_model=16, mlp=32, steps=60)


class OneLayerTransformer(torch.nn.Module):
    """Embedding → one attention layer (bias-free, no mask) → ReLU MLP → unembedding, with
    residual connections; the prediction is read at the last position ('=')."""

    def __init__(self, config: GrokConfig) -> None:
        super().__init__()
        torch.manual_seed(config.seed)
        d, vocab = config.d_model, config.p + 2
        self.heads = config.heads
        self.embed = torch.nn.Embedding(vocab, d)
        self.attention_qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.attention_out = torch.nn.Linear(d, d, bias=False)
        self.mlp_in = torch.nn.Linear(d, config.mlp)
        self.mlp_out = torch.nn.Linear(config.mlp, d)
        self.unembed = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        b, t, d = h.shape
        q, k, v = self.attention_qkv(h).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
        mixed = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, d)
        h = h + self.attention_out(mixed)
        h = h + self.mlp_out(F.relu(self.mlp_in(h)))
        return self.unembed(h[:, -1])


# the layers the demo reports on, by module name
LAYERS = {"embeddings": "embed", "attention": "attention_*", "MLP": "mlp_*",
          "unembedding": "unembed"}


@dataclass
class ModularAddition:
    inputs: torch.Tensor  # (pairs, 4) tokens [a, '+', b, '=']
    labels: torch.Tensor  # (a + b) mod p
    train: torch.Tensor  # indices of the training pairs: example_id = position in this list
    test: torch.Tensor  # indices of the held-out pairs

    @property
    def train_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[self.train], self.labels[self.train]

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[self.test], self.labels[self.test]


def modular_addition(config: GrokConfig) -> ModularAddition:
    p = config.p
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    if config.unordered:
        keep = a <= b
        a, b = a[keep], b[keep]
    inputs = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(config.seed + 1))
    n_train = config.train_size or int(config.train_fraction * len(a))
    return ModularAddition(inputs, (a + b) % p, order[:n_train], order[n_train:])
