"""Background writer: commits blocks of steps off the training thread, from a buffer pool.

The training thread writes each step's tensors straight into a row of a preallocated block
buffer (no allocation, no page faults on the hot path); a full block goes to this thread, which
compresses and writes it, commits, and hands the buffer back to the pool. With a fixed number
of buffers, a slow disk makes training wait for a free one (backpressure) instead of growing
memory: at most `n_buffers` blocks are ever held.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from attrib.recorder import direct_io, distributed
from attrib.recorder.shifts import StepShifts
from attrib.recorder.store import ArraySpec, RunStore
from attrib.recorder.tokens import FirstSeen, TokenBatch, tokens_table
from attrib.schemas import format as fmt


class RecordingError(RuntimeError):
    """Recording failed; training may continue (non-strict) but the run is incomplete."""


@dataclass
class StepRecord:
    """A step's relational data; its tensors live in a row of the block buffers."""

    step: int
    row: dict[str, Any]  # steps-table row; tensor values are converted off the hot path
    examples: list[np.ndarray] = field(default_factory=list)  # example ids per micro-batch
    example_values: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per micro-batch
    checkpoint: dict[str, torch.Tensor] | None = None  # θ_{step+1} when a checkpoint follows
    shifts: list[StepShifts] | None = None  # TopK rows of this step (tables made here)
    rng: list[list[tuple[str, bytes]]] = field(default_factory=list)  # per forward: states
    tokens: list[TokenBatch] = field(default_factory=list)  # micro-batches given tokens=


@dataclass
class Block:
    """Up to `steps_per_chunk` consecutive steps: one (T, *shape) buffer per stored array."""

    buffers: dict[str, torch.Tensor]
    records: list[StepRecord] = field(default_factory=list)
    ready: Any = None  # a torch.cuda.Event the device-to-host copies must reach first
    capacity: int = 0  # steps it takes: the buffers' depth, less after a mid-chunk resume
    lean: bool = False  # aggregate arrays only: per-example rows dropped under backpressure
    pool: int = 0  # the buffer pool it came from (see BackgroundWriter.start_pool)

    @property
    def full(self) -> bool:
        return len(self.records) == self.capacity


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value


_CLOSE = object()


@dataclass
class WidenExamples:
    """A writer-queue item: per-example arrays take `rows` examples per step from here on."""

    rows: int


