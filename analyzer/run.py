"""Read side of a recorded run: typed access to everything the recorder committed.

Only what the manifest lists is visible: steps beyond `committed_steps` and table parts the
manifest does not name (left by a crash) are ignored, so a reader never sees a half-written step.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
import zarr

from attrib.analyzer.guarded_store import GuardedStore
from attrib.analyzer.trajectory import Replay, TrajectoryError
from attrib.schemas import format as fmt
from attrib.schemas import projection
from attrib.schemas.chunk_layout import PlainLayout
from attrib.schemas.factored import FactorRows, densify

T = TypeVar("T")
MISSING_SHOWN = 8  # missing chunk keys missing_chunks lists before it stops looking
COUNT_SLACK = 1024  # steps or checkpoints a manifest may claim past its tables (see Run)
# how often verify and sql open a run being recorded again when a commit removed a file
SNAPSHOT_TRIES = 3
# rows a table may hold per example and step (TopK shifts: k per example and tensor group)
TABLE_ROWS_PER_EXAMPLE = 1 << 16


class Run:
    """A recorded run directory (format v1 or v2). Open with `attrib.open_run(path)`.

    v1 stores Δθ_s and the optimizer's per-step state; v2 stores the consumed gradients and
    checkpoints of θ with the whole optimizer state, and rebuilds the rest by replaying the
    recorded torch.optim optimizer (attrib.analyzer.trajectory). Both answer the same calls.
    """

    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise fmt.FormatError(f"{self.dir} is not a directory; pass a run directory")
        self.meta = fmt.read_json(self.dir / fmt.META_FILE)
        fmt.check_version(self.meta, self.dir / fmt.META_FILE)
        fmt.check_fields(self.meta, self.dir / fmt.META_FILE)
        self.manifest = fmt.read_json(self.dir / fmt.MANIFEST_FILE)
        fmt.check_fields(self.manifest, self.dir / fmt.MANIFEST_FILE)
        self._held: np.ndarray | None = None  # see _examples_held
        self._part_rows: dict[str, int] = {}  # table → rows of its parts (table_files)
        self._opened: dict[str, tuple[zarr.Array, PlainLayout | None]] = {}  # see _array
        store = fmt.inside(self.dir, fmt.STORE_DIR)
        self._store = GuardedStore(store)
        try:
            self.group = zarr.open_group(self._store, mode="r", zarr_format=3)
        except fmt.FormatError:
            raise
        except Exception as e:
            raise fmt.FormatError(f"{self.dir}: the Zarr store can't be opened ({e})") from e
        self._check_counts()

    def moved_on(self, error: BaseException) -> bool:
        """Whether `error` means the run committed again since it was opened (RunChanged, or
        a listed file gone while the manifest changed), not that the run is damaged."""
        return isinstance(error, fmt.RunChanged) or (fmt.vanished(error)
                                                     and self.changed_since_open())

    def changed_since_open(self) -> bool:
        """Whether the manifest on disk is no longer the one this Run read (a live run)."""
        try:
            return fmt.read_json(self.dir / fmt.MANIFEST_FILE) != self.manifest
        except fmt.FormatError:
            return True

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, status={self.status!r}, steps={self.n_steps})"

    # -- run-level facts ------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        """Committed optimizer steps: steps 0 … n_steps−1 are complete and readable."""
        return int(self.manifest["committed_steps"])

    @property
    def status(self) -> str:
        """The manifest's status, with `crashed` for a recording whose process has died."""
        status = self.manifest["status"]
        if status == fmt.Status.RECORDING.value and self._writer_alive() is False:
            return fmt.Status.CRASHED.value
        return status

    def writer_running(self) -> bool:
        """Whether a process on this machine (this one included) is recording into the run."""
        return self.manifest["status"] == fmt.Status.RECORDING.value and bool(self._writer_alive())

    def _writer_alive(self) -> bool | None:
        """Whether the recording process lives; None when it can't be told (another host)."""
        pid = self.manifest.get("pid")
        if self.manifest.get("host") != platform.node() or not isinstance(pid, int):
            return None
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @property
    def optimizer(self) -> dict[str, Any]:
        return self.meta["optimizer"]

    @property
    def format_version(self) -> int:
        return int(self.meta["format_version"])

    @cached_property
    def replay(self) -> Replay:
        """The optimizer replay that rebuilds a v2 run's θ, Δθ and state (one per Run: it
        keeps its position and last window, so streaming reads replay each step once)."""
        if self.format_version < 2:
            raise TypeError(f"{self.dir} is a format v1 run: it stores Δθ and needs no replay")
        return Replay(self)

    @cached_property
    def param_names(self) -> list[str]:
        return self.table("params").column("name").to_pylist()

    @cached_property
    def _keys(self) -> dict[str, str]:
        params = self.table("params")
        return dict(zip(params.column("name").to_pylist(), params.column("key").to_pylist()))

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name → shape, in the recorded order."""
        return dict(zip(self.param_names, map(tuple, self.params.column("shape").to_pylist())))

    def build_model(self, model_fn: Callable[[], torch.nn.Module],
                    dtype: torch.dtype) -> torch.nn.Module:
        """model_fn()'s model in `dtype`, checked against the recorded parameters: analyses
        swap the run's θ into it by name, so a factory of another architecture would fail deep
        inside a forward (or, with equal names, silently run another model's code)."""
        model = model_fn()
        built = {name: tuple(p.shape) for name, p in model.named_parameters()}
        missing = [n for n in self.param_names if n not in built]
        wrong = [f"{n!r} {built[n]} (recorded {self.param_shapes[n]})"
                 for n in self.param_names if n in built and built[n] != self.param_shapes[n]]
        if missing or wrong:
            raise ValueError(
                "model_fn() builds a model whose parameters differ from the run's: "
                + "; ".join(([f"missing {_listed(missing)}"] if missing else [])
                            + ([f"shapes {_listed(wrong)}"] if wrong else []))
                + f"; the run recorded {_listed(self.param_names)}. Pass the factory of the "
                "architecture that was trained (with the same configuration)")
        return model.to(dtype)

    @cached_property
    def trajectory_params(self) -> list[str]:
        """The tensors whose consumed gradients each step stores: every tensor, none
        (`record_grads=False`), or those `Recorder(trajectory=...)` chose."""
        if not self.meta.get("record_grads", True):
            return []
        chosen = self.meta.get("trajectory")
        return list(self.param_names) if chosen is None else list(chosen)

    def require_trajectory(self, what: str, params: list[str] | None = None) -> None:
        """Raise TrajectoryError, naming `what` needed it, unless the gradients of `params`
        (default: every tensor) were recorded."""
        needed = self.param_names if params is None else params
        stored = set(self.trajectory_params)
        missing = [n for n in needed if n not in stored]
        if not missing:
            return
        where = (f"θ and the optimizer state are kept only at its checkpoints (steps "
                 f"{_listed(self.checkpoint_steps)})")
        if not self.trajectory_params:
            raise TrajectoryError(f"{self.dir} was recorded with record_grads=False: {where}, "
                                  f"so {what} can't be computed; record with record_grads=True")
        raise TrajectoryError(
            f"{self.dir} stores the gradients of {len(self.trajectory_params)} of "
            f"{len(self.param_names)} tensors (Recorder(trajectory=...)), not of "
            f"{_listed(missing)}; {where}, so {what} can't be computed. Record every tensor's "
            "gradients (no trajectory=) for this")

    @cached_property
    def checkpoint_steps(self) -> list[int]:
        table = self.table("checkpoints").sort_by("index")
        steps = table.column("step").to_pylist()
        return steps[: int(self.manifest["n_checkpoints"])]

    # -- tables ---------------------------------------------------------------------------------
    def table_files(self, name: str) -> list[Path]:
        """The committed Parquet parts of a table, validated: inside the run, no symbolic
        links, and (read from each part's footer, once) no more rows than the run could have
        written, so a small part that decodes to 10^8 rows is refused before it is read."""
        if name not in fmt.TABLES:
            raise KeyError(f"unknown table {name!r}; tables are {', '.join(fmt.TABLES)}")
        files = [fmt.inside(self.dir, p) for p in self.manifest["tables"].get(name, [])]
        if name not in self._part_rows:
            rows = 0
            for file in files:
                with self.reading(f"a part of the {name} table",
                                  (OSError, pa.ArrowException)):
                    rows += pq.read_metadata(file).num_rows
            limit = ((self.n_steps + int(self.manifest["n_checkpoints"]) + 1)
                     * max(1, self.meta.get("examples_per_step") or 1) * TABLE_ROWS_PER_EXAMPLE
                     + (1 << 20))
            if rows > limit:
                raise fmt.FormatError(
                    f"{self.dir}: the {name} table's parts hold {rows} rows, more than a run "
                    f"of {self.n_steps} steps can write ({limit}); the run is damaged or was "
                    "edited")
            self._part_rows[name] = rows
        return files

    def _check_counts(self) -> None:
        """The manifest's counts against what the run holds, before anything loops over them
        (a manifest edited to 10^12 steps would otherwise have verify list 10^11 slabs). A
        sound run has a steps-table row per committed step and at most a checkpoint per step
        and θ_0 (resumes add one each); only a gross excess is refused here, so that verify
        still opens a run missing a few rows and says which."""
        self.table_files("steps")
        rows = self._part_rows["steps"]
        if self.n_steps > 2 * rows + COUNT_SLACK:
            raise fmt.FormatError(f"{self.dir}: the manifest commits {self.n_steps} steps, the "
                                  f"steps table holds {rows} rows; the run is damaged or was "
                                  "edited")
        limit = 2 * (self.n_steps + 1) + len(self.manifest.get("resumes") or []) + COUNT_SLACK
        if int(self.manifest["n_checkpoints"]) > limit:
            raise fmt.FormatError(f"{self.dir}: the manifest lists "
                                  f"{self.manifest['n_checkpoints']} checkpoints for "
                                  f"{self.n_steps} steps; the run is damaged or was edited")

    def table(self, name: str) -> pa.Table:
        """A whole table as Arrow, with the schema declared in schemas.format."""
        schema = fmt.TABLES[name]
        files = self.table_files(name)
        if not files:
            return schema.empty_table()
        with self.reading(f"a part of the {name} table", (OSError, pa.ArrowException)):
            return pa.concat_tables([pq.read_table(f, schema=schema) for f in files])

    def table_where(self, name: str, step: int) -> pa.Table:
        """The rows of a step-keyed table for one step (Parquet statistics skip the rest)."""
        files = self.table_files(name)
        if not files:
            return fmt.TABLES[name].empty_table()
        with self.reading(f"a part of the {name} table", (OSError, pa.ArrowException)):
            dataset = ds.dataset([str(f) for f in files], schema=fmt.TABLES[name],
                                 format="parquet")
            return dataset.to_table(filter=ds.field("step") == step)

    @contextmanager
    def reading(self, what: str, errors: tuple[type[BaseException], ...] = (Exception,)):
        """A read of `what` that fails with `errors` (a missing or damaged part, a chunk
        failing its checksum) is a FormatError naming it, not a library's internal error, or
        RunChanged when the file is gone because the run committed again; KeyError,
        IndexError and MemoryError pass unchanged."""
        try:
            yield
        except (KeyError, IndexError, MemoryError, fmt.FormatError):  # ours name the file
            raise
        except errors as e:
            if self.moved_on(e):
                raise fmt.RunChanged(f"{self.dir}: {what} is gone: the run was committed again "
                                     "since it was opened (it is being recorded, or was just "
                                     "closed); open it again to read its new state") from e
            raise fmt.FormatError(f"{self.dir}: {what} can't be read ({fmt.reason(e)}); the "
                                  "run is damaged, `attrib verify` lists what else is") from e

    @property
    def steps(self) -> pa.Table:
        return self.table("steps")

    @property
    def examples(self) -> pa.Table:
        return self.table("examples")

    @property
    def stages(self) -> pa.Table:
        return self.table("stages")

    @property
    def params(self) -> pa.Table:
        return self.table("params")

    @property
    def shifts(self) -> pa.Table:
        """TopK outlier shifts: (step, epoch, example_id, param, flat_index, row, col, shift,
        grad); see schemas/FORMAT.md."""
        return self.table("shifts")

    # -- dense data -----------------------------------------------------------------------------
    def committed_rows(self, path: str) -> int | None:
        """How many rows along axis 0 of a stored array are committed: the checkpoints or
        steps the manifest lists; None for arrays without that axis (initial state)."""
        if (path.startswith((f"{fmt.CHECKPOINTS}/", f"{fmt.CHECKPOINT_STATE}/"))
                or path == fmt.CHECKPOINT_STATE_PRESENT):
            return int(self.manifest["n_checkpoints"])
        if path.startswith(f"{fmt.INITIAL_STATE}/"):
            return None
        return self.n_steps

    def arrays(self) -> list[tuple[str, zarr.Array]]:
        """(path, array) for every array in the store, their codecs checked (metadata only:
        nothing is decoded)."""
        try:
            members = list(self.group.members(max_depth=None))
        except Exception as e:  # unreadable metadata, an unknown codec
            raise fmt.FormatError(f"{self.dir}: the store's arrays can't be opened ({e})") from e
        found = [(path, node) for path, node in members if isinstance(node, zarr.Array)]
        for path, node in found:
            fmt.check_codecs(node.metadata.to_dict().get("codecs", []), f"{self.dir}: {path!r}")
        return found

    def _array(self, path: str) -> zarr.Array:
        return self._opened_array(path)[0]

    def _opened_array(self, path: str) -> tuple[zarr.Array, PlainLayout | None]:
        """The array at `path`, checked, and its plain chunk layout (None: zarr decodes it);
        opened once per Run, whose committed rows are fixed when it opens."""
        if path not in self._opened:
            array = self._open_array(path)
            self._opened[path] = array, PlainLayout.of(array)
        return self._opened[path]

    def _open_array(self, path: str) -> zarr.Array:
        try:
            node = self.group[path]
        except KeyError:
            raise KeyError(f"{self.dir}: no array {path!r} in the store") from None
        except Exception as e:  # unreadable metadata, an unknown codec
            raise fmt.FormatError(f"{self.dir}: the array {path!r} can't be opened ({e})") from e
        if not isinstance(node, zarr.Array):
            raise fmt.FormatError(f"{self.dir}: {path!r} is a group, expected an array")
        fmt.check_codecs(node.metadata.to_dict().get("codecs", []), f"{self.dir}: {path!r}")
        self._check_shape(path, node)
        return node

    def _check_shape(self, path: str, array: zarr.Array) -> None:
        """An array's declared shape against what the run declares: at least the committed
        rows, and rows no larger than every parameter's values for each example a step holds
        (a zarr.json edited to 10^12 entries would otherwise ask for terabytes)."""
        committed = self.committed_rows(path)
        if committed is not None and (array.ndim == 0 or array.shape[0] < committed):
            raise fmt.FormatError(f"{self.dir}: {path!r} declares shape {array.shape}, fewer "
                                  f"than the {committed} rows the manifest commits; the run "
                                  "is damaged or was edited")
        entries = math.prod(array.shape[1:] if committed is not None else array.shape)
        limit = max(1, self.meta.get("examples_per_step") or 1) * max(self._total_entries,
                                                                       1 << 20)
        if entries > limit:
            raise fmt.FormatError(f"{self.dir}: {path!r} declares {entries} entries per row, "
                                  f"more than the run's parameters hold for its examples "
                                  f"({limit}); the run is damaged or was edited")

    @cached_property
    def _total_entries(self) -> int:
        return sum(math.prod(shape) for shape in self.param_shapes.values())

    def _key(self, param: str) -> str:
        try:
            return self._keys[param]
        except KeyError:
            raise KeyError(f"no parameter {param!r}; the run has {self.param_names}") from None

    def _step_range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_steps if stop is None else stop
        if not 0 <= start <= stop <= self.n_steps:
            raise IndexError(
                f"steps [{start}, {stop}) are outside the {self.n_steps} committed steps of "
                f"{self.dir} (status {self.status})"
            )
        return start, stop

    def _steps_of(self, path: str, start: int, stop: int | None) -> np.ndarray:
        start, stop = self._step_range(start, stop)
        return self._read(path, slice(start, stop))

    def _read(self, path: str, where: slice | int) -> np.ndarray:
        """Values of a stored array; a chunk that fails to decode (its checksum, a truncated
        file) or is missing is a FormatError naming the array and rows, not a codec's internal
        error or the fill value."""
        array, layout = self._opened_array(path)
        rows = f"rows {where.start}–{where.stop}" if isinstance(where, slice) else f"row {where}"
        first, stop = ((where.start or 0, where.stop) if isinstance(where, slice)
                       else (where, where + 1))
        missing = self.missing_chunks(path, array, first, stop)
        if missing:
            raise fmt.FormatError(f"{self.dir}: {path} {rows} can't be read: its chunk "
                                  f"{missing[0]!r} is missing (of {len(missing)} or more); the run "
                                  "is damaged, `attrib verify` lists what else is")
        with self.reading(f"{path} {rows}"):
            if (layout is None or first < 0 or (stop is not None and stop < 0)
                    or (isinstance(where, slice) and where.step not in (None, 1))):
                return array[where]  # what the direct read does not take: zarr's semantics
            rows_held = array.shape[0]
            first, stop = min(first, rows_held), min(rows_held if stop is None else stop,
                                                     rows_held)
            values = self._store.read_rows(layout, tuple(array.shape[1:]), first,
                                           max(first, stop))
            return values if isinstance(where, slice) else values[0]

    def missing_chunks(self, path: str, array: zarr.Array, start: int = 0,
                       stop: int | None = None) -> list[str]:
        """Keys of chunks holding rows [start, stop) (of the committed ones) that must exist
        and don't: zarr would read them as the fill value. Every chunk of a trajectory or
        checkpoint array must exist; of a per-example array, the first chunk along the example
        axis up to the most examples a step of that block holds (a step whose per-example rows
        were dropped, or rows past a step's examples, read as the fill value by design). At
        most MISSING_SHOWN keys are listed: one is enough to call the run damaged. Runs
        without `every_chunk_stored` (recorded before it) may lack all-fill chunks: none is
        required there."""
        if not self.meta.get("every_chunk_stored"):  # earlier runs: all-fill chunks may be absent
            return []
        committed = self.committed_rows(path)
        if array.ndim == 0:
            indices: Iterable[tuple[int, ...]] = [()]
        else:  # chunk lengths are ≥ 1: GuardedStore refuses any other zarr.json
            rows = array.shape[0] if committed is None else committed
            stop = rows if stop is None else min(stop, rows)
            depth = array.chunks[0]
            inner = [-(-n // c) for n, c in zip(array.shape[1:], array.chunks[1:])]
            held = self._examples_held() if fmt.per_example(path) else None

            def grid(i: int) -> Iterable[tuple[int, ...]]:
                """Chunk indices of row block i that must exist (for a per-example array:
                along the example axis, up to the most examples a step of the block holds)."""
                counts = inner if held is None else [
                    -(-int(held[i * depth: (i + 1) * depth].max(initial=0)) // array.chunks[1]),
                    *inner[1:]]
                return itertools.product(*map(range, counts))

            indices = ((i, *rest) for i in range(start // depth, -(-stop // depth))
                       for rest in grid(i))
        folder = self.dir / fmt.STORE_DIR / array.path
        missing = (key for key in map(array.metadata.encode_chunk_key, indices)
                   if not (folder / key).exists())
        return list(itertools.islice(missing, MISSING_SHOWN))

    def _examples_held(self) -> np.ndarray:
        """Per committed step: how many rows of the per-example arrays hold examples (0 where
        the step had none or they were dropped under backpressure)."""
        if self._held is None:
            steps = self.table("steps")
            order = steps["step"].to_numpy()
            held = np.zeros(self.n_steps, dtype=np.int64)
            count = steps["n_examples"].fill_null(0).to_numpy()
            dropped = steps["examples_dropped"].fill_null(False).to_numpy(zero_copy_only=False)
            keep = (order >= 0) & (order < self.n_steps)
            held[order[keep]] = np.where(dropped[keep], 0, count[keep])
            self._held = held
        return self._held

    def deltas(self, param: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Δθ_s for steps [start, stop) of one parameter: shape (steps, *param_shape)."""
        if self.format_version >= 2:
            self._key(param)
            self.require_trajectory(f"Δθ of {param!r}", [param])
            start, stop = self._step_range(start, stop)
            return self.replay.window(start, stop).deltas(param)
        return torch.from_numpy(self._steps_of(f"{fmt.DELTAS}/{self._key(param)}", start, stop))

    def grads(self, param: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The gradient the optimizer consumed (after clipping) for steps [start, stop)."""
        self._key(param)
        self.require_trajectory(f"the gradients of {param!r}", [param])
        values = torch.from_numpy(self._steps_of(f"{fmt.GRADS}/{self._key(param)}", start,
                                                 stop))
        if self.meta.get("grad_dtype") == "bfloat16":  # stored as its bits
            return values.view(torch.bfloat16).float()
        return values

    @property
    def exact_gradients(self) -> bool:
        """Whether the stored gradients are the ones training consumed, bit for bit (not
        rounded by grad_dtype): only then does a replay repeat training exactly."""
        return self.meta.get("grad_dtype", "float32") == "float32"

    def state(self, param: str, name: str, start: int = 0, stop: int | None = None):
        """Per-step optimizer state after each step (e.g. Adam's exp_avg_sq, AMSGrad's
        running max under that name)."""
        if name not in self.meta["step_state"]:
            recorded = self.meta["step_state"]
            raise KeyError(f"{name!r} is not recorded per step; recorded: {recorded}")
        if self.format_version >= 2:
            self._key(param)
            self.require_trajectory(f"the optimizer state of {param!r} per step", [param])
            start, stop = self._step_range(start, stop)
            return self.replay.window(start, stop).state[param][name]
        return torch.from_numpy(
            self._steps_of(f"{fmt.STATE}/{self._key(param)}/{name}", start, stop))

    def hparams(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Per-step, per-group hyperparameters: name → array (steps, groups); NaN = n/a."""
        return {h: self._steps_of(f"{fmt.HPARAMS}/{h}", start, stop)
                for h in self.meta["hparam_names"]}

    def clip_factors(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._steps_of(fmt.CLIP_FACTOR, start, stop)

    def step_counts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The optimizer's own step count t_s per (step, parameter index)."""
        return self._steps_of(fmt.STEP_COUNT, start, stop)

    def active(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Whether each parameter had a gradient at each step, (steps, parameters)."""
        return self._steps_of(fmt.ACTIVE, start, stop)

    def initial_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state present before step 0 (the carry-in of a resumed optimizer)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        if self.format_version >= 2:  # checkpoint 0 holds the optimizer's state at step 0
            if not self.checkpoint_steps:
                return out
            state, present = self.checkpoint_state(0)
            return {n: state[n] for n, held in zip(self.param_names, present) if held}
        if fmt.INITIAL_STATE not in self.group:
            return out
        for name in self.param_names:
            key = self._key(name)
            node = self.group[fmt.INITIAL_STATE].get(key)
            if node is not None:
                out[name] = {s: torch.from_numpy(self._read(f"{fmt.INITIAL_STATE}/{key}/{s}",
                                                            slice(None)))
                             for s, _ in node.arrays()}
        return out

    @property
    def capture(self) -> dict[str, dict]:
        """Per parameter name, what was captured per example: full / factored / project / topk
        settings."""
        return self.meta.get("capture", {})

    @property
    def captured(self) -> list[str]:
        """Parameters with stored per-example rows: exact (Full, Factored) or projected."""
        return [n for n, c in self.capture.items() if self.exact_rows(n) or "project" in c]

    def exact_rows(self, param: str) -> bool:
        """Whether `param`'s stored rows are c_{s,i} itself (Full, or Factored densified)."""
        kind = self.capture.get(param, {})
        return "full" in kind or "factored" in kind

    def factored_rows(self, param: str) -> bool:
        """Whether `param`'s rows are stored as factors only (no Full array beside them)."""
        kind = self.capture.get(param, {})
        return "factored" in kind and "full" not in kind

    def in_row_space(self, param: str, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors (n, *shape) in the space of `param`'s stored rows, flattened: R v with the
        run's own projection (its split included) for projected rows, v for exact ones."""
        if not self.exact_rows(param):
            p, shape = self.capture[param]["project"], self.param_shapes[param]
            vectors = projection.project(vectors, shape, p["kind"], p["k"], p["seed"], param,
                                         projection.recorded_split(p, shape))
        return vectors.reshape(vectors.shape[0], -1)

    def contributions(self, step: int, param: str | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example contributions c_{s,i} of one step: (example ids, {param: rows}).

        Rows follow the examples in the order they were declared (micro-batch, then slot):
        the parameter's shape for Full and Factored capture, k values for Project capture.
        """
        self._step_range(step, step + 1)
        if step in self.dropped_steps():
            raise KeyError(f"step {step}'s per-example data was dropped: the disk was behind and "
                           "the run was recorded with backpressure='drop_examples'. Use another "
                           "step (steps.examples_dropped is false), or record with the default "
                           "backpressure='block'")
        examples = self.table_where("examples", step).sort_by("row")
        ids = torch.tensor(examples.column("example_id").to_numpy())
        names = [param] if param is not None else self.captured
        return ids, {name: self.contribution_rows(name, step, step + 1)[0, : len(ids)]
                     for name in names}

    @cached_property
    def _dropped(self) -> frozenset[int]:
        steps = self.steps  # read with the declared schema: null where a part predates it
        flags = pc.fill_null(steps.column("examples_dropped"), False)
        return frozenset(steps.filter(flags).column("step").to_pylist())

    def dropped_steps(self) -> frozenset[int]:
        """Steps whose per-example rows were dropped under backpressure (they read as zeros)."""
        return self._dropped

    def contribution_rows(self, param: str, start: int = 0, stop: int | None = None
                          ) -> torch.Tensor:
        """Stored per-example rows of steps [start, stop): (steps, examples_per_step, …),
        rows beyond a step's examples are zero; one read per chunk, for streaming analyses.
        Factored rows are densified here; `factors` reads them as stored."""
        kind = self.capture.get(param, {})
        if self.factored_rows(param):
            left, right = self.factors(param, start, stop)
            return densify(left, right, self.param_shapes[param])
        group = fmt.CONTRIB if "full" in kind else fmt.PROJ if "project" in kind else None
        if group is None:
            raise KeyError(f"{param!r} has no stored per-example contributions")
        return torch.from_numpy(self._steps_of(f"{group}/{self._key(param)}", start, stop))

    def example_rows(self, param: str, start: int = 0, stop: int | None = None
                     ) -> torch.Tensor | FactorRows:
        """contribution_rows for analyses: Factored rows stay factored (FactorRows.dot takes
        the inner products a densified block would, at a fraction of the memory)."""
        if self.factored_rows(param):
            return FactorRows(*self.factors(param, start, stop), self.param_shapes[param])
        return self.contribution_rows(param, start, stop)

    def factors(self, param: str, start: int = 0, stop: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """A Factored tensor's rows of steps [start, stop) as stored: (left, right), each
        (steps, examples_per_step, tokens, ·), with c_{s,i} = Σ_t left[s,i,t] ⊗ right[s,i,t]
        reshaped to the tensor's shape (unused token slots are zero)."""
        if "factored" not in self.capture.get(param, {}):
            raise KeyError(f"{param!r} was not recorded with Factored capture (its rows: "
                           f"{sorted(self.capture.get(param, {})) or 'none'})")
        key = self._key(param)
        return tuple(torch.from_numpy(self._steps_of(f"{group}/{key}", start, stop))
                     for group in (fmt.FACTOR_LEFT, fmt.FACTOR_RIGHT))

    def residual_norms(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """‖G_s − Σ_i c_{s,i}‖ / ‖G_s‖ per (step, parameter); NaN where nothing is captured
        or the recorder did not check the step (Recorder(check_every=...))."""
        return self._steps_of(fmt.RESIDUAL_NORM, start, stop)

    def checkpoint(self, index: int) -> dict[str, torch.Tensor]:
        """θ at the `index`-th checkpoint (its step is checkpoint_steps[index])."""
        if not 0 <= index < len(self.checkpoint_steps):
            raise IndexError(f"checkpoint {index} doesn't exist; the run has "
                             f"{len(self.checkpoint_steps)} committed checkpoints")
        return {n: torch.from_numpy(self._read(f"{fmt.CHECKPOINTS}/{self._key(n)}", index))
                for n in self.param_names}

    def checkpoint_state(self, index: int) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                    np.ndarray]:
        """The optimizer's state at the `index`-th checkpoint (v2): {param: {name: tensor}}
        and, per parameter, whether the optimizer held state for it (else it reads as zeros)."""
        if self.format_version < 2:
            raise KeyError(f"{self.dir} is a format v1 run: its checkpoints hold θ only")
        if not 0 <= index < len(self.checkpoint_steps):
            raise IndexError(f"checkpoint {index} doesn't exist; the run has "
                             f"{len(self.checkpoint_steps)} committed checkpoints")
        names = self.meta["checkpoint_state"]
        state = {}
        for n in self.param_names:
            stacked = torch.from_numpy(self._read(f"{fmt.CHECKPOINT_STATE}/{self._key(n)}",
                                                  index))
            state[n] = dict(zip(names, stacked))
        return state, self._read(fmt.CHECKPOINT_STATE_PRESENT, index)

    def fingerprints(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(steps, 2, parameters): Σ θ ⊙ r per tensor of θ_s before step s and of θ_{s+1}
        after it, as training saw them (v2; see attrib.recorder.fingerprint)."""
        if self.format_version < 2:
            raise KeyError(f"{self.dir} is a format v1 run: it has no fingerprints")
        return self._steps_of(fmt.FINGERPRINT, start, stop)

    def reconstruct(self, step: int) -> dict[str, torch.Tensor]:
        """θ_step. v2: replayed from the nearest checkpoint with the recorded gradients (bit for
        bit the trained θ where the replay runs the same kernels); v1: the nearest checkpoint
        plus the recorded deltas, in the recorder's own order of float additions."""
        self._step_range(0, step)
        if self.format_version >= 2:
            self.replay.seek(step)
            return self.replay.theta()
        index = int(np.searchsorted(self.checkpoint_steps, step, side="right")) - 1
        start = self.checkpoint_steps[index]
        theta = self.checkpoint(index)
        if start == step:
            return theta
        for name in self.param_names:
            deltas = self.deltas(name, start, step)
            for delta in deltas:
                theta[name] += delta
        return theta

    # -- summary --------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The numbers `attrib info` prints, as a plain dict."""
        from attrib.analyzer.summary import run_summary

        return run_summary(self)


def open_run(path: str | Path) -> Run:
    """Open a recorded run for reading."""
    return Run(path)


def read_snapshot(path: str | Path, read: Callable[[Run], T]) -> T:
    """read(run) on the run as of one commit: a run being recorded may remove a file its
    manifest listed when a later commit compacts or rewrites tables (RunChanged); the run is
    then opened again, a few times."""
    for _ in range(SNAPSHOT_TRIES - 1):
        try:
            return read(open_run(path))
        except fmt.RunChanged:
            continue
    return read(open_run(path))


def _listed(items: list, shown: int = 8) -> str:
    """A list for a message: its first `shown` items, then how many more."""
    head = ", ".join(map(str, items[:shown]))
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")
