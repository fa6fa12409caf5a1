"""Captured tensors whose per-example rows a BatchNorm couples through its batch statistics.

A module that runs before a BatchNorm in training mode (upstream of it in a sequential model)
gets, per example, the gradient of the whole batch's loss with respect to that example's
activations: the batch mean and variance carry every other example's loss back into it. Its
rows still sum to the tensor's gradient, so nothing reads as residual; they are just not each
example's own loss gradient. This names such tensors once, and `strict=True` refuses them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

NORMS = (nn.modules.batchnorm._BatchNorm,)


class CoupledRowsError(TypeError):
    """Per-example rows that batch statistics couple, refused under strict=True."""


class BatchNormCoupling:
    """Forward hooks on the model's BatchNorms; `saw` is told which tracked tensors' modules
    ran in the current declared micro-batch, in call order."""

    def __init__(self, model: nn.Module, names: list[str], strict: bool) -> None:
        self.names = names
        self.strict = strict
        self.active = False  # inside a declared micro-batch's forward
        self.coupled: set[int] = set()
        self._seen: list[int] = []
        self._paths = {id(m): path for path, m in model.named_modules()}
        self._handles = [m.register_forward_hook(self._after_norm)
                         for m in model.modules() if isinstance(m, NORMS)]

    def start(self) -> None:
        """A new micro-batch's forward begins."""
        self.active = True
        self._seen = []

    def saw(self, indices: Iterable[int]) -> None:
        self._seen.extend(indices)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _after_norm(self, module: nn.Module, args, output) -> None:
        if not (self.active and module.training and torch.is_grad_enabled()):
            return
        new = sorted(set(self._seen) - self.coupled)
        if not new:
            return
        self.coupled.update(new)
        message = (f"{[self.names[i] for i in new]} run before BatchNorm "
                   f"{self._paths.get(id(module), '')!r} in training mode: their per-example "
                   "rows sum to the gradient, but each row is the gradient of the whole batch's "
                   "loss through that example's activations (the batch statistics couple the "
                   "examples), not the example's own loss gradient. Put the BatchNorm in eval "
                   "mode, use LayerNorm/GroupNorm, or read these rows as coupled")
        if self.strict:
            raise CoupledRowsError(message)
        warnings.warn(f"attrib: {message}", stacklevel=2)
