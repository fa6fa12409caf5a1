"""Per-step fingerprints of θ (format v2): part of the format contract.

A v2 run does not store θ per step; it stores the gradients and rebuilds θ by replaying the
optimizer. A change to the parameters made outside the optimizer (an in-place edit, `.data =`, a
flag flipped mid-run) would then be replayed silently wrong, so the recorder stores, for every
tensor, f(θ) = Σ_i θ_i r_{i mod L}: r a fixed N(0, 1) vector of length L = min(numel, 2^16)
drawn on the CPU from the tensor's index, so the recorder and every reader use the same numbers.
The sum is a float32 (float64 for float64 tensors) matrix-vector product: an edit of size δ at
one entry moves it by δ·r, far above its rounding for any edit that matters.
"""

from __future__ import annotations

from functools import lru_cache

import torch

LENGTH = 1 << 16
SEED = 0x5EED


@lru_cache(maxsize=4096)
def _vector(index: int, length: int) -> torch.Tensor:
    return torch.randn(length, generator=torch.Generator().manual_seed(SEED + index),
                       dtype=torch.float64)


class Fingerprint:
    """f(θ) for a fixed list of tensors (their shapes, dtypes and devices as given)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._vectors = []
        for index, t in enumerate(tensors):
            length = min(max(t.numel(), 1), LENGTH)
            self._vectors.append(_vector(index, length).to(t.device, _compute_dtype(t.dtype)))

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(n_tensors,) float64 on the tensors' device; no host synchronisation."""
        return self._sums(tensors, absolute=False)

    def tolerance(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """How far two computations of f on the same θ may differ (another kernel, another
        summation order): 1e-5 of Σ|θ_i r_i|, above float32 rounding of the sum, far below an
        edit of any entry by more than 1e-5 of the tensor's typical magnitude."""
        return 1e-5 * self._sums(tensors, absolute=True) + 1e-30

    def _sums(self, tensors: list[torch.Tensor], absolute: bool) -> torch.Tensor:
        values = []
        for t, r in zip(tensors, self._vectors):
            flat = t.detach().reshape(-1).to(r.dtype)
            if absolute:
                flat, r = flat.abs(), r.abs()
            length = r.numel()
            whole = flat.numel() - flat.numel() % length
            value = (flat[:whole].view(-1, length) @ r).sum() if whole else flat.new_zeros(())
            if whole < flat.numel():
                value = value + flat[whole:] @ r[: flat.numel() - whole]
            values.append(value.to(torch.float64))
        return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
