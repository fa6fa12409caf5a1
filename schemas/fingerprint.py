"""Per-step fingerprints of θ (format v2): part of the format contract.

A v2 run does not store θ per step; it stores the gradients and rebuilds θ by replaying the
optimizer. A change to the parameters made outside the optimizer (an in-place edit, `.data =`, a
flag flipped mid-run) would then be replayed silently wrong, so the recorder stores, for every
tensor, f(θ) = Σ_i θ_i r_{i mod L}: r a fixed N(0, 1) vector of length L = min(numel, 2^16)
drawn on the CPU from the tensor's index, so the recorder and every reader use the same numbers.
The sum is taken in float32 (float64 for float64 tensors); an edit of size δ at one entry moves
it by δ·r.
"""

from __future__ import annotations

from functools import lru_cache

import torch

LENGTH = 1 << 16
SEED = 0x5EED
SMALL = 1 << 14  # entries of a tensor summed with the other small ones (see Fingerprint)


@lru_cache(maxsize=4096)
def _vector(index: int, length: int) -> torch.Tensor:
    return torch.randn(length, generator=torch.Generator().manual_seed(SEED + index),
                       dtype=torch.float64)


class Fingerprint:
    """f(θ) for a fixed list of tensors (their shapes, dtypes and devices as given), on one
    device. All tensors of a dtype are summed in one pass: a matrix-vector product per large
    tensor, the small ones (biases, norms) multiplied elementwise after one concatenation, then
    one segment sum; tensor by tensor, a small transformer's 36 took ~1 ms per call, twice per
    recorded step."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        vectors = [_vector(i, min(max(t.numel(), 1), LENGTH)).to(t.device, _compute_dtype(t.dtype))
                   for i, t in enumerate(tensors)]
        self._device = tensors[0].device if tensors else torch.device("cpu")
        self._groups = [_Group(tensors, vectors, [i for i, t in enumerate(tensors)
                                                  if _compute_dtype(t.dtype) == dtype])
                        for dtype in {_compute_dtype(t.dtype) for t in tensors}]

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(n_tensors,) float64 on the tensors' device; no host synchronisation."""
        return self._sums(tensors, absolute=False)

    def tolerance(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """How far two computations of f on the same θ may differ (another kernel, another
        summation order): 1e-5 of Σ|θ_i r_i|, above float32 rounding of the sum. A reader
        comparing within it sees an edit that moves f further: a whole tensor of n entries
        rescaled by more than ~1e-5·√n (0.3% at 10^5 entries), one entry moved by more than
        ~1e-5·Σ|θ_i r_i|. The recorder compares exactly, so it warns of any edit."""
        return 1e-5 * self._sums(tensors, absolute=True) + 1e-30

    def _sums(self, tensors: list[torch.Tensor], absolute: bool) -> torch.Tensor:
        out = torch.zeros(len(tensors), dtype=torch.float64, device=self._device)
        with torch.no_grad():
            for group in self._groups:
                out[group.index] = group.sums(tensors, absolute).to(torch.float64)
        return out


class _Group:
    """The tensors of one compute dtype. Each contributes terms to one vector: a large tensor
    the L-blocks of θ·r (a matrix-vector product over its first whole multiple of L entries)
    and its remaining entries' θ_i r_i, a small one all its θ_i r_i (after one concatenation);
    a segment sum then adds each tensor's terms."""

    def __init__(self, tensors: list[torch.Tensor], vectors: list[torch.Tensor],
                 members: list[int]) -> None:
        device = vectors[members[0]].device
        self.index = torch.tensor(members, dtype=torch.long, device=device)
        self.blocks, self.elementwise = [], []  # (tensor, r, whole) / (tensor, first entry)
        block_terms, rest_terms, pieces = [], [], []  # (owner, number of terms) per part
        for k, i in enumerate(members):
            numel, r = tensors[i].numel(), vectors[i]
            whole = numel - numel % r.numel() if numel > SMALL else 0
            if whole:
                self.blocks.append((i, r, whole))
                block_terms.append((k, whole // r.numel()))
            if whole < numel:
                self.elementwise.append((i, whole))
                rest_terms.append((k, numel - whole))
                pieces.append(r[: numel - whole])
        self.vector = torch.cat(pieces) if pieces else vectors[members[0]][:0]
        owners, sizes = zip(*block_terms, *rest_terms)  # the order sums() concatenates in
        self.segments = torch.repeat_interleave(torch.tensor(owners, device=device),
                                                torch.tensor(sizes, device=device))

    def sums(self, tensors: list[torch.Tensor], absolute: bool) -> torch.Tensor:
        """Σ_i θ_i r_{i mod L} of each member (their order), in the compute dtype."""
        def values(i: int) -> torch.Tensor:
            flat = tensors[i].reshape(-1).to(self.vector.dtype)
            return flat.abs() if absolute else flat

        terms = [values(i)[:whole].view(-1, r.numel()) @ (r.abs() if absolute else r)
                 for i, r, whole in self.blocks]
        if self.elementwise:
            flat = torch.cat([values(i)[first:] for i, first in self.elementwise])
            terms.append(flat * (self.vector.abs() if absolute else self.vector))
        return torch.zeros(len(self.index), dtype=self.vector.dtype, device=self.vector.device
                           ).index_add_(0, self.segments, torch.cat(terms))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