class BackgroundWriter:
    """Owns the RunStore once started; the training thread talks to it through
    `acquire`/`submit`/`add_checkpoint`/`close`."""

    def __init__(self, store: RunStore, vocabulary: np.ndarray | None = None,
                 ranks: distributed.Ranks | None = None) -> None:
        self.store = store
        self.ranks = ranks
        self._primary = ranks is None or ranks.primary
        self._rank_parts: set[str] = set()  # other ranks' parts already in the manifest
        self.stopped: str | None = None  # why this rank (not 0) stopped recording
        self._dropped: list[list[int]] = []  # [first, last] step ranges of lean blocks (rank ≠ 0)
        self._publishing = threading.Lock()  # both the writer and training threads publish
        self.vocabulary = vocabulary
        self._tokens_seen = FirstSeen()
        self.error: BaseException | None = None
        self.error_trace: str | None = None
        self.committed_steps = 0
        self._queue: queue.Queue = queue.Queue()  # bounded by the pool: ≤ n_buffers blocks
        self._free: queue.Queue = queue.Queue()
        self._lean: queue.Queue | None = None  # aggregate-only buffers (drop_examples policy)
        self._pool = 0  # bumped by start_pool: buffers of an earlier pool are not reused
        self._pool_lock = threading.Lock()
        self._checkpoints: list[tuple[int, int]] = []  # (index, step)
        self._stage_runs: list[list[Any]] = []  # [stage, start, end, n_steps]
        self._thread = threading.Thread(target=self._loop, name="attrib-writer", daemon=True)
        self._thread.start()

    # -- training-thread side ----------------------------------------------------------------
    def start_pool(self, specs: list[ArraySpec], n_buffers: int, pin_memory: bool,
                   lean: list[ArraySpec] | None = None) -> None:
        """Up to `n_buffers` block buffers, each allocated when first needed (zeroed, so its
        pages are touched once, then): a writer that keeps up never needs the last ones. With
        `lean` specs, as many aggregate-only buffers for steps whose per-example rows drop."""
        depth = self.store.steps_per_chunk

        def buffers(of: list[ArraySpec]) -> dict[str, torch.Tensor]:
            return {s.path: direct_io.aligned_zeros((depth, *s.step_shape),
                                                    getattr(torch, s.dtype), pin_memory)
                    for s in of}

        with self._pool_lock:  # a block of the old pool still being written is dropped after
            self._pool += 1
            self._new_buffers = lambda: buffers(specs)
            self._unallocated = max(1, n_buffers)
            self._free = queue.Queue()
            self._lean = queue.Queue() if lean is not None else None
            if self._lean is not None:
                for _ in range(max(1, n_buffers)):
                    self._lean.put(buffers(lean))

    def _check(self) -> None:
        if self.error is not None:
            raise RecordingError(f"the background writer failed: {self.error!r}")

    def acquire(self, first_step: int) -> Block:
        """An empty block; waits while every buffer is being written (backpressure).

        A block ends at a chunk boundary, so each write fills whole chunks even when the
        run was resumed from a step in the middle of one."""
        self._check()
        depth = self.store.steps_per_chunk
        capacity = depth - first_step % depth
        if self._free.empty() and self._unallocated:
            self._unallocated -= 1
            self._free.put(self._new_buffers())
        if self._lean is not None:
            try:
                return Block(self._free.get_nowait(), capacity=capacity, pool=self._pool)
            except queue.Empty:  # every full buffer is in flight: the disk is behind
                return Block(self._lean.get(), capacity=capacity, lean=True, pool=self._pool)
        return Block(self._free.get(), capacity=capacity, pool=self._pool)

    def _release(self, block: Block) -> None:
        with self._pool_lock:
            if block.pool == self._pool:
                (self._lean if block.lean else self._free).put(block.buffers)

    def widen_examples(self, rows: int) -> None:
        """Per-example arrays hold `rows` examples per step from the next submitted block on
        (the caller then starts a pool of buffers that wide)."""
        self._check()
        self._queue.put(WidenExamples(rows))

    def resume(self, step: int, checkpoints: list[tuple[int, int]],
               stage_runs: list[list[Any]], seen_examples: np.ndarray) -> None:
        """Continue a recorded run at `step` (before any submit): its checkpoints and stage
        runs as recorded, cut back to the step with everything after it."""
        self._checkpoints = list(checkpoints)
        self._stage_runs = [list(run) for run in stage_runs]
        self._tokens_seen.seen = np.unique(seen_examples)
        self.cut(step)

    def submit(self, block: Block) -> None:
        """Hand a filled (or final, partial) block over for writing and committing."""
        self._check()
        if block.records:
            if any(b.is_pinned() for b in block.buffers.values()):
                block.ready = torch.cuda.Event()
                block.ready.record()
            self._queue.put(block)
        else:
            self._release(block)

    def add_checkpoint(self, step: int, params: dict[str, torch.Tensor]) -> None:
        """Commit a checkpoint (θ and the optimizer state) at `step`, which must directly
        follow every submitted step."""
        self._check()
        self._queue.put((step, params))

    def close(self) -> None:
        """Write everything submitted and stop the thread."""
        self._queue.put(_CLOSE)
        self._thread.join()

    # -- writer-thread side ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            if self.error is None:  # after a failure keep draining so producers never block
                try:
                    self._write(item)
                except BaseException as e:  # reported to the training thread, never raised there
                    self.error, self.error_trace = e, traceback.format_exc()
                    self.tell_primary(repr(e))
            if isinstance(item, Block):
                self._release(item)

    def _write(self, item: Block | tuple[int, dict[str, torch.Tensor]] | WidenExamples
               ) -> None:
        """Write one item; a block that fails part-way is cut back out (single process), so
        the manifest never counts steps whose tables were not all written."""
        before = self.committed_steps
        try:
            self._write_item(item)
        except BaseException:
            if self.ranks is None and self.committed_steps != before:
                self.committed_steps = before
                with contextlib.suppress(Exception):  # the disk may be what failed
                    self.cut(before)
            raise

    def _write_item(self, item: Block | tuple[int, dict[str, torch.Tensor]] | WidenExamples
                    ) -> None:
        steps: pa.Table | None = None
        if isinstance(item, WidenExamples):
            self.store.widen_examples(item.rows)
            return
        if isinstance(item, Block):
            steps = self._write_block(item)
        else:
            step, params = item
            if step != self.committed_steps:
                raise RecordingError(f"checkpoint of step {step} arrived after step "
                                     f"{self.committed_steps - 1}")
            self._write_checkpoint(step, params)
        if not self._primary:  # rank 0 commits once every rank's marker reaches this block
            self.publish()
            return
        dropped: list[list[int]] = []
        try:  # every rank has written the block: their drops are flagged too
            if self.ranks is not None:
                dropped = [r for m in self.gather_ranks() for r in m.get("dropped", [])]
        finally:  # even when a rank stopped: the cut at close keeps what every rank wrote
            if steps is not None:
                self.store.write_table_part("steps", _flag_dropped(steps, dropped),
                                            self.committed_steps - steps.num_rows,
                                            self.committed_steps - 1)
        self._commit_tables()
        self.store.commit(self.committed_steps)

    def publish(self, closed: bool = False) -> None:
        """A rank other than 0: its marker, with the steps written and why it stopped. Under a
        lock, so a marker read before `stopped` was set never lands after one that says it."""
        with self._publishing:
            distributed.publish(self.store.dir, self.ranks.rank, self.committed_steps,
                                self.store.manifest["tables"], closed, self.stopped,
                                self._dropped)

    def tell_primary(self, error: str) -> None:
        """A rank other than 0 stopped recording: say so now, so rank 0 stops waiting for it
        (and fails its recording with this reason) instead of timing out."""
        if self._primary:
            return
        self.stopped = self.stopped or error  # every later marker keeps saying so
        with contextlib.suppress(OSError):  # the disk failed: rank 0 times out, with a message
            self.publish()

    def gather_ranks(self, closed: bool = False) -> list[dict]:
        """Rank 0: wait for every rank to reach the committed steps (and to close, at the
        end), then list their new table parts in the manifest; returns their markers."""
        markers = distributed.wait_for(self.store.dir, self.ranks.world, self.committed_steps,
                                       closed)
        for document in markers:
            for table, parts in document["tables"].items():
                for part in parts:
                    if part not in self._rank_parts and \
                            fmt.part_fields(part)[1] < self.committed_steps:
                        self._rank_parts.add(part)
                        if table == "tokens":
                            self._list_first_tokens(part)
                        else:
                            self.store.manifest["tables"][table].append(part)
        return markers

    def _list_first_tokens(self, part: str) -> None:
        """Rank 0: list another rank's tokens part with only the examples no rank wrote
        before (each rank knows only the examples it saw itself), rewritten when needed."""
        path = self.store.dir / part
        rows = pq.read_table(path, schema=fmt.TOKENS)
        fresh = self._tokens_seen.take(rows.column("example_id").to_numpy())
        if fresh.all():
            self.store.manifest["tables"]["tokens"].append(part)
            return
        if fresh.any():
            _, first, last = fmt.part_fields(part)
            self.store.write_table_part("tokens", rows.filter(pa.array(fresh)), first, last)
        path.unlink()  # never listed: no reader can have it open

    def cut(self, steps: int) -> None:
        """Keep only steps [0, steps) (a resume from an earlier step or after a crash; what
        every rank wrote, when one stopped early), on disk and in the writer's state."""
        self._checkpoints = [(i, s) for i, s in self._checkpoints if s <= steps]
        self._stage_runs = [[stage, first, min(last, steps - 1), min(last, steps - 1) - first + 1]
                            for stage, first, last, _ in self._stage_runs if first < steps]
        self.store.truncate(steps, len(self._checkpoints),
                            whole_run_tables(self._checkpoints, self._stage_runs))
        self.committed_steps = steps

    def _write_block(self, block: Block) -> pa.Table | None:
        """Write a block's arrays and table parts; rank 0 gets its steps-table rows back, to
        write once every rank's drops for the block are known."""
        if block.ready is not None:
            block.ready.synchronize()
        started = time.perf_counter()
        records = block.records
        first, n = records[0].step, len(records)
        if first != self.committed_steps:
            raise RecordingError(f"step {first} arrived, expected step {self.committed_steps}")
        shifts = _shift_tables(records)  # before any write: a failure there loses nothing
        written = self.store.append_steps(first, {p: b[:n].numpy()
                                                  for p, b in block.buffers.items()})
        for record in records:
            if record.checkpoint is not None:
                self._write_checkpoint(record.step + 1, record.checkpoint)
        rows = [_to_python(r.row) for r in records]
        for row in rows:
            self._track_stage(row)
        offset = self.store.example_rows.start if self.store.example_rows is not None else 0
        self.store.write_table_part("examples", _examples_table(records, offset), first,
                                    first + n - 1)
        if shifts:
            self.store.write_table_part("shifts", pa.concat_tables(shifts), first, first + n - 1)
        if any(r.rng for r in records):
            self.store.write_table_part("rng", _rng_table(records, self.ranks), first,
                                        first + n - 1)
        new_tokens = self._tokens_seen.select([b for r in records for b in r.tokens])
        if new_tokens is not None:
            self.store.write_table_part("tokens", tokens_table(new_tokens, self.vocabulary),
                                        first, first + n - 1)
        self.committed_steps = first + n
        if self._primary:  # the steps table is rank 0's
            return self._steps_rows(rows, n, written, block.lean, started)
        if block.lean:
            self._note_dropped(first, first + n - 1)
        return None

    def _note_dropped(self, first: int, last: int) -> None:
        """A rank other than 0 dropped these steps' rows: its marker says so until rank 0 has
        committed past them (the manifest's count), so the list stays as short as the lag."""
        committed = fmt.read_json(self.store.dir / fmt.MANIFEST_FILE)["committed_steps"]
        self._dropped = [r for r in self._dropped if r[1] >= committed]
        if self._dropped and self._dropped[-1][1] == first - 1:
            self._dropped[-1][1] = last
        else:
            self._dropped.append([first, last])

    def _steps_rows(self, rows: list[dict[str, Any]], n: int, written: int, lean: bool,
                    started: float) -> pa.Table:
        per_step = round(written / n)
        seconds = (time.perf_counter() - started) / n  # the Parquet write is not counted
        for row in rows:
            row["bytes_written"], row["write_seconds"] = per_step, seconds
            row["examples_dropped"] = lean
        return pa.Table.from_pylist(rows, schema=fmt.STEPS)

    def _write_checkpoint(self, step: int, params: dict[str, torch.Tensor]) -> None:
        index = self.store.append_checkpoint({k: v.numpy() for k, v in params.items()})
        self._checkpoints.append((index, step))

    def _track_stage(self, row: dict[str, Any]) -> None:
        last = self._stage_runs[-1] if self._stage_runs else None
        if last is not None and last[0] == row["stage"] and last[2] == row["step"] - 1:
            last[2], last[3] = row["step"], last[3] + 1
        else:
            self._stage_runs.append([row["stage"], row["step"], row["step"], 1])

    def _commit_tables(self) -> None:
        """Rewrite the small whole-run tables so they match what this commit makes visible."""
        for table, data in whole_run_tables(self._checkpoints, self._stage_runs).items():
            self.store.replace_table(table, data)


