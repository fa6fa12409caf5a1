"""Gauss–Newton influence functions at the final model, solved by conjugate gradients.

score(x, i) = ∇f(x; θ_N)ᵀ (G + λI)⁻¹ ∇ℓ_i(θ_N), with G the generalised Gauss–Newton matrix of
the mean training loss, G = (1/n) Σ_i J_iᵀ H_i J_i (J_i the Jacobian of example i's output,
H_i the Hessian of its loss in the output: diag(p) − ppᵀ for cross-entropy, 2I/d for MSE).
G is positive semi-definite, so damped CG converges; it is never formed: each CG iteration
is one Jacobian-vector and one vector-Jacobian product per training batch, for all test points
at once (vmap). Why CG: exact to its tolerance on the models attrib analyses on a CPU, one knob
(λ), deterministic; LiSSA is noisy and needs a scale; EK-FAC needs per-layer factors.
Same orientation as TracIn / Grad-Dot (positive: training on i lowers f), so upweighting i
changes f by about −score / n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch.func import functional_call, jvp, vjp, vmap

from attrib.analyzer import targets
from attrib.analyzer.checkpoint_methods import score_table
from attrib.analyzer.progress import progress_bar
from attrib.analyzer.run import Run
from attrib.analyzer.training import check_training_set


@dataclass
class InfluenceResult:
    scores: pa.Table  # (test_id, example_id, value)
    residuals: list[float]  # max relative CG residual over test points, per iteration


def influence(run: Run, model_fn: Callable[[], torch.nn.Module], train_set, test_set,
              target: targets.Target = "loss", damping: float = 1e-3, max_iter: int = 200,
              tol: float = 1e-8, batch_size: int = 512, dtype: torch.dtype = torch.float64,
              progress: bool = True, check_data: bool = True) -> InfluenceResult:
    """Influence of every training example on every test point at the run's final θ.
    `check_data`: first verify that `train_set` reproduces the recorded gradient."""
    if check_data:
        check_training_set(run, model_fn, train_set, "the influence function")
    model = run.build_model(model_fn, dtype).eval()
    params = {n: v.to(dtype) for n, v in run.reconstruct(run.n_steps).items()}
    test_x, test_y = targets.as_tensors(test_set, dtype)
    train_x, train_y = targets.as_tensors(train_set, dtype)
    rhs = _flat(targets.gradients(model, params, test_x, test_y, target))
    ggn = GaussNewton(model, params, train_x, train_y, batch_size)
    solution, residuals = conjugate_gradients(lambda v: ggn(v) + damping * v, rhs, max_iter,
                                              tol, progress)
    scores = torch.cat([solution @ _flat(targets.gradients(
        model, params, train_x[i: i + batch_size], train_y[i: i + batch_size], "loss")).T
        for i in range(0, len(train_y), batch_size)], dim=1)
    return InfluenceResult(score_table(scores, target), residuals)


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


class GaussNewton:
    """V ↦ G V for a batch of flat vectors V (m, P), G of the mean training loss."""

    def __init__(self, model, params: dict[str, torch.Tensor], inputs, labels,
                 batch_size: int) -> None:
        self.model, self.params, self.inputs, self.labels = model, params, inputs, labels
        self.batch_size = batch_size
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]

    def _unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: part.reshape(shape) for n, part, shape in
                zip(self.names, v.split(self.sizes), self.shapes)}

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(vectors)
        n = len(self.labels)
        for start in range(0, n, self.batch_size):
            x = self.inputs[start: start + self.batch_size]
            y = self.labels[start: start + self.batch_size]

            def outputs(p, x=x):
                return functional_call(self.model, p, (x,), strict=False)

            z, pullback = vjp(outputs, self.params)

            def product(v, z=z, y=y, outputs=outputs, pullback=pullback):
                _, jv = jvp(outputs, (self.params,), (self._unflat(v),))
                (grad,) = pullback(_loss_hessian(z, y, jv))
                return torch.cat([grad[name].reshape(-1) for name in self.names])

            out += vmap(product)(vectors) / n
        return out


def _loss_hessian(z: torch.Tensor, labels: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v per example: the Hessian of the per-example loss in the model output."""
    if labels.dtype in (torch.int64, torch.int32):
        p = z.softmax(-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)
    return 2 * v / z[0].numel()


def conjugate_gradients(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                        max_iter: int, tol: float, progress: bool
                        ) -> tuple[torch.Tensor, list[float]]:
    """Solve A X = B row by row (A symmetric positive definite), all rows at once."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    norm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    residuals = []
    for _ in progress_bar(range(max_iter), progress=progress, desc="CG (Gauss-Newton)", unit="it"):
        ap = apply(p)
        alpha = rr / (p * ap).sum(1).clamp_min(torch.finfo(rhs.dtype).tiny)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rr_new = (r * r).sum(1)
        residuals.append(float((rr_new.sqrt() / norm).max()))
        if residuals[-1] < tol:
            break
        p = r + (rr_new / rr.clamp_min(torch.finfo(rhs.dtype).tiny))[:, None] * p
        rr = rr_new
    return x, residuals
