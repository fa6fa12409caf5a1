"""ḡ = ∫_0^1 ∇f(θ + tΔ) dt over one segment, per test point, with the measured error of its rule.

The integral of ∇f·Δ over any part [a, b] of a segment is known exactly, F(b) − F(a) with
F(t) = f(θ + tΔ) (forward passes only), so each part's error |Σ_q w_q ∇f·Δ − (F(b) − F(a))| is
measured, not estimated, and their sum bounds the completeness gap for any rule.

The adaptive rule (METHODS.md §2) starts from Gauss–Legendre q = 2 over the whole segment for
every test point at once. A test point whose error exceeds its share of the tolerance gets its
own partition: the segment is split where its kinked activations cross a level (located at the
segment's ends, refined by one regula falsi step, only where the jump they cause in ∇f·Δ can
matter), so each part is smooth and two nodes integrate it to high order; parts still above
their share (kinks crossed twice, activations the recorder can't see, steep smooth stretches)
are bisected, worst first, within `max_nodes` gradient evaluations per test point and segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attrib.analyzer import targets
from attrib.analyzer.path_kernel.kinks import LOCATE_TOL, crossings, locate
from attrib.analyzer.path_kernel.points import PathPoints

ADAPTIVE = "adaptive"  # quadrature=: Gauss–Legendre q = 2, per test point split at kinks
MAX_NODES = 256  # gradient evaluations the adaptive rule may spend per test point and segment:
# the demo's loss spike crosses ~50 kinks in one 10-step segment, AdamW's first step on a
# 64-256-256 ReLU MLP ~90 (measured; it needs 179). A test point spends them only where it
# misses its tolerance share; 512 cost the demo 1.59x the fixed rule's time against 1.3x at
# 160, for the same completeness (demo_completeness.py)
SPLIT_FRACTION = 0.1  # split at a kink whose jump in ∇f·Δ exceeds this share of the tolerance
LOCATE_SHARE = 1e-3  # a kink is located until its misplacement costs at most this share
ROUNDING_FLOOR = 16  # a segment's share is at least this many ulps of |F(0)| + |F(1)|


def quadrature_rule(spec: int | str) -> list[tuple[float, float]]:
    """(node, weight) pairs on [0, 1]: Gauss–Legendre with q nodes, "midpoint:K", or "left"
    (the segment's start only: plain-SGD path kernel = TracIn over every step); "adaptive"
    starts from q = 2."""
    if spec == ADAPTIVE:
        return quadrature_rule(2)
    if spec == "left":
        return [(0.0, 1.0)]
    if isinstance(spec, str) and spec.startswith("midpoint:"):
        k = int(spec.removeprefix("midpoint:"))
        return [((i + 0.5) / k, 1.0 / k) for i in range(k)]
    nodes, weights = np.polynomial.legendre.leggauss(int(spec))
    return [((x + 1) / 2, w / 2) for x, w in zip(nodes.tolist(), weights.tolist())]


@dataclass
class _Parts:
    """Parts [a, b] of segments, one row each: the test point, F at both ends, the rule's
    error against F(b) − F(a) and that error over the part's share of the tolerance, and the
    rule's ∫_a^b ∇f (flattened; a list, so that bisecting a few parts copies no others)."""

    row: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    fa: torch.Tensor
    fb: torch.Tensor
    error: torch.Tensor
    over: torch.Tensor
    gbar: list[torch.Tensor]

    def take(self, index: torch.Tensor) -> _Parts:
        return _Parts(*(getattr(self, f)[index] for f in _FIELDS),
                      gbar=[self.gbar[i] for i in index.tolist()])

    @staticmethod
    def join(*parts: _Parts) -> _Parts:
        return _Parts(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS),
                      gbar=[g for p in parts for g in p.gbar])


_FIELDS = ("row", "a", "b", "fa", "fb", "error", "over")


