"""The scalar f(x; θ) an analysis asks about, and its per-test-point values and gradients."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

Target = str | Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def per_example(output: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    if target == "loss":
        if labels.dtype in (torch.int64, torch.int32):
            return F.cross_entropy(output, labels, reduction="none")
        return F.mse_loss(output, labels.to(output), reduction="none").flatten(1).mean(1)
    if target == "margin":  # true-class logit minus logsumexp of the others (TRAK's f)
        true = output.gather(1, labels[:, None]).squeeze(1)
        others = output.scatter(1, labels[:, None], float("-inf"))
        return true - others.logsumexp(1)
    if target.startswith("logit:"):
        return output[:, int(target.removeprefix("logit:"))]
    raise ValueError(f"unknown target {target!r}: use 'loss', 'margin', 'logit:K' or a "
                     "callable f(model, inputs, labels) returning one value per example")


class _ModelAt(torch.nn.Module):
    """The model evaluated at given parameters, for user target callables."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.params = model, params

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs, strict=False)


def evaluate(model: torch.nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor,
             labels: torch.Tensor, target: Target) -> torch.Tensor:
    """f(x; θ) for every test point: shape (n,)."""
    if callable(target):
        return target(_ModelAt(model, params), inputs, labels)
    output = functional_call(model, params, (inputs,), strict=False)
    return per_example(output, labels, target)


def gradients(model: torch.nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor,
              labels: torch.Tensor, target: Target) -> dict[str, torch.Tensor]:
    """∇_θ f(x; θ) for every test point: {name: (n, *shape)}."""
    def one(theta, x, y):
        return evaluate(model, theta, x[None], y[None], target)[0]

    try:
        return vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, labels)
    except RuntimeError:  # a module with no vmap batching rule (nn.GRU's and nn.LSTM's
        # kernels): one test point at a time, offline; an error of the model itself recurs here
        per = [grad(one)(params, x, y) for x, y in zip(inputs, labels)]
        return {name: torch.stack([p[name] for p in per]) for name in params}


def test_tensors(test_set) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a tuple of tensors or a Dataset of (input, label) pairs."""
    if isinstance(test_set, (tuple, list)) and len(test_set) == 2 and all(
            isinstance(t, torch.Tensor) for t in test_set):
        return test_set[0], test_set[1]
    items = [test_set[i] for i in range(len(test_set))]
    return (torch.stack([torch.as_tensor(x) for x, _ in items]),
            torch.stack([torch.as_tensor(y) for _, y in items]))


def as_tensors(data, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`test_tensors`, with floating-point inputs cast to the analysis dtype (integer inputs,
    such as token ids, stay as they are)."""
    inputs, labels = test_tensors(data)
    return (inputs.to(dtype) if inputs.is_floating_point() else inputs), labels


TARGET_KEY = b"attrib.target"  # a score table's schema metadata: the f its values are about


def name(target: Target) -> str:
    """How a score table records its target: the name, or "custom" for a callable."""
    return target if isinstance(target, str) else "custom"


def named(target: str | None) -> bool:
    """Whether a recorded target is one of the named ones, which compare by name (a callable
    is recorded as "custom", or by its repr in an LDS directory: never compared)."""
    return target is not None and (target in ("loss", "margin") or target.startswith("logit:"))


def with_target(table: pa.Table, target: Target) -> pa.Table:
    """The table with its target in the schema metadata (kept by Parquet, read by
    attrib.evaluate, which refuses to compare scores and gold standards of different f)."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          TARGET_KEY: name(target).encode()})


def target_of(table: pa.Table) -> str | None:
    """The target a score table records, None when it records none (a table from SQL)."""
    value = (table.schema.metadata or {}).get(TARGET_KEY)
    return value.decode() if value is not None else None
