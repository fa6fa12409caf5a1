"""The Factored layout (format contract): a tensor's per-example row as stored factors.

c_{s,i} = Σ_t left[s, i, t] ⊗ right[s, i, t], reshaped to the tensor's shape, where the tensor is
seen as a matrix (dim 0, the rest) as in projection.matrix_view: for a Linear weight left holds
the output gradients and right the inputs, per token; unused token slots are zero.
"""

from __future__ import annotations

import torch


def densify(left: torch.Tensor, right: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(…, tokens, m) and (…, tokens, n) factors → (…, *shape) rows."""
    return (left.transpose(-1, -2) @ right).reshape(*left.shape[:-2], *shape)
