"""TopK outlier shifts (METHODS.md §5): the largest per-example update coordinates of a step.

The per-example update K_{s,s} ⊙ α_s c_{s,i} exists only after the step (Adam's K depends on
the step's own second moment), so the factored contributions are kept until then and densified
in chunks of examples: each chunk's top k joins the candidates, and the step's top k is taken
from those. Peak memory is one chunk, not examples × parameters. With scope "step" the per-tensor
top k's are merged into one (the global top k is always among them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from attrib.recorder.per_example import Dense, PerExample
from attrib.schemas import format as fmt

CHUNK_SCALARS = 1 << 22  # densify at most this many per-example values at a time (16 MiB)


@dataclass
class ShiftInput:
    """One tensor at a step: its contributions per micro-batch (row offset, factored) and K."""

    name: str
    shape: tuple[int, ...]
    parts: list[tuple[int, PerExample]]
    coefficient: float | torch.Tensor  # scalar, or elementwise with the parameter's shape
    k: int


@dataclass
class Candidates:
    """The k largest |shift| entries of one tensor: magnitudes, example rows, flat indices,
    signed shifts and contributions."""

    magnitude: torch.Tensor
    row: torch.Tensor
    flat: torch.Tensor
    shift: torch.Tensor
    grad: torch.Tensor

    def top(self, k: int) -> Candidates:
        keep = self.magnitude.topk(min(k, len(self.magnitude))).indices
        return Candidates(*(t[keep] for t in (self.magnitude, self.row, self.flat, self.shift,
                                               self.grad)))


def _disjoint(parts: list[tuple[int, PerExample]]) -> list[tuple[int, PerExample]]:
    """Parts with overlapping rows (a module called twice per forward) are summed first."""
    offsets = [offset for offset, _ in parts]
    if len(set(offsets)) == len(offsets):
        return parts
    rows = max(offset + c.rows for offset, c in parts)
    first = parts[0][1].dense()
    merged = first.new_zeros((rows, *first.shape[1:]))
    for offset, c in parts:
        merged[offset: offset + c.rows] += c.dense()
    return [(0, Dense(merged))]


def tensor_candidates(item: ShiftInput, clip: float | torch.Tensor,
                      chunk_scalars: int = CHUNK_SCALARS) -> Candidates | None:
    numel = math.prod(item.shape)
    scale = (item.coefficient * clip).reshape(-1) if isinstance(item.coefficient, torch.Tensor) \
        else item.coefficient * clip
    chunk = max(1, chunk_scalars // max(1, numel))
    best: Candidates | None = None
    for offset, contribution in _disjoint(item.parts):
        for start in range(0, contribution.rows, chunk):
            c = contribution.slice(start, start + chunk).dense().reshape(-1, numel)
            floor = best.magnitude[-1] if best is not None and len(best.magnitude) == \
                item.k else None  # the k-th largest so far: later entries below can't enter
            magnitude, row, index, shift = _chunk_top(c, scale, item.k, floor)
            found = Candidates(magnitude, row + offset + start, index, shift, c[row, index])
            best = found if best is None else Candidates(
                *(torch.cat(pair) for pair in zip(
                    (best.magnitude, best.row, best.flat, best.shift, best.grad),
                    (found.magnitude, found.row, found.flat, found.shift, found.grad)))
            ).top(item.k)
    return best


def _chunk_top(c: torch.Tensor, scale: float | torch.Tensor, k: int,
               floor: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The k largest |c ⊙ scale| entries of a chunk (rows: examples) that can still enter the
    tensor's top k (`floor`: the k-th largest of earlier chunks), as magnitudes, rows, flat
    indices and signed shifts. On the CPU through a threshold τ, the larger of `floor` and
    the chunk's k-th largest row maximum (the k rows' maxima are k entries ≥ τ, so the top k
    lie among the entries ≥ τ), found in two passes: 1.6-3.6x faster than the per-row top k
    below on 264 x 4,096 and 128 x 50,176 chunks. Elsewhere (a GPU, where finding the entries
    would wait for the step; NaN; τ = 0 or unknown, when most entries would pass) each row's
    top k, then the chunk's: the same set, as the top k lies among the per-row top k's, and
    ~19x faster than one flat top k on the CPU, which is one sequential selection where rows
    run in parallel."""
    numel = c.shape[1]
    magnitudes = torch.mul(c, scale).abs_()
    if c.device.type == "cpu":
        row_max = magnitudes.amax(dim=1)
        tau = row_max.topk(k).values[-1] if len(row_max) >= k else floor
        if floor is not None and tau is not floor:
            tau = torch.maximum(tau, floor)
        if tau is not None and tau > 0 and not row_max.isnan().any():
            rows = torch.nonzero(row_max >= tau).squeeze(1)  # often a few, past the first chunk
            held = magnitudes[rows] if len(rows) < len(row_max) else magnitudes
            row, index = torch.nonzero(held >= tau, as_tuple=True)
            magnitude, chosen = held[row, index].topk(min(k, len(row)))
            row, index = row[chosen], index[chosen]
            if held is not magnitudes:
                row = rows[row]
            return magnitude, row, index, c[row, index] * _at(scale, index)
    per_row, columns = magnitudes.topk(min(k, numel), dim=1)
    magnitude, chosen = per_row.reshape(-1).topk(min(k, per_row.numel()))
    row, index = chosen // per_row.shape[1], columns.reshape(-1)[chosen]
    return magnitude, row, index, c[row, index] * _at(scale, index)


