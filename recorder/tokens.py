"""Token sequences of examples (the `tokens` and `vocabulary` tables, METHODS.md §5).

Outlier-shift analysis of language data asks which tokens the examples behind a neuron's shifts
share. The recorder keeps each example's token ids once (the first time the example is seen);
`attrib.analyze.save_tokens` writes the same table from a dataset after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from attrib.schemas import format as fmt


@dataclass
class TokenBatch:
    """Token ids of a micro-batch, flattened: example `ids[i]` has `lengths[i]` tokens."""

    ids: np.ndarray
    flat: np.ndarray
    lengths: np.ndarray


def token_batch(ids: np.ndarray, tokens: Any) -> TokenBatch:
    """Validate `tokens` (a (examples, length) integer tensor/array, or one integer sequence
    per example) against the micro-batch's example ids."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray) and tokens.ndim == 2:
        flat, lengths = tokens.reshape(-1), np.full(len(tokens), tokens.shape[1], np.int64)
    elif isinstance(tokens, Sequence) and not isinstance(tokens, (str, bytes)):
        rows = [np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t).reshape(-1)
                for t in tokens]
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        lengths = np.array([len(r) for r in rows], np.int64)
    else:
        raise TypeError("tokens= takes an (examples, length) integer tensor or array, or one "
                        f"sequence of token ids per example; got {type(tokens).__name__}")
    if len(lengths) != len(ids):
        raise ValueError(f"tokens= has {len(lengths)} sequences for {len(ids)} example ids; "
                         "pass one token sequence per example")
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"tokens= must hold integer token ids, got dtype {flat.dtype}; map "
                         "strings to ids and pass the strings as Recorder(vocabulary=...)")
    return TokenBatch(ids.astype(np.int64), flat.astype(np.int64), lengths)


def tokens_table(batch: TokenBatch, vocabulary: np.ndarray | None) -> pa.Table:
    """Long table (example_id, position, token_id, token) of a batch of examples."""
    starts = np.repeat(np.cumsum(batch.lengths) - batch.lengths, batch.lengths)
    position = np.arange(len(batch.flat)) - starts
    token = None
    if vocabulary is not None:
        known = (batch.flat >= 0) & (batch.flat < len(vocabulary))
        token = pa.array(vocabulary[np.where(known, batch.flat, 0)], pa.string(), mask=~known)
    return pa.table({"example_id": np.repeat(batch.ids, batch.lengths),
                     "position": position.astype(np.int32), "token_id": batch.flat,
                     "token": token if token is not None else pa.nulls(len(position), pa.string())},
                    schema=fmt.TOKENS)


def vocabulary_array(vocabulary: Sequence[str] | dict[int, str] | None) -> np.ndarray | None:
    """token id → string as an object array (a list, or a dict {id: string})."""
    if vocabulary is None:
        return None
    if isinstance(vocabulary, dict):
        out = np.full(max(vocabulary, default=-1) + 1, None, dtype=object)
        for token_id, text in vocabulary.items():
            out[int(token_id)] = str(text)
        return out
    return np.array([str(t) for t in vocabulary], dtype=object)


def vocabulary_table(vocabulary: np.ndarray) -> pa.Table:
    return pa.table({"token_id": np.arange(len(vocabulary), dtype=np.int64),
                     "token": pa.array(vocabulary, pa.string())}, schema=fmt.VOCABULARY)


class FirstSeen:
    """Keeps token rows only for examples not written before (examples recur every epoch)."""

    def __init__(self) -> None:
        self.seen = np.zeros(0, np.int64)

    def select(self, batches: list[TokenBatch]) -> TokenBatch | None:
        if not batches:
            return None
        ids = np.concatenate([b.ids for b in batches])
        lengths = np.concatenate([b.lengths for b in batches])
        flat = np.concatenate([b.flat for b in batches])
        _, first = np.unique(ids, return_index=True)  # the first row of an id within the block
        keep = np.zeros(len(ids), bool)
        keep[first] = True
        keep &= self.take(ids)
        if not keep.any():
            return None
        return TokenBatch(ids[keep], flat[np.repeat(keep, lengths)], lengths[keep])

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` no earlier call saw (a mask); all of them count as seen from now."""
        fresh = ~np.isin(ids, self.seen)
        self.seen = np.union1d(self.seen, ids)
        return fresh
