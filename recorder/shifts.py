"""TopK outlier shifts (METHODS.md §5): the largest per-example update coordinates of a step.

Runs once per step on tensors already in memory: one topk per tensor (scope "tensor"), or
per-tensor candidates merged into one global topk (scope "step"; the global top k is always
among the per-tensor top k's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from attrib.schemas import format as fmt


@dataclass
class ShiftInput:
    """One tensor's per-example data at a step: contributions c (rows, *shape) and K_{s,s}."""

    name: str
    shape: tuple[int, ...]
    contributions: torch.Tensor
    coefficient: float | torch.Tensor  # scalar, or elementwise with the parameter's shape
    k: int


def _candidates(item: ShiftInput, clip: float):
    shifts = (item.contributions * item.coefficient * clip).reshape(
        item.contributions.shape[0], -1)
    values, flat = shifts.abs().reshape(-1).topk(min(item.k, shifts.numel()))
    example_row, index = flat // shifts.shape[1], flat % shifts.shape[1]
    grads = item.contributions.reshape(shifts.shape)[example_row, index]
    return values, example_row, index, shifts[example_row, index], grads


def top_shifts(items: list[ShiftInput], scope: str, k: int, clip: float, step: int,
               epoch: int | None, example_ids: np.ndarray) -> pa.Table:
    """The shifts table rows of one step."""
    parts = [(item, *_candidates(item, clip)) for item in items if item.contributions.numel()]
    if not parts:
        return fmt.SHIFTS.empty_table()
    if scope == "step":  # keep the k largest over all tensors
        magnitudes = torch.cat([p[1] for p in parts])
        keep = torch.zeros(len(magnitudes), dtype=torch.bool)
        keep[magnitudes.topk(min(k, len(magnitudes))).indices] = True
        masks = keep.split([len(p[1]) for p in parts])
    else:
        masks = [torch.ones(len(p[1]), dtype=torch.bool) for p in parts]
    columns: dict[str, list] = {name: [] for name in fmt.SHIFTS.names}
    for (item, _, example_row, index, shift, grad), mask in zip(parts, masks):
        index = index[mask].cpu().numpy()
        n = len(index)
        width = int(np.prod(item.shape[1:])) if len(item.shape) > 1 else 1
        columns["step"].append(np.full(n, step, dtype=np.int64))
        columns["epoch"].append(np.full(n, -1 if epoch is None else epoch, dtype=np.int64))
        columns["example_id"].append(example_ids[example_row[mask].cpu().numpy()])
        columns["param"].append(np.full(n, item.name, dtype=object))
        columns["flat_index"].append(index.astype(np.int64))
        columns["row"].append((index // width).astype(np.int64))
        columns["col"].append((index % width).astype(np.int64) if len(item.shape) > 1
                              else np.full(n, -1, dtype=np.int64))
        columns["shift"].append(shift[mask].float().cpu().numpy())
        columns["grad"].append(grad[mask].float().cpu().numpy())
    arrays = {name: np.concatenate(values) for name, values in columns.items()}
    table = pa.table({
        **{name: arrays[name] for name in fmt.SHIFTS.names if name not in ("epoch", "col")},
        "epoch": pa.array(arrays["epoch"], mask=arrays["epoch"] < 0),
        "col": pa.array(arrays["col"], mask=arrays["col"] < 0),
    })
    return table.select(fmt.SHIFTS.names).cast(fmt.SHIFTS)