def _flag_dropped(steps: pa.Table, dropped: list[list[int]]) -> pa.Table:
    """examples_dropped is true where any rank dropped the step's rows."""
    if not dropped:
        return steps
    listed = pa.array([s for first, last in dropped for s in range(first, last + 1)],
                      steps.schema.field("step").type)
    flags = pc.or_(steps.column("examples_dropped"),
                   pc.is_in(steps.column("step"), value_set=listed))
    return steps.set_column(steps.schema.get_field_index("examples_dropped"),
                            steps.schema.field("examples_dropped"), flags)


def whole_run_tables(checkpoints: list[tuple[int, int]], stage_runs: list[list[Any]]
                     ) -> dict[str, pa.Table]:
    """The checkpoints and stages tables, rewritten whole at each commit."""
    index, step = zip(*checkpoints) if checkpoints else ((), ())
    stages = [dict(zip(fmt.STAGES.names, run)) for run in stage_runs]
    return {"checkpoints": pa.table({"index": list(index), "step": list(step)},
                                    schema=fmt.CHECKPOINTS_TABLE),
            "stages": pa.Table.from_pylist(stages, schema=fmt.STAGES)}


def _examples_table(records: list[StepRecord], first_row: int = 0) -> pa.Table:
    """Long table (step, micro_batch, slot, row, example_id, loss, f), built with array ops;
    rows count from `first_row` (a rank's first row in a distributed run)."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in fmt.EXAMPLES.names}
    present: dict[str, list[np.ndarray]] = {name: [] for name in fmt.EXAMPLE_VALUES}
    for record in records:
        offset = first_row
        for micro_batch, ids in enumerate(record.examples):
            values = record.example_values[micro_batch]
            for name in fmt.EXAMPLE_VALUES:
                value = values.get(name)
                columns[name].append(np.zeros(len(ids)) if value is None
                                     else value.double().numpy())
                present[name].append(np.full(len(ids), value is not None))
            columns["step"].append(np.full(len(ids), record.step, dtype=np.int64))
            columns["micro_batch"].append(np.full(len(ids), micro_batch, dtype=np.int32))
            columns["slot"].append(np.arange(len(ids), dtype=np.int32))
            columns["row"].append(np.arange(offset, offset + len(ids), dtype=np.int32))
            columns["example_id"].append(ids.astype(np.int64, copy=False))
            offset += len(ids)
    arrays = {name: np.concatenate(parts) if parts else np.array([], f.type.to_pandas_dtype())
              for (name, parts), f in zip(columns.items(), fmt.EXAMPLES)}
    masks = {name: ~np.concatenate(parts) if parts else None for name, parts in present.items()}
    return pa.table({name: pa.array(values, mask=masks.get(name))
                     for name, values in arrays.items()}, schema=fmt.EXAMPLES)


def _rng_table(records: list[StepRecord], ranks: distributed.Ranks | None) -> pa.Table:
    rank = ranks.rank if ranks is not None else 0
    rows = [{"step": r.step, "forward": k, "device": device, "state": state, "rank": rank}
            for r in records for k, states in enumerate(r.rng) for device, state in states]
    return pa.Table.from_pylist(rows, schema=fmt.RNG)


def _shift_tables(records: list[StepRecord]) -> list[pa.Table]:
    """The block's TopK rows. A step whose rows can't be tabled is left out with a warning
    (the step's trajectory and other rows are still written): it used to fail at the step,
    on the training thread, where the recorder's failure policy stopped recording."""
    tables = []
    for record in records:
        for part in record.shifts or ():
            try:
                table = part.table()
            except Exception as e:
                warnings.warn(f"attrib: the TopK shifts of step {record.step} could not be "
                              f"written ({e!r}); that step has no shifts rows", stacklevel=2)
                continue
            if table.num_rows:
                tables.append(table)
    return tables