class Integrator:
    """One segment at a time: `segment` returns ḡ per test point and adds its measured error to
    `error`; `nodes[start]` is the mean number of gradient evaluations per test point.
    `tolerance` is per test point, for all `steps` steps of the run.

    A segment's share of a test point's tolerance is what the segments before it left unspent,
    spread over the steps still to come (never less than the even split, `steps` / N of it):
    while every segment meets its share the errors add up to at most the tolerance, and a test
    point the fixed rule integrates well on most segments leaves room on the few that cross
    many kinks, which then need fewer evaluations."""

    def __init__(self, model: torch.nn.Module, names: list[str], inputs, labels,
                 target: targets.Target, spec: int | str, tolerance: np.ndarray, steps: int,
                 max_nodes: int = MAX_NODES) -> None:
        self.model, self.names, self.inputs, self.labels = model, names, inputs, labels
        self.target, self.max_nodes = target, max_nodes
        self.rule = quadrature_rule(spec)
        self.adaptive = spec == ADAPTIVE
        self.tolerance = torch.from_numpy(np.asarray(tolerance, dtype=np.float64))
        self.steps, self.steps_left = steps, steps
        self.error = torch.zeros(len(labels), dtype=torch.float64)
        self.nodes: dict[int, float] = {}
        # per parameter and test point: Σ over segments of ḡ·Δθ, what the terms must add up to
        self.along: dict[str, torch.Tensor] = {}
        self.points = PathPoints(model, names, inputs, labels, target)

    def segment(self, start_step: int, theta: dict[str, torch.Tensor],
                delta: dict[str, torch.Tensor], steps: int = 1, trial: bool = False
                ) -> dict[str, torch.Tensor] | None:
        """ḡ over a segment of `steps` steps (its share: see the class). With `trial`, None
        (and nothing recorded) when the fixed rule misses the share for any test point: the
        caller then tries a shorter segment."""
        self.points.on(theta, delta)
        self.delta = torch.cat([delta[n].reshape(-1) for n in self.names])
        n = len(self.labels)
        f0, f1 = self._f(0.0), self._f(1.0)
        gbar = self._shared_rule()
        error = (gbar @ self.delta - (f1 - f0)).abs().double().cpu()
        used = torch.full((n,), float(len(self.rule)), dtype=torch.float64)
        # no share below what rounding f in the analysis dtype can resolve: in float32 the
        # rule would otherwise bisect noise (58 evaluations per segment on a smooth MLP)
        floor = ROUNDING_FLOOR * torch.finfo(f0.dtype).eps * (f0.abs() + f1.abs())
        even = self.tolerance * steps / self.steps
        unspent = (self.tolerance - self.error).clamp_min(0) * steps / max(self.steps_left, 1)
        self._share = torch.maximum(torch.maximum(even, unspent), floor.double().cpu())
        if trial and (error > self._share).any():
            return None
        failing = torch.nonzero(error > self._share).flatten() if self.adaptive else []
        if len(failing):
            whole = _Parts(failing, torch.zeros(len(failing), dtype=f0.dtype),
                           torch.ones(len(failing), dtype=f0.dtype), f0[failing], f1[failing],
                           error[failing], error[failing] / self._share[failing],
                           list(gbar[failing].unbind(0)))  # a copy: gbar's rows are reset
            gbar[failing], error[failing] = 0, 0
            self._total, self._settled_error = gbar, error
            self._spent = torch.zeros(n, dtype=torch.float64)
            self._refine(whole)
            used += self._spent
        self.error += error
        self.steps_left -= steps
        self.nodes[start_step] = float(used.mean())
        gbar = self._unflatten(gbar)
        for name in self.names:
            step = gbar[name].flatten(1) @ delta[name].reshape(-1)
            self.along[name] = self.along.get(name, 0) + step
        return gbar

    def _f(self, t: float) -> torch.Tensor:
        with torch.no_grad():
            return targets.evaluate(self.model, self.points.at(t), self.inputs, self.labels,
                                    self.target)

    def _shared_rule(self) -> torch.Tensor:
        """The rule over [0, 1] for every test point: θ is shared, so one vmap per node."""
        total = None
        for node, weight in self.rule:
            grads = targets.gradients(self.model, self.points.at(node), self.inputs,
                                      self.labels, self.target)
            flat = weight * torch.cat([grads[n].flatten(1) for n in self.names], 1)
            total = flat if total is None else total + flat
        return total

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: (test points, *shape)} views of flattened rows, in `names` order."""
        shapes = [self.points.delta[n].shape for n in self.names]
        pieces = flat.split([shape.numel() for shape in shapes], dim=1)
        return {n: piece.reshape(len(flat), *shape)
                for n, piece, shape in zip(self.names, pieces, shapes)}

    def _refine(self, whole: _Parts) -> None:
        """Per failing test point: split at its kinks, then bisect its worst part while the
        errors of its parts add up to more than its tolerance and the budget allows. Settled
        parts go straight into the segment's totals (only open ones keep their integral)."""
        q = len(self.rule)
        parts = self._split_at_kinks(whole)
        while len(parts.row):
            rows = parts.row
            open_error = torch.zeros_like(self._settled_error).index_add_(0, rows, parts.error)
            total = (self._settled_error + open_error)[rows]
            budget = self.max_nodes - (q + self._spent[rows])
            done = (total <= self._share[rows]) | (budget < 2 * q)
            if done.any():
                self._settle(rows[done], torch.stack([parts.gbar[i] for i in
                                                      torch.nonzero(done).flatten().tolist()]),
                             parts.error[done])
            parts = parts.take(torch.nonzero(~done).flatten())
            if not len(parts.row):
                return
            # every open part (each misses its own share) of a test point, worst first, as
            # far as its budget goes: one part per round took 3.7 rounds per segment on the
            # demo, each a forward and a gradient call
            order = np.lexsort((-parts.over.numpy(), parts.row.numpy()))
            ranked = parts.row.numpy()[order]
            rank = np.arange(len(order)) - np.searchsorted(ranked, ranked)
            cap = (budget[~done].numpy()[order] // (2 * q)).astype(np.int64)
            worst = order[rank < np.maximum(cap, 1)]
            chosen = parts.take(torch.from_numpy(worst))
            middle = (chosen.a + chosen.b) / 2
            fm = self.points.values(chosen.row, middle)
            halves = self._evaluated(torch.cat([chosen.row, chosen.row]),
                                     torch.cat([chosen.a, middle]), torch.cat([middle, chosen.b]),
                                     torch.cat([chosen.fa, fm]), torch.cat([fm, chosen.fb]))
            rest = torch.from_numpy(np.setdiff1d(np.arange(len(parts.row)), worst))
            parts = _Parts.join(parts.take(rest), halves)

    def _settle(self, rows: torch.Tensor, gbar: torch.Tensor, error: torch.Tensor) -> None:
        """Add parts' integrals and errors to their test points' totals for the segment."""
        self._total.index_add_(0, rows, gbar)
        self._settled_error.index_add_(0, rows, error)

    def _split_at_kinks(self, whole: _Parts) -> _Parts:
        """Each test point's segment cut where a kink that can matter lies (at most as many as
        the budget lets the parts be integrated); rows without such kinks keep `whole`."""
        rows = whole.row
        ends = self.points.kinks(torch.cat([rows, rows]), torch.cat(  # both ends in one call
            [torch.zeros(len(rows)), torch.ones(len(rows))]))
        if ends is None:
            return whole
        (z0, z1), (s0, s1) = ends[0].chunk(2), ends[1].chunk(2)
        at, column, t, jump = crossings(z0, z1, s0, s1)
        wanted = jump > SPLIT_FRACTION * self._share[rows[at]].to(jump)
        at, column, t, jump = at[wanted], column[wanted], t[wanted], jump[wanted]
        cap = self.max_nodes // len(self.rule) - 2  # cuts per test point the budget covers
        order = np.lexsort((-jump.numpy(), at.numpy()))
        rank = np.arange(len(order)) - np.searchsorted(at.numpy()[order], at.numpy()[order])
        chosen = torch.from_numpy(order[rank < cap])
        at, column, t, jump = at[chosen], column[chosen], t[chosen], jump[chosen]
        if not len(at):
            return whole

        seen_t, seen_f = torch.full_like(t, torch.nan), whole.fa.new_zeros(len(at))

        def offsets(pairs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            z, f = self.points.kinks(rows[at[pairs]], t, slopes=False)
            seen_t[pairs], seen_f[pairs] = t, f.to(seen_f)  # f there, for the cut
            return z[torch.arange(len(pairs)), column[pairs]]

        # a cut δ from its kink leaves an error of about jump·δ: located to LOCATE_SHARE of
        # the share, no closer (each refinement is a forward pass for every kink still moving)
        close = (LOCATE_SHARE * self._share[rows[at]].to(jump) / jump).clamp_min(LOCATE_TOL)
        t = locate(offsets, t, z0[at, column], z1[at, column], close)
        f_t, unseen = seen_f, seen_t != t  # those that ran out of steps: f not yet known
        if unseen.any():
            f_t[unseen] = self.points.values(rows[at[unseen]], t[unseen])
        cut = torch.zeros(len(rows), dtype=torch.bool)
        cut[at] = True
        pieces = []
        for i in torch.nonzero(cut).flatten().tolist():
            mine = at == i
            where, order_t = torch.sort(t[mine])
            bounds = torch.cat([where.new_zeros(1), where, where.new_ones(1)])
            fs = torch.cat([whole.fa[i: i + 1], f_t[mine][order_t], whole.fb[i: i + 1]])
            distinct = torch.cat([torch.ones(1, dtype=torch.bool), bounds[1:] > bounds[:-1]])
            bounds, fs = bounds[distinct], fs[distinct]
            pieces.append((torch.full((len(bounds) - 1,), int(rows[i])), bounds[:-1], bounds[1:],
                           fs[:-1], fs[1:]))
        cut_parts = self._evaluated(*(torch.cat(p) for p in zip(*pieces)))
        return _Parts.join(whole.take(torch.nonzero(~cut).flatten()), cut_parts)

    def _evaluated(self, row, a, b, fa, fb) -> _Parts:
        """The rule on each part (q gradients each, in memory-bounded chunks) and its error;
        parts within their share settle at once, the others come back open."""
        self._spent.index_add_(0, row, torch.full((len(row),), float(len(self.rule)),
                                                  dtype=torch.float64))
        share = self._share[row] * (b - a).double().cpu()
        opened = []
        for lo, gbar in self.points.integrals(row, a, b, self.rule):
            part = slice(lo, lo + len(gbar))
            error = (gbar @ self.delta - (fb[part] - fa[part])).abs().double().cpu()
            over = error / share[part].clamp_min(1e-300)
            settled = over <= 1
            self._settle(row[part][settled], gbar[settled], error[settled])
            kept = ~settled
            opened.append(_Parts(row[part][kept], a[part][kept], b[part][kept], fa[part][kept],
                                 fb[part][kept], error[kept], over[kept],
                                 list(gbar[kept].unbind(0))))  # a copy: the chunk can go
        return _Parts.join(*opened)
