"""Random projections of per-example gradients: part of the format contract.

A projected run stores R c instead of c. R is never stored: it is regenerated from the run's
seed and the parameter's name, on the CPU (so every machine draws the same numbers), by the
recorder for training gradients and by the analyzer for test gradients. Entries are N(0, 1/k),
so E[RᵀR] = I and ⟨R c, R c'⟩ is an unbiased estimate of c · c'.

Three kinds (METHODS.md §2, projected mode):
- dense: R ∈ R^{k×numel}, applied to the flattened gradient.
- sjlt: a sparse Johnson–Lindenstrauss transform with one nonzero per column (a count
  sketch): coordinate j of the flattened gradient is added, with sign σ_j = ±1, to output
  h(j) ∈ [0, k). E[RᵀR] = I as for the others; it costs one pass over the gradient and no
  k × numel matrix, but needs the gradient formed (no factored shortcut).
- kron: for a tensor viewed as a matrix (m, n), R = R_l ⊗ R_r with R_l ∈ R^{k_l×m},
  R_r ∈ R^{k_r×n}, k = k_l·k_r, entries N(0, 1/k_l) and N(0, 1/k_r); then R vec(C) =
  vec(R_l C R_rᵀ), which a layer's factored gradient Σ_t g_t ⊗ a_t reaches without forming C.
  The split (k_l, k_r) is fitted to the shape (`fitted_split`: k_l ≤ m and k_r ≤ n, so R has
  rank k) and recorded per tensor; a tensor no split of k fits is projected densely. Runs
  recorded before the split was stored used `kron_split(k)` whatever the shape, which on a
  narrow matrix gave R a rank below k (`recorded_split` reads both).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch

KINDS = ("dense", "kron", "sjlt")


def _generator(seed: int, name: str, tag: str) -> torch.Generator:
    digest = hashlib.sha256(f"attrib-projection/{seed}/{name}/{tag}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@lru_cache(maxsize=256)
def gaussian(seed: int, name: str, tag: str, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) float32 matrix with N(0, 1/rows) entries, reproducible from its key."""
    g = _generator(seed, name, tag)
    return torch.randn(rows, cols, generator=g) / math.sqrt(rows)


@lru_cache(maxsize=256)
def sjlt_hash(seed: int, name: str, k: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sjlt kind's R, reproducible from its key: per coordinate its output row h(j)
    (kept as int32) and sign σ_j (int8 ±1): 5 bytes per coordinate in the cache."""
    g = _generator(seed, name, f"sjlt/{k}")
    rows = torch.randint(0, k, (numel,), generator=g).to(torch.int32)
    signs = (torch.randint(0, 2, (numel,), generator=g) * 2 - 1).to(torch.int8)
    return rows, signs


def kron_split(k: int) -> tuple[int, int]:
    """k = k_l · k_r with k_l the largest divisor of k not above √k (32 × 32 for 1024): the
    split of runs recorded before splits were stored."""
    k_l = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    return k_l, k // k_l


@lru_cache(maxsize=1024)
def fitted_split(k: int, m: int, n: int) -> tuple[int, int] | None:
    """The most balanced k = k_l · k_r with k_l ≤ m and k_r ≤ n (R_l ⊗ R_r then has rank k),
    or None when no divisor pair fits (the tensor is projected densely)."""
    fits = [(d, k // d) for d in range(1, min(k, m) + 1) if k % d == 0 and k // d <= n]
    return min(fits, key=lambda s: abs(math.log(s[0] / s[1])), default=None)


def split_for(kind: str, k: int, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The kron split a new recording uses for a tensor, None where it projects densely."""
    view = matrix_view(shape)
    return fitted_split(k, *view) if kind == "kron" and view is not None else None


def recorded_split(settings: dict, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The split a run's Project capture of a tensor used (its `project` settings): stored
    since splits were fitted to shapes (null: dense); before, kron_split(k) on every matrix."""
    if "split" in settings:
        return tuple(settings["split"]) if settings["split"] is not None else None
    if settings["kind"] == "kron" and matrix_view(shape) is not None:
        return kron_split(settings["k"])
    return None


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """How a tensor is seen as a matrix for kron: (dim 0, the rest); None for 0-d/1-d."""
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def dense_matrix(seed: int, name: str, k: int, numel: int) -> torch.Tensor:
    return gaussian(seed, name, "dense", k, numel)


def kron_factors(seed: int, name: str, split: tuple[int, int], m: int, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    k_l, k_r = split
    return gaussian(seed, name, "left", k_l, m), gaussian(seed, name, "right", k_r, n)


def project(vectors: torch.Tensor, shape: tuple[int, ...], kind: str, k: int, seed: int,
            name: str, split: tuple[int, int] | str | None = "fitted") -> torch.Tensor:
    """Project a batch of full gradients (B, *shape) of parameter `name` to (B, k).

    `kind="kron"` uses `split` (k_l, k_r): by default the one a new recording fits to the
    shape; for a recorded run pass `recorded_split(run.capture[name]["project"], shape)`.
    A tensor without a matrix view (a bias), or a split of None, is projected densely.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown projection kind {kind!r}; use one of {KINDS}")
    batch = vectors.shape[0]
    view = matrix_view(shape)
    if split == "fitted":
        split = split_for(kind, k, shape)
    if kind == "kron" and view is not None and split is not None:
        r_l, r_r = kron_factors(seed, name, split, *view)
        c = vectors.reshape(batch, *view)
        return (r_l.to(c) @ c @ r_r.to(c).T).reshape(batch, k)
    if kind == "sjlt":
        rows, signs = sjlt_hash(seed, name, k, math.prod(shape))
        flat = vectors.reshape(batch, -1)
        return flat.new_zeros(batch, k).index_add_(1, rows.to(flat.device),
                                                   flat * signs.to(flat))
    r = dense_matrix(seed, name, k, math.prod(shape))
    return vectors.reshape(batch, -1) @ r.to(vectors).T
