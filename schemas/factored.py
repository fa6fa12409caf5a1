"""The Factored layout (format contract): a tensor's per-example row as stored factors.

c_{s,i} = Σ_t left[s, i, t] ⊗ right[s, i, t], reshaped to the tensor's shape, where the tensor is
seen as a matrix (dim 0, the rest) as in projection.matrix_view: for a Linear weight left holds
the output gradients and right the inputs, per token; unused token slots are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrib.schemas import projection


def densify(left: torch.Tensor, right: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(…, tokens, m) and (…, tokens, n) factors → (…, *shape) rows."""
    return (left.transpose(-1, -2) @ right).reshape(*left.shape[:-2], *shape)


@dataclass
class FactorRows:
    """Rows kept as factors, for analyses that only take inner products with them:
    ⟨A, Σ_t l_t ⊗ r_t⟩ = Σ_t l_tᵀ A r_t never forms the (rows × numel) matrix."""

    left: torch.Tensor  # (…, tokens, m)
    right: torch.Tensor  # (…, tokens, n)
    shape: tuple[int, ...]

    def __getitem__(self, index) -> FactorRows:
        """Index the leading (step, example) dimensions, as on the dense rows."""
        return FactorRows(self.left[index], self.right[index], self.shape)

    def to(self, dtype: torch.dtype) -> FactorRows:
        return FactorRows(self.left.to(dtype), self.right.to(dtype), self.shape)

    def dense(self) -> torch.Tensor:
        return densify(self.left, self.right, self.shape)

    def kron(self, r_l: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
        """(…, k_l·k_r) kron projections R_l C R_rᵀ of the rows, from the factors:
        Σ_t (R_l l_t) ⊗ (R_r r_t)."""
        left, right = self.left @ r_l.T.to(self.left), self.right @ r_r.T.to(self.right)
        return (left.transpose(-1, -2) @ right).flatten(-2)

    def dot(self, vectors: torch.Tensor) -> torch.Tensor:
        """(rows, k) inner products of the rows (every leading dimension flattened) with k
        flat vectors (k, numel)."""
        m, n = projection.matrix_view(self.shape)
        tokens = self.left.shape[-2]
        matrices = vectors.reshape(vectors.shape[0], m, n).to(self.left.dtype)
        return torch.einsum("etm,kmn,etn->ek", self.left.reshape(-1, tokens, m), matrices,
                            self.right.reshape(-1, tokens, n))
