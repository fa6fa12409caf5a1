"""Factored per-example rows (policies.Factored): the token slots each weight keeps, and one
step's factor pairs laid into the block buffers.

A Linear or Conv call hands the capture c_i = Σ_t left[i, t] ⊗ right[i, t] (per_example.Outer):
output gradients and inputs per token. Storing those pairs is exact; it is worth it while
T·(m + n) < m·n for a weight viewed as an m × n matrix. A tensor used several times in one
forward (a layer called twice) gets every call's tokens, one after another in its slots.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attrib.recorder.capture import StepData
from attrib.recorder.per_example import Outer, project
from attrib.recorder.policies import TensorCapture
from attrib.schemas import projection

Parts = list[tuple[int, Outer]]  # (first row of the micro-batch, its factors)


def tokens_used(parts: Parts) -> int:
    """Token slots one step needs: per micro-batch, the tokens of every call that reached the
    tensor; the most over the step's micro-batches."""
    used: dict[int, int] = {}
    for offset, c in parts:
        used[offset] = used.get(offset, 0) + c.right.shape[1]
    return max(used.values(), default=0)


def smaller_than_full(tokens: int, shape: tuple[int, ...]) -> bool:
    m, n = projection.matrix_view(shape)
    return tokens > 0 and tokens * (m + n) < m * n


def settle(captures: list[TensorCapture], names: list[str], shapes: list[tuple[int, ...]],
           data: StepData) -> None:
    """At the first step: each Factored tensor keeps factors, with the slots the step used (or
    the ones asked for), when they are smaller than its full rows; else it is stored in full
    (or projected: TensorCapture.unfactor) from this step on, this step's factors converted
    alike and its check sum made to match."""
    for index, capture in enumerate(captures):
        if capture.factored is None:
            continue
        parts = data.factors.get(index, [])
        tokens = capture.factored.tokens or tokens_used(parts)
        if smaller_than_full(tokens, shapes[index]):
            capture.tokens = tokens
            continue
        dtype = getattr(torch, capture.factored.dtype or capture.storage_dtype)
        capture.unfactor(math.prod(shapes[index]))
        data.factors.pop(index, None)
        if not parts:
            continue
        if capture.full is not None:
            data.full[index] = [(offset, c.dense().to(dtype)) for offset, c in parts]
            data.sums[index] = sum(c.total() for _, c in parts)
        else:
            p = capture.project
            data.projected[index] = [
                (offset, project(c, shapes[index], p.kind, p.k, p.seed, names[index]).float())
                for offset, c in parts]
            data.sums[index] = sum(rows.sum(0) for _, rows in data.projected[index])


def restore(captures: list[TensorCapture], names: list[str], numels: list[int],
            recorded: dict[str, Any]) -> None:
    """A resumed run: each Factored tensor as the run settled it at its first step."""
    for capture, name, numel in zip(captures, names, numels):
        if capture.factored is None:
            continue
        stored = recorded.get(name, {})
        if "factored" in stored:
            capture.tokens = stored["factored"]["tokens"]
        else:
            capture.unfactor(numel)


def scatter(parts: Parts, left: torch.Tensor, right: torch.Tensor) -> int:
    """Lay one step's factor pairs into its (examples, tokens, ·) buffers; returns the slots the
    step needed, which exceed the buffers' when nothing was written (the buffers stay zero)."""
    left.zero_()
    right.zero_()
    needed = tokens_used(parts)
    if needed > left.shape[1]:
        return needed
    at: dict[int, int] = {}
    for offset, c in parts:
        rows, tokens = c.right.shape[:2]
        start = at.get(offset, 0)
        left[offset: offset + rows, start: start + tokens] = c.left
        right[offset: offset + rows, start: start + tokens] = c.right
        at[offset] = start + tokens
    return needed

