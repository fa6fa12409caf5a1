"""Background writer: turns per-step records into committed blocks, off the training thread.

The training thread only enqueues host copies of tensors; this thread stacks them into blocks
of `steps_per_chunk` steps, compresses and writes them, then commits. The queue is bounded, so a
slow disk slows training down (backpressure) instead of growing memory without bound.
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from attrib.recorder.store import RunStore
from attrib.schemas import format as fmt


class RecordingError(RuntimeError):
    """Recording failed; training may continue (non-strict) but the run is incomplete."""


@dataclass
class StepRecord:
    """Everything one optimizer step contributes to the run, already copied off the device."""

    step: int
    arrays: dict[str, Any]  # step-indexed array path -> this step's value (tensor or ndarray)
    row: dict[str, Any]  # steps-table row; tensor values are converted here, off the hot path
    examples: list[np.ndarray] = field(default_factory=list)  # example ids per micro-batch
    checkpoint: dict[str, torch.Tensor] | None = None  # θ_{step+1} when a checkpoint follows
    ready: Any = None  # a torch.cuda.Event the device-to-host copies must reach first


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return np.asarray(value)


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value


_CLOSE = object()


class BackgroundWriter:
    """Owns the RunStore once started; the training thread talks to it through `submit`."""

    def __init__(self, store: RunStore, queue_size: int) -> None:
        self.store = store
        self.error: BaseException | None = None
        self.error_trace: str | None = None
        self.committed_steps = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._block: list[StepRecord] = []
        self._checkpoints: list[tuple[int, int]] = []  # (index, step)
        self._stage_runs: list[list[Any]] = []  # [stage, start, end, n_steps]
        self._thread = threading.Thread(target=self._loop, name="attrib-writer", daemon=True)
        self._thread.start()

    # -- training-thread side ----------------------------------------------------------------
    def submit(self, record: StepRecord) -> None:
        """Hand a step over; blocks while the queue is full (backpressure)."""
        if self.error is not None:
            raise RecordingError(f"the background writer failed: {self.error!r}")
        self._queue.put(record)

    def add_checkpoint(self, step: int, params: dict[str, torch.Tensor]) -> None:
        """Queue θ at `step` for a checkpoint committed with the next block."""
        self.submit(StepRecord(step=step, arrays={}, row={}, checkpoint=params))

    def close(self) -> None:
        """Flush every queued step and stop the thread."""
        self._queue.put(_CLOSE)
        self._thread.join()

    # -- writer-thread side ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                self._guarded(self._flush)
                return
            if self.error is None:  # after a failure keep draining so producers never block
                self._guarded(self._accept, item)

    def _guarded(self, fn, *args) -> None:
        if self.error is not None:
            return
        try:
            fn(*args)
        except BaseException as e:  # reported to the training thread, never raised there
            self.error, self.error_trace = e, traceback.format_exc()

    def _accept(self, record: StepRecord) -> None:
        if record.ready is not None:
            record.ready.synchronize()
        if not record.arrays:  # a bare checkpoint: θ_0 at attach, θ_N at close
            self._flush()  # the steps before it must be visible no later than it is
            if record.step != self.committed_steps:
                raise RecordingError(f"checkpoint of step {record.step} arrived after step "
                                     f"{self.committed_steps - 1}")
            self._write_checkpoint(record.step, record.checkpoint)
            self._commit_tables()
            self.store.commit(self.committed_steps)
            return
        expected = self.committed_steps + len(self._block)
        if record.step != expected:
            raise RecordingError(f"step {record.step} arrived, expected step {expected}")
        self._block.append(record)
        if len(self._block) == self.store.steps_per_chunk:
            self._flush()

    def _flush(self) -> None:
        if not self._block:
            return
        block, self._block = self._block, []
        first = block[0].step
        self.store.append_steps(
            first, {p: np.stack([_to_numpy(r.arrays[p]) for r in block])
                    for p in self.store.step_arrays}
        )
        for record in block:
            if record.checkpoint is not None:
                self._write_checkpoint(record.step + 1, record.checkpoint)
        dense_bytes = self.store.block_bytes(first)
        rows = [_to_python(r.row) for r in block]
        for row in rows:
            self._track_stage(row)
        self.store.write_table_part("examples", _examples_table(block), first, block[-1].step)
        per_step = round(dense_bytes / len(block))
        for row in rows:
            row["bytes_written"] = per_step
        self.store.write_table_part(
            "steps", pa.Table.from_pylist(rows, schema=fmt.STEPS), first, block[-1].step
        )
        self.committed_steps = block[-1].step + 1
        self._commit_tables()
        self.store.commit(self.committed_steps)

    def _write_checkpoint(self, step: int, params: dict[str, torch.Tensor]) -> None:
        index = self.store.append_checkpoint({k: _to_numpy(v) for k, v in params.items()})
        self._checkpoints.append((index, step))

    def _track_stage(self, row: dict[str, Any]) -> None:
        last = self._stage_runs[-1] if self._stage_runs else None
        if last is not None and last[0] == row["stage"] and last[2] == row["step"] - 1:
            last[2], last[3] = row["step"], last[3] + 1
        else:
            self._stage_runs.append([row["stage"], row["step"], row["step"], 1])

    def _commit_tables(self) -> None:
        """Rewrite the small whole-run tables so they match what this commit makes visible."""
        index, step = zip(*self._checkpoints) if self._checkpoints else ((), ())
        self.store.replace_table(
            "checkpoints", pa.table({"index": list(index), "step": list(step)},
                                    schema=fmt.CHECKPOINTS_TABLE)
        )
        stages = [dict(zip(fmt.STAGES.names, run)) for run in self._stage_runs]
        self.store.replace_table("stages", pa.Table.from_pylist(stages, schema=fmt.STAGES))


def _examples_table(block: list[StepRecord]) -> pa.Table:
    """Long table (step, micro_batch, slot, example_id) built with array ops, not row loops."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in fmt.EXAMPLES.names}
    for record in block:
        for micro_batch, ids in enumerate(record.examples):
            columns["step"].append(np.full(len(ids), record.step, dtype=np.int64))
            columns["micro_batch"].append(np.full(len(ids), micro_batch, dtype=np.int32))
            columns["slot"].append(np.arange(len(ids), dtype=np.int32))
            columns["example_id"].append(ids.astype(np.int64, copy=False))
    return pa.table(
        {name: np.concatenate(parts) if parts else np.array([], dtype=field.type.to_pandas_dtype())
         for (name, parts), field in zip(columns.items(), fmt.EXAMPLES)},
        schema=fmt.EXAMPLES,
    )
