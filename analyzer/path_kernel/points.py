"""f, its gradient and its kinks at points θ + tΔ of one segment, each test point at its own t.

The adaptive integrator refines each test point's partition of a segment separately (kinks
sit at different t for different inputs), so these evaluate (test point, t) pairs in one
vmapped call, in chunks that bound the memory of the per-pair parameters.
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap

from attrib.analyzer import targets
from attrib.analyzer.path_kernel.kinks import KinkRecorder

PAIR_BUDGET_BYTES = 256 << 20  # per-pair parameters and gradients held at once


class PathPoints:
    """Evaluations along θ + tΔ for pairs (rows: test point indices, ts: positions in [0, 1]).
    Gradient integrals come back flattened, one row per part, parameters in `names` order."""

    def __init__(self, model: torch.nn.Module, names: list[str], inputs: torch.Tensor,
                 labels: torch.Tensor, target: targets.Target) -> None:
        self.model, self.names, self.inputs, self.labels = model, names, inputs, labels
        self.target = target
        self.theta: dict[str, torch.Tensor] = {}
        self.delta: dict[str, torch.Tensor] = {}
        self.kink_shapes: list[torch.Size] | None = None  # None: not probed yet; []: no kinks

    def on(self, theta: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
        self.theta, self.delta = theta, delta

    def at(self, t) -> dict[str, torch.Tensor]:
        return {n: self.theta[n] + t * self.delta[n] for n in self.names}

    def _f(self, params, x, y) -> torch.Tensor:
        return targets.evaluate(self.model, params, x[None], y[None], self.target)[0]

    def _pairs_per_chunk(self) -> int:
        return max(1, PAIR_BUDGET_BYTES // (4 * 8 * sum(v.numel() for v in self.theta.values())))

    def _chunks(self, rows: torch.Tensor, ts: torch.Tensor):
        size = self._pairs_per_chunk()
        for lo in range(0, len(rows), size):
            r, t = rows[lo: lo + size], ts[lo: lo + size]
            yield t.to(next(iter(self.theta.values())).dtype), self.inputs[r], self.labels[r]

    def values(self, rows: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """f per pair (forward passes only)."""
        def one(t, x, y):
            return self._f(self.at(t), x, y)

        with torch.no_grad():
            return torch.cat([self._vmapped(one, *chunk) for chunk in self._chunks(rows, ts)])

    def integrals(self, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  rule: list[tuple[float, float]]):
        """∫_a^b ∇_θ f dt per part (row, a, b) by `rule` on [a, b], flattened, yielded in
        chunks (start index, (parts in chunk, number of parameters)): the per-pair
        parameters and gradients of one chunk stay within PAIR_BUDGET_BYTES, and the caller
        can reduce each chunk before the next one exists. Each parameter's node gradients are
        weighted into the chunk's rows in place: flattening and joining every node's gradient
        first copied them twice, 52% of the time on the demo's parts."""
        def one(t, x, y):
            return grad(self._f)(self.at(t), x, y)

        nodes = torch.tensor([x for x, _ in rule], dtype=a.dtype)
        weights = torch.tensor([w for _, w in rule], dtype=a.dtype)
        q = len(rule)
        per_part = max(1, self._pairs_per_chunk() // q)
        sizes = [self.theta[n].numel() for n in self.names]
        for lo in range(0, len(rows), per_part):
            r, a_, b_ = rows[lo: lo + per_part], a[lo: lo + per_part], b[lo: lo + per_part]
            ts = (a_[:, None] + (b_ - a_)[:, None] * nodes[None]).reshape(-1)
            grads = self._vmapped(one, ts.to(next(iter(self.theta.values())).dtype),
                                  self.inputs[r.repeat_interleave(q)],
                                  self.labels[r.repeat_interleave(q)])
            scale = (b_ - a_)[:, None] * weights[None]  # (parts, nodes)
            out = next(iter(grads.values())).new_empty((len(r), sum(sizes)))
            for name, part in zip(self.names, out.split(sizes, dim=1)):
                g = grads[name].unflatten(0, (len(r), q))
                into = part.view(len(r), *g.shape[2:])
                shape = (len(r), *([1] * (g.dim() - 2)))
                torch.mul(g[:, 0], scale[:, 0].to(g).view(shape), out=into)
                for k in range(1, q):
                    into.addcmul_(g[:, k], scale[:, k].to(g).view(shape))
            yield lo, out

    def kinks(self, rows: torch.Tensor, ts: torch.Tensor, slopes: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per pair, every kinked activation's input minus its levels (pairs, K), and with
        `slopes` ∂f/∂(activation output) lined up with them, without f at the pair (the
        forward pass has it); None where the model has no activation the recorder sees (or
        vmap can't batch it)."""
        shapes, levels = self._probe_shapes(), []
        if not shapes:
            return None

        def one(probes, t, x, y):
            with KinkRecorder(probes) as recorder:
                f = self._f(self.at(t), x, y)
            levels[:] = recorder.levels
            return f, recorder.flat_offsets(f)

        offsets, found = [], []
        for t, x, y in self._chunks(rows, ts):
            probes = [t.new_zeros((len(t), *s)) for s in shapes]
            if slopes:
                d, z = vmap(grad(one, has_aux=True))(probes, t, x, y)
                found.append(KinkRecorder.flat_slopes(list(d), levels))
            else:
                with torch.no_grad():
                    f, z = vmap(one, in_dims=(None, 0, 0, 0))(None, t, x, y)
                found.append(f)
            offsets.append(z)
        return torch.cat(offsets), torch.cat(found)

    def _probe_shapes(self) -> list[torch.Size]:
        """The kinked activations' input shapes for one test point (once per analysis); empty
        when the model has none vmap lets the recorder see."""
        if self.kink_shapes is None:
            def one(t, x, y):
                with KinkRecorder() as recorder:
                    self._f(self.at(t), x, y)
                self.kink_shapes = list(recorder.shapes)
                return t

            try:
                with torch.no_grad():
                    vmap(one)(*next(self._chunks(torch.zeros(1, dtype=torch.long),
                                                 torch.zeros(1))))
            except RuntimeError:  # no vmap rule (recurrent kernels): bisection only
                self.kink_shapes = []
        return self.kink_shapes

    def _vmapped(self, one, t, x, y):
        try:
            return vmap(one)(t, x, y)
        except RuntimeError:  # a module with no vmap batching rule: one pair at a time
            results = [one(*pair) for pair in zip(t, x, y)]
            if isinstance(results[0], dict):
                return {n: torch.stack([r[n] for r in results]) for n in results[0]}
            return torch.stack(results)
