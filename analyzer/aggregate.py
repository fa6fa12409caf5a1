"""Influence rows over kept axes, aggregated while a sweep streams steps (path kernel, linear
response): one implementation of the axes example, step, stage, param and layer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from attrib.analyzer.run import Run
from attrib.schemas.factored import FactorRows

AXES = ("example", "step", "stage", "param", "layer")
COLUMNS = {"example": "example_id", "step": "step", "stage": "stage", "param": "param",
           "layer": "layer"}  # axis → table column


def owned(values: torch.Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array that owns its memory, for an Arrow column. A table
    over a tensor's own memory (zero-copy) changes when the tensor is updated in place, and
    breaks when torch moves that memory (into shared memory, when sent to a worker)."""
    return values.detach().cpu().numpy().copy()


class InfluenceRows:
    """Influence rows, summed over the axes not kept while streaming.

    With `step` kept, each step's rows are output as they come. Without it, influences are
    added into dense accumulators, one (unique examples, n_test) tensor per (term, param)
    for data terms and one (n_test,) vector for the others, so memory doesn't grow with steps.
    """

    def __init__(self, by: tuple[str, ...], n_test: int, example_ids: np.ndarray,
                 stages: list[str], layers: dict[str, str]) -> None:
        self.by, self.n_test = by, n_test
        self.stages, self.layers = stages, layers  # step → stage, param → layer (module)
        self.per_param = "param" in by or "layer" in by
        self.parts: list[pa.Table] = []
        self.ids = np.unique(example_ids)  # sorted: slot of an id by searchsorted
        self.sums: dict[tuple, torch.Tensor] = {}
        self.seen: dict[tuple, torch.Tensor] = {}  # which example slots each sum received

    def add(self, term: str, values: torch.Tensor, step: int | None, param: str | None,
            examples: np.ndarray | None = None) -> None:
        """values: (n_test,) or, for data terms, (n_examples, n_test)."""
        values = values.detach().reshape(-1, self.n_test)
        if "step" in self.by:
            self.parts.append(self._table(term, values, step, param, examples))
            return
        per_example = examples is not None and "example" in self.by
        if not per_example:
            values = values.sum(0, keepdim=True)
        stage = self.stages[step] if "stage" in self.by and step is not None else None
        layer = self.layers.get(param) if "layer" in self.by else None
        key = (term, stage, param if "param" in self.by else None, layer, per_example)
        if key not in self.sums:
            rows = len(self.ids) if per_example else 1
            self.sums[key] = torch.zeros(rows, self.n_test, dtype=values.dtype)
            self.seen[key] = torch.zeros(rows, dtype=torch.bool)
        if per_example:
            slots = torch.from_numpy(np.searchsorted(self.ids, examples))
            self.sums[key].index_add_(0, slots, values)
            self.seen[key][slots] = True
        else:
            self.sums[key] += values

    def _table(self, term, values, step, param, examples, stage=None, layer=None
               ) -> pa.Table:
        values = owned(values)
        count = values.shape[0]
        columns = {
            "test_id": np.tile(np.arange(self.n_test, dtype=np.int32), count),
            "term": pa.array([term] * (count * self.n_test), pa.string()),
            "value": values.reshape(-1),
        }
        if "example" in self.by:
            columns["example_id"] = (pa.array(np.repeat(examples, self.n_test), pa.int64())
                                     if examples is not None
                                     else pa.nulls(count * self.n_test, pa.int64()))
        if "step" in self.by:
            columns["step"] = pa.array([step] * (count * self.n_test), pa.int64())
            stage = self.stages[step] if step is not None else None
            layer = self.layers.get(param)
        for axis, value in (("stage", stage), ("param", param), ("layer", layer)):
            if axis in self.by:
                columns[axis] = pa.array([value] * (count * self.n_test), pa.string())
        return pa.table(columns)

    def table(self) -> pa.Table:
        for (term, stage, param, layer, per_example), values in self.sums.items():
            seen = self.seen[(term, stage, param, layer, per_example)]
            ids = self.ids[seen.numpy()] if per_example else None
            self.parts.append(self._table(term, values[seen] if per_example else values, None,
                                          param, ids, stage, layer))
        keys = ["test_id", "term"] + [COLUMNS[a] for a in AXES if a in self.by]
        merged = pa.concat_tables(self.parts)
        return merged.group_by(keys, use_threads=False).aggregate([("value", "sum")]) \
            .rename_columns([*keys, "value"])


class StepData:
    """One step's data influences: per parameter when a param/layer axis is kept, else
    summed over parameters first (one row set per step, not one per tensor)."""

    def __init__(self, rows: InfluenceRows, step: int, ids: np.ndarray) -> None:
        self.rows, self.step, self.ids = rows, step, ids
        self.total: torch.Tensor | None = None

    def add(self, param: str, influence: torch.Tensor) -> None:
        if self.rows.per_param:
            self.rows.add("data", influence, self.step, param, self.ids)
        else:
            self.total = influence if self.total is None else self.total + influence

    def close(self) -> None:
        if self.total is not None:
            self.rows.add("data", self.total, self.step, None, self.ids)


def data_influence(run: Run, name: str, shape: tuple[int, ...], stored, flat_a: torch.Tensor,
                    alpha: float, dtype) -> torch.Tensor | None:
    """(examples, n_test): α c_{s,i} · A_s, exactly (Full, Factored) or estimated by ⟨Rc, RA⟩
    (Project)."""
    if stored is None:
        return None
    if isinstance(stored, FactorRows):  # Factored: exact, Σ_t l_tᵀ A r_t per example
        return alpha * stored.dot(flat_a)
    rows = stored.reshape(stored.shape[0], -1)
    flat_a = run.in_row_space(name, flat_a.reshape(flat_a.shape[0], *shape))
    return alpha * (rows @ flat_a.T)
