"""Where a piecewise-linear activation switches along a segment θ + tΔ (a ReLU kink).

At a kink, ∇f jumps, so a quadrature rule over a part holding one converges only like the part's
width. A kink is where an activation's input crosses one of its levels (0 for ReLU, both
bounds for hardtanh): recording those inputs at the segment's ends locates every crossing
that changes sign, and the probe gradient ∂f/∂(activation output) sizes the jump it causes,
so the integrator splits the segment where it matters and nowhere else (a unit whose output
never reaches f, like an MLP unit at a position a model doesn't read, jumps by zero).
Activations inside fused kernels are not seen; the integrator's bisection covers them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MAX_LOCATE_STEPS = 12  # Illinois steps locating a kink (a forward pass per kink each) ...
LOCATE_TOL = 1e-9  # ... until it moves by less than this fraction of the segment

RELU = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_,
        F.leaky_relu, F.leaky_relu_)


KINKED = frozenset((*RELU, F.relu6, F.hardtanh, F.hardtanh_))  # every function kink_levels knows


def kink_levels(func, args: tuple, kwargs: dict) -> tuple[float, ...] | None:
    """The input values at which `func`'s slope jumps, None for every other function."""
    if func not in KINKED:
        return None
    if func in RELU:
        return (0.0,)
    if func is F.relu6:
        return (0.0, 6.0)
    if func in (F.hardtanh, F.hardtanh_):
        low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return (float(low), float(high))
    return None


class KinkRecorder(TorchFunctionMode):
    """While active, records for every kinked activation its input minus each level, flattened
    (`offsets`), and adds `probes[k]` to the k-th such output, so that the gradient of f with
    respect to zero probes is ∂f/∂output. Used inside vmap, one test point per lane."""

    def __init__(self, probes: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.probes = probes
        self.offsets: list[torch.Tensor] = []
        self.levels: list[int] = []  # levels per recorded call
        self.shapes: list[torch.Size] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in KINKED:  # every op of the forward passes here: the fast way out
            return func(*args, **kwargs)
        levels = kink_levels(func, args, kwargs)
        z = args[0] if args else kwargs.get("input")
        if levels is None or not isinstance(z, torch.Tensor):
            return func(*args, **kwargs)
        self.offsets.append(torch.cat([(z - level).reshape(-1) for level in levels]))
        self.levels.append(len(levels))
        self.shapes.append(z.shape)
        if self.probes is None:
            return func(*args, **kwargs)
        probe = self.probes[len(self.shapes) - 1]
        # on a copy, to tell an in-place call (relu_, inplace=True) by its result: the model
        # then reads z itself, so z takes the probed output; autograd keeps the copy's result
        copy = z.clone()
        out = func(copy, *args[1:], **kwargs) if args else func(**{**kwargs, "input": copy})
        if out is copy:
            try:
                return z.copy_(out + probe)
            except RuntimeError:  # z not batched under vmap (from a buffer): it doesn't move
                return out + probe  # along t, so no kink of it can matter
        return out + probe

    def flat_offsets(self, like: torch.Tensor) -> torch.Tensor:
        """Every recorded offset in one vector (empty when the model has no kinked activation)."""
        return torch.cat(self.offsets) if self.offsets else like.new_zeros(0)

    @staticmethod
    def flat_slopes(slopes: list[torch.Tensor], levels: list[int]) -> torch.Tensor:
        """∂f/∂output per call, repeated per level to line up with flat_offsets."""
        if not slopes:
            return torch.zeros(0)
        return torch.cat([s.reshape(s.shape[0], -1).repeat(1, n)
                          for s, n in zip(slopes, levels)], dim=1)


def crossings(z0: torch.Tensor, z1: torch.Tensor, slope0: torch.Tensor, slope1: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sign changes between two offset matrices (rows: test points, columns: kinks): their
    (row, column), the crossing by linear interpolation t ∈ (0, 1), and the size of the jump
    in ∇f·Δ it causes, |∂f/∂output| (the larger at either end) times |z1 − z0|."""
    row, column = torch.nonzero((z0 > 0) != (z1 > 0), as_tuple=True)
    a, b = z0[row, column], z1[row, column]
    t = (a / (a - b)).clamp(0.0, 1.0)
    jump = torch.maximum(slope0[row, column].abs(), slope1[row, column].abs()) * (b - a).abs()
    return row, column, t, jump


def refine(bracket: tuple[torch.Tensor, ...], t: torch.Tensor, z_t: torch.Tensor
           ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """One Illinois step: `bracket` (lo, hi, offset at lo, offset at hi, which end moved last:
    +1 hi, −1 lo, 0 none) narrowed at t, where the offset is z_t, and the next estimate
    inside it. An end kept twice in a row has its offset halved, so a curved offset converges
    superlinearly instead of creeping in from one side as plain regula falsi does."""
    lo, hi, z_lo, z_hi, last = bracket
    left = (z_t > 0) != (z_lo > 0)  # the crossing lies in (lo, t): hi moves to t
    z_lo = torch.where(left & (last > 0), z_lo / 2, z_lo)
    z_hi = torch.where(~left & (last < 0), z_hi / 2, z_hi)
    lo, z_lo = torch.where(left, lo, t), torch.where(left, z_lo, z_t)
    hi, z_hi = torch.where(left, t, hi), torch.where(left, z_t, z_hi)
    span = z_lo - z_hi
    fraction = torch.where(span != 0, z_lo / torch.where(span != 0, span, 1.0), 0.5)
    last = torch.where(left, 1, -1)
    return (lo, hi, z_lo, z_hi, last), lo + (hi - lo) * fraction.clamp(0.0, 1.0)


def locate(offset_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], t: torch.Tensor,
           z0: torch.Tensor, z1: torch.Tensor, tolerance: torch.Tensor | float = LOCATE_TOL
           ) -> torch.Tensor:
    """Crossings in (0, 1), refined from first guesses t by Illinois steps until each moves by
    less than `tolerance`, returned at the last t evaluated (so a caller can keep what that
    forward pass gave); offset_at(which, t) gives the offsets of crossings `which` at t (a
    forward pass each). A cut δ from its kink leaves an error ~ jump·δ, and along a long
    segment the offsets are far from linear (0.33 interpolated against 0.25 on the demo's
    loss spike), so the linear guess alone is not enough."""
    t = t.clone()
    bracket = (torch.zeros_like(t), torch.ones_like(t), z0.clone(), z1.clone(),
               torch.zeros(len(t), dtype=torch.long))
    moving = torch.arange(len(t))
    for _ in range(MAX_LOCATE_STEPS):
        z_t = offset_at(moving, t[moving])
        narrowed, moved = refine(tuple(b[moving] for b in bracket), t[moving], z_t)
        for whole, part in zip(bracket, narrowed):
            whole[moving] = part
        settled = ((moved - t[moving]).abs() <= _at(tolerance, moving)) | (z_t == 0)
        t[moving] = torch.where(settled, t[moving], moved)  # a settled one: where evaluated
        moving = moving[~settled]
        if not len(moving):
            break
    return t


def _at(tolerance: torch.Tensor | float, which: torch.Tensor) -> torch.Tensor | float:
    return tolerance[which] if isinstance(tolerance, torch.Tensor) else tolerance
