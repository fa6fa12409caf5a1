"""Capture policies: what to store of each parameter's per-example contributions.

`Full` stores them exactly, `Factored` stores Linear and Conv weights' exactly as the factors
they are made of (far smaller), `Project` stores a random projection (schemas/projection.py),
`TopK` keeps only the largest per-example update coordinates in the `shifts` table. Policies
compose: `capture=[TopK(64), Project(4096)]` applies both, each to the parameters its `params`
globs match.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from attrib.schemas import projection

CHECK_SKETCH_SIZE = 64  # see TensorCapture.check
FULL_BUDGET = 1 << 20  # default policy: exact contributions up to this many scalars per step…
DEFAULT_PROJECTION = 4096  # …else a kron projection of this size
DENSE_BUDGET_BYTES = 1 << 30  # dense projection matrices kept in memory, all tensors together


@dataclass(frozen=True)
class Full:
    """Exact per-example contributions, one row per example: (examples, *param_shape).

    dtype None stores them like the parameter (float32, or float64 for float64 parameters).
    """

    params: tuple[str, ...] = ("*",)
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype == "bfloat16":  # refused here: it used to fail at the first step
            raise ValueError("dtype='bfloat16' is not supported for per-example rows yet (Zarr "
                             "has no bfloat16, and rows are not stored as its bits as the "
                             "trajectory's grad_dtype is): use dtype='float16' (the same 2 "
                             "bytes; values below ~6e-8 flush to zero) or float32")
        if self.dtype not in (None, "float32", "float64", "float16"):
            raise ValueError(f"Full(dtype={self.dtype!r}): use float32, float64 or float16")


@dataclass(frozen=True)
class Factored:
    """Exact per-example contributions, a weight matrix's as its factors.

    A Linear, Conv, Conv1D or attention projection weight's contribution from example i is
    c_i = Σ_t g_{i,t} ⊗ a_{i,t} over its tokens (positions) t: output gradient times input (an
    Embedding's: one-hot rows ⊗ output gradients, also when a head is tied to it). Storing the
    pairs takes T·(d_out + d_in) floats instead of d_out·d_in, and is exact. Tensors without
    that form (biases, norms, modules on the torch.func path) and weights whose factors
    would not be smaller are stored in full, or with `fallback=Project(k)` projected when
    they have more than k scalars. `rank=r` keeps at most r factor pairs per example and
    call: exact for a call of at most r tokens, else the best rank-r approximation of the
    T-term sum (randomized SVD with power iterations); what it leaves out lands in the
    analyses' residual term, so totals stay exact. `tokens`: factor slots per example and
    tensor (default: what the first step used; a later step that needs more is said, and its
    rows of that tensor become residual). dtype as for Full.
    """

    params: tuple[str, ...] = ("*",)
    tokens: int | None = None
    dtype: str | None = None
    fallback: Project | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"Factored(tokens={self.tokens!r}): use None or an integer ≥ 1")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"Factored(rank={self.rank!r}): use None or an integer ≥ 1")
        if self.fallback is not None and not isinstance(self.fallback, Project):
            raise ValueError(f"Factored(fallback={self.fallback!r}): use None or a Project")
        Full(dtype=self.dtype)  # the same dtypes


@dataclass(frozen=True)
class Project:
    """R c with R regenerated from (seed, parameter name): k floats per example and tensor.

    Tensors with at most k scalars are stored in full (a projection could only be larger).
    """

    k: int
    seed: int = 0
    kind: str = "kron"
    params: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"Project(k={self.k}): k must be ≥ 1")
        if self.kind not in projection.KINDS:
            raise ValueError(f"Project(kind={self.kind!r}): use one of {projection.KINDS}")


@dataclass(frozen=True)
class TopK:
    """The k largest |per-example update| coordinates per step, into the `shifts` table.

    scope="step": k over all matched tensors together; "tensor": k per tensor. Parameters
    whose name matches `exclude` (default: biases, norms, embeddings) are left out.
    """

    k: int
    scope: str = "step"
    params: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = field(default=("*bias", "*norm*", "*embed*"))

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"TopK(k={self.k}): k must be ≥ 1")
        if self.scope not in ("step", "tensor"):
            raise ValueError(f"TopK(scope={self.scope!r}): use 'step' or 'tensor'")


Policy = Full | Factored | Project | TopK
CHECK_SKETCH = Project(CHECK_SKETCH_SIZE)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class TensorCapture:
    """The resolved policy for one parameter tensor."""

    storage_dtype: str
    shape: tuple[int, ...] = ()
    full: Full | None = None
    project: Project | None = None
    topk: TopK | None = None
    factored: Factored | None = None
    tokens: int | None = None  # factor slots per example, fixed at the first step

    @property
    def full_dtype(self) -> str:
        chosen = self.full or self.factored
        return chosen.dtype if chosen is not None and chosen.dtype is not None \
            else self.storage_dtype

    @property
    def any(self) -> bool:
        return (self.full is not None or self.project is not None or self.topk is not None
                or self.factored is not None)

    def unfactor(self, numel: int) -> None:
        """A Factored tensor without a smaller factored form: its rows are stored in full, or
        projected by the policy's fallback when it has more scalars than the fallback's k."""
        policy, self.factored, self.tokens = self.factored, None, None
        if policy.fallback is not None and numel > policy.fallback.k:
            self.project = self.project or policy.fallback
        else:
            self.full = Full(dtype=policy.dtype)

    @property
    def check(self) -> Project | None:
        """The projection R the step's invariant Σ_i c_i = G is checked on (R Σ_i c_i =
        Σ_i R c_i, R linear), or None for the exact sum, which would cost a second
        weight-gradient product per module call where no dense rows are formed anyway: the
        projected rows' own R, or for factored rows a fixed 8 × 8 kron sketch (a use the
        capture missed shows in it almost surely)."""
        if self.full is not None or self.topk is not None:
            return None
        return self.project or (CHECK_SKETCH if self.factored is not None else None)

    def describe(self) -> dict:
        out: dict = {}
        if self.full is not None:
            out["full"] = {"dtype": self.full_dtype}
        if self.factored is not None:
            out["factored"] = {"dtype": self.full_dtype, "tokens": self.tokens,
                               "rank": self.factored.rank}
        if self.project is not None:
            p = self.project
            split = projection.split_for(p.kind, p.k, self.shape)
            out["project"] = {"k": p.k, "seed": p.seed, "kind": p.kind,
                              "split": list(split) if split is not None else None}
        if self.topk is not None:
            out["topk"] = {"k": self.topk.k, "scope": self.topk.scope}
        return out


def default_policies(total_numel: int) -> list[Policy]:
    """Exact rows, weights as factors where those are smaller; on a large model the tensors
    without a smaller factored form are projected instead when larger than the projection
    (documented in the README)."""
    if total_numel <= FULL_BUDGET:
        return [Factored()]
    return [Factored(fallback=Project(DEFAULT_PROJECTION))]


def check_dense_budget(captures: list[TensorCapture], names: list[str],
                       shapes: list[tuple[int, ...]]) -> None:
    """Dense R is k × numel floats per tensor: refuse early rather than run out of memory."""
    sizes = {name: capture.project.k * math.prod(shape) * 4
             for capture, name, shape in zip(captures, names, shapes)
             if capture.project is not None and capture.project.kind != "sjlt"
             and projection.split_for(capture.project.kind, capture.project.k, shape) is None}
    if sum(sizes.values()) > DENSE_BUDGET_BYTES:
        largest = max(sizes, key=sizes.get)
        raise ValueError(
            f"dense projection needs {sum(sizes.values()) / 2**30:.1f} GiB of projection "
            f"matrices ({largest!r} alone {sizes[largest] / 2**20:.0f} MiB), over the "
            f"{DENSE_BUDGET_BYTES / 2**30:.0f} GiB limit; use Project(kind='kron') (the fast "
            "path), a smaller k, or restrict dense projection to some tensors with params=[...]")


def resolve(policies: list[Policy], names: list[str], shapes: list[tuple[int, ...]],
            dtypes: list[str]) -> list[TensorCapture]:
    """Per tensor, the policies whose globs match it (the first match of each type wins)."""
    out = []
    for name, shape, dtype in zip(names, shapes, dtypes):
        capture = TensorCapture(dtype, shape)
        for policy in policies:
            if not _matches(name, policy.params):
                continue
            if isinstance(policy, Full) and capture.full is None and capture.factored is None:
                capture.full = policy
            elif isinstance(policy, Factored) and capture.full is None \
                    and capture.factored is None:
                capture.factored = policy
            elif isinstance(policy, Project) and capture.project is None:
                if math.prod(shape) <= policy.k:  # storing it exactly is smaller
                    capture.full = capture.full or Full(params=(name,))
                else:
                    capture.project = policy
            elif (isinstance(policy, TopK) and capture.topk is None
                  and not _matches(name, policy.exclude)):
                capture.topk = policy
        out.append(capture)
    check_dense_budget(out, names, shapes)
    return out