def _at(scale: float | torch.Tensor, index: torch.Tensor) -> float | torch.Tensor:
    """The scale of flat entries `index`: elementwise (a parameter's K) or one number."""
    return scale[index] if isinstance(scale, torch.Tensor) and scale.dim() else scale


@dataclass
class Chosen:
    """One tensor's kept shifts: flat indices, example rows, signed shifts and contributions."""

    name: str
    shape: tuple[int, ...]
    flat: torch.Tensor
    row: torch.Tensor
    shift: torch.Tensor
    grad: torch.Tensor


@dataclass
class StepShifts:
    """A step's kept shifts as tensors; `table()` makes the shifts table's rows. The recorder
    hands these to the writer thread, which builds the table: NumPy and Arrow work per row
    group were ~1 ms of the demo's recorded step. (On a GPU the small tensors come to the host
    at the step, as before: the writer thread does not touch the training's device.)"""

    chosen: list[Chosen]
    step: int
    epoch: int | None
    example_ids: np.ndarray

    def table(self) -> pa.Table:
        if not self.chosen:
            return fmt.SHIFTS.empty_table()
        columns: dict[str, list] = {name: [] for name in fmt.SHIFTS.names}
        for c in self.chosen:
            index = c.flat.numpy()
            n = len(index)
            width = math.prod(c.shape[1:]) if len(c.shape) > 1 else 1
            columns["step"].append(np.full(n, self.step, dtype=np.int64))
            columns["epoch"].append(np.full(n, -1 if self.epoch is None else self.epoch,
                                            dtype=np.int64))
            columns["example_id"].append(self.example_ids[c.row.numpy()])
            columns["param"].append(np.full(n, c.name, dtype=object))
            columns["flat_index"].append(index.astype(np.int64))
            columns["row"].append((index // width).astype(np.int64))
            columns["col"].append((index % width).astype(np.int64) if len(c.shape) > 1
                                  else np.full(n, -1, dtype=np.int64))
            columns["shift"].append(c.shift.float().numpy())
            columns["grad"].append(c.grad.float().numpy())
        arrays = {name: np.concatenate(values) for name, values in columns.items()}
        table = pa.table({
            **{name: arrays[name] for name in fmt.SHIFTS.names if name not in ("epoch", "col")},
            "epoch": pa.array(arrays["epoch"], mask=arrays["epoch"] < 0),
            "col": pa.array(arrays["col"], mask=arrays["col"] < 0),
        })
        return table.select(fmt.SHIFTS.names).cast(fmt.SHIFTS)


def top_shifts(items: list[ShiftInput], scope: str, k: int, clip: float | torch.Tensor,
               step: int, epoch: int | None, example_ids: np.ndarray) -> StepShifts:
    """The shifts of one step (its table: `.table()`)."""
    found = [(item, c) for item in items if (c := tensor_candidates(item, clip)) is not None]
    if scope == "step" and found:  # keep the k largest over all tensors
        magnitudes = torch.cat([c.magnitude for _, c in found])
        keep = torch.zeros(len(magnitudes), dtype=torch.bool, device=magnitudes.device)
        keep[magnitudes.topk(min(k, len(magnitudes))).indices] = True
        masks = keep.split([len(c.magnitude) for _, c in found])
    else:
        masks = [None] * len(found)
    chosen = []
    for (item, c), mask in zip(found, masks):
        kept = [t if mask is None else t[mask] for t in (c.flat, c.row, c.shift, c.grad)]
        chosen.append(Chosen(item.name, item.shape, *(t.cpu() for t in kept)))
    return StepShifts(chosen, step, epoch, example_ids)
