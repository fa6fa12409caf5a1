"""Factored per-example rows (policies.Factored): the token slots each weight keeps, and one
step's factor pairs laid into the block buffers.

A Linear, Conv, Conv1D or attention projection call hands the capture c_i = Σ_t left[i, t] ⊗
right[i, t] (per_example.Outer): output gradients and inputs per token; an Embedding lookup is
the same with one-hot rows of the vocabulary on the left (so a head tied to it joins in).
Storing those pairs is exact; it is worth it while T·(m + n) < m·n for a weight viewed as an
m × n matrix. A tensor used several times in one
forward (a layer called twice) gets every call's tokens, one after another in its slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attrib.recorder.capture import StepData
from attrib.recorder.per_example import Outer, PerExample, low_rank
from attrib.recorder.policies import TensorCapture
from attrib.schemas import projection

Parts = list[tuple[int, Outer]]  # (first row of the micro-batch, its factors)


def slots(c: Outer, rank: int | None) -> int:
    """Factor slots one call takes: its tokens, at most `rank` with Factored(rank=...)."""
    tokens = c.right.shape[1]
    return tokens if rank is None else min(tokens, rank)


def tokens_used(parts: Parts, rank: int | None = None) -> int:
    """Token slots one step needs: per micro-batch, the slots of every call that reached the
    tensor; the most over the step's micro-batches."""
    used: dict[int, int] = {}
    for offset, c in parts:
        used[offset] = used.get(offset, 0) + slots(c, rank)
    return max(used.values(), default=0)


def smaller_than_full(tokens: int, shape: tuple[int, ...]) -> bool:
    m, n = projection.matrix_view(shape)
    return tokens > 0 and tokens * (m + n) < m * n


def settle(captures: list[TensorCapture], shapes: list[tuple[int, ...]], data: StepData,
           consume: Callable[[int, PerExample, StepData, int], None]) -> None:
    """At the first step: each Factored tensor keeps factors, with the slots the step used (or
    the ones asked for), when they are smaller than its full rows; else it is stored in full
    (or projected: TensorCapture.unfactor) from this step on, and this step's calls are
    consumed again under that capture (ExampleCapture.consume), rows and check sum alike."""
    for index, capture in enumerate(captures):
        if capture.factored is None:
            continue
        parts = data.factors.get(index, [])
        tokens = capture.factored.tokens or tokens_used(parts, capture.factored.rank)
        if smaller_than_full(tokens, shapes[index]):
            capture.tokens = tokens
            continue
        capture.unfactor(math.prod(shapes[index]))
        for kept in (data.factors, data.full, data.projected, data.topk, data.sums):
            kept.pop(index, None)
        for offset, c in parts:
            consume(index, c, data, offset)


def restore(captures: list[TensorCapture], names: list[str], numels: list[int],
            recorded: dict[str, Any]) -> None:
    """A resumed run: each Factored tensor as the run settled it at its first step; asking
    for other token slots is refused (the arrays have theirs)."""
    for capture, name, numel in zip(captures, names, numels):
        if capture.factored is None:
            continue
        stored = recorded.get(name, {})
        if "factored" in stored:
            kept, asked = stored["factored"]["tokens"], capture.factored.tokens
            if kept is not None and asked is not None and asked != kept:
                raise ValueError(
                    f"{name!r} keeps {kept} factor slots per example in this run (fixed at "
                    f"its first step), not the {asked} asked for; resume with "
                    f"Factored(tokens={kept}) (or tokens=None), or record a new run")
            capture.tokens = kept
        else:
            capture.unfactor(numel)


def scatter(parts: Parts, left: torch.Tensor, right: torch.Tensor, rank: int | None) -> int:
    """Lay one step's factor pairs into its (examples, tokens, ·) buffers (cut to `rank` pairs
    per call where it has more tokens, cast to the buffers' dtype); returns the slots the step
    needed, which exceed the buffers' when nothing was written (the buffers stay zero)."""
    left.zero_()
    right.zero_()
    needed = tokens_used(parts, rank)
    if needed > left.shape[1]:
        return needed
    at: dict[int, int] = {}
    for offset, c in parts:
        c = c.with_dense_left()  # an Embedding's lookups: one-hot rows of the vocabulary
        if rank is not None and c.right.shape[1] > rank:
            c = low_rank(c, rank)
        rows, tokens = c.right.shape[:2]
        start = at.get(offset, 0)
        left[offset: offset + rows, start: start + tokens] = c.left
        right[offset: offset + rows, start: start + tokens] = c.right
        at[offset] = start + tokens
    return needed

