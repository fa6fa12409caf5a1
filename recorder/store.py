"""Creating and appending to a run directory (format v2): Zarr arrays, Parquet parts, manifest.

Every write here is followed, not preceded, by the manifest commit that makes it visible: a
reader only trusts `committed_steps` and the table parts the manifest lists, so a process that
dies between two commits leaves at worst unreferenced files behind, never a half-visible step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import functools
import itertools
import math
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec
from zarr.core.sync import sync

from attrib.recorder import array_docs
from attrib.recorder.chunks import ChunkWriter, put_all
from attrib.schemas import format as fmt

CHUNK_TARGET_BYTES = 4 << 20  # uncompressed bytes per chunk (steps of a tensor, or a slice)
BLOCK_TARGET_BYTES = 64 << 20  # uncompressed bytes per committed block (see block_steps)
MAX_STEPS_PER_CHUNK = 64
STEP_TABLES = ("steps", "examples", "shifts", "rng")  # tables with a row per (step, ...)
PRESIZED = 1 << 40  # steps of a distributed run's per-example arrays (no chunk exists yet)
RANK_SEQUENCES = 10**8  # part sequence numbers per rank
# rows an array is created with: it grows by doubling (see _grow) and is cut to its committed
# rows at close, so resizes (a zarr.json rewrite per array) are rare
INITIAL_ROWS = 256
# chunk files named c.<step chunk>.<i>... side by side in their array's folder (zarr's default
# chunk key encoding with the "." separator): with "/" every block of steps made a folder per
# array (two per matrix: c/<i>/0/), which on the development VM cost as much CPU as writing the
# chunks (~0.5 ms per folder, ~200 per block of a small transformer; 2026-12-01)
CHUNK_KEYS = {"name": "default", "separator": "."}
WRITE_THREADS = 2  # threads writing chunks (see chunks.put_all)
RETIRE_SECONDS = 60.0  # how long a file no commit lists is kept for readers of older commits
COMPACT_ROWS = 1 << 22  # rows per merged Parquet file of a table at close (a step range each)


@dataclass(frozen=True)
class Codec:
    """Lossless Blosc settings for every dense array (zstd + bit shuffle by default);
    cname="none" stores chunks uncompressed. `checksum` ends each chunk with its CRC32C, so a
    truncated or edited chunk fails to read instead of decoding to wrong numbers."""

    cname: str = "zstd"
    clevel: int = 3
    shuffle: str = "bitshuffle"
    checksum: bool = True

    def compressor(self) -> list:
        codecs: list = [] if self.cname == "none" else [
            BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=BloscShuffle[self.shuffle])]
        return [*codecs, Crc32cCodec()] if self.checksum else codecs


@dataclass(frozen=True)
class Codecs:
    """The codec of each kind of array. By default the trajectory (gradients, checkpoints,
    per-step scalars) is stored uncompressed with its CRC32C: float gradients compress only
    ~1.15x with zstd at a third of the writer's speed (benchmarks/writer_throughput.py), and
    so are projected rows (random projections: 1.02x with zstd, which doubled the writer's
    time per GPT step), and so are factored rows (activations and output gradients: 1.12x on
    the MLP, where zstd more than doubled the writer's time), while exact per-example rows
    (many zeros) compress 2-3x and take Blosc lz4 with bit shuffle: on the MLP's Full rows
    2.37x at ~850 MB/s of writer CPU against zstd-3's 2.47x at ~110 MB/s, on the GPT's 1.15x
    either way at 3-20x the speed (2026-12-01); zstd-3 had been the Factored MLP's largest
    writer cost, its bias rows compressing 1.3x at ~50 MB/s. `Recorder(codec=...)` sets one
    codec for everything."""

    trajectory: Codec = Codec("none")
    per_example: Codec = Codec("lz4", 5)
    projected: Codec = Codec("none")

    @classmethod
    def of(cls, codec: Codec | None) -> Codecs:
        return cls() if codec is None else cls(codec, codec, codec)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Codecs:
        """As recorded in attrib.json (v1 runs recorded one codec for everything; earlier v2
        runs one for all per-example rows)."""
        stored = meta["codec"]
        if "trajectory" not in stored:
            return cls.of(Codec(**stored))
        per_example = Codec(**stored["per_example"])
        return cls(Codec(**stored["trajectory"]), per_example,
                   Codec(**stored["projected"]) if "projected" in stored else per_example)

    def describe(self) -> dict[str, dict[str, Any]]:
        return {"trajectory": dataclasses.asdict(self.trajectory),
                "per_example": dataclasses.asdict(self.per_example),
                "projected": dataclasses.asdict(self.projected)}

    def for_path(self, path: str) -> Codec:
        if path.startswith((f"{fmt.PROJ}/", f"{fmt.FACTOR_LEFT}/", f"{fmt.FACTOR_RIGHT}/")):
            return self.projected
        return self.per_example if fmt.per_example(path) else self.trajectory


@dataclass(frozen=True)
class ArraySpec:
    """A step-indexed array: one value of `step_shape` per recorded step."""

    path: str
    step_shape: tuple[int, ...]
    dtype: str
    fill_value: Any = 0

    @property
    def step_bytes(self) -> int:
        return math.prod(self.step_shape) * np.dtype(self.dtype).itemsize


def block_steps(step_bytes: int) -> int:
    """Steps per block (the chunk depth of the step axis every array's chunks divide): as many
    as fit in BLOCK_TARGET_BYTES, at most MAX_STEPS_PER_CHUNK, rounded down to 2^k or 3·2^k.
    Each array's chunks hold a divisor of it, so a prime count (the 29 of 64 MiB over the
    Factored MLP's 2.2 MiB per step) left every array larger than 4 MiB / 29 a chunk per step:
    861 chunk files per 400 MLP steps for 6 gradients, each new file ~1 ms of CPU on ext4 here."""
    limit = max(1, min(MAX_STEPS_PER_CHUNK, BLOCK_TARGET_BYTES // max(1, step_bytes)))
    return max(n for n in (2 ** k * m for k in range(limit.bit_length()) for m in (1, 3))
               if n <= limit)


def chunk_shape(shape: tuple[int, ...], itemsize: int, block: int,
                row_block: int | None = None) -> tuple[int, ...]:
    """Chunks of a step array written in blocks of `block` steps: as many steps as fit in
    CHUNK_TARGET_BYTES (a divisor of `block`, so blocks fill whole chunks), the tensor split
    along dim 0 when one step is larger. Shallow chunks for big tensors keep the padding of a
    run's last, partial chunk small: stored uncompressed, it costs its empty steps."""
    step_bytes = math.prod(shape) * itemsize
    depth = max(d for d in range(1, block + 1)
                if block % d == 0 and (d == 1 or d * step_bytes <= CHUNK_TARGET_BYTES))
    return (depth, *inner_chunks(shape, itemsize, depth, row_block))


def inner_chunks(shape: tuple[int, ...], itemsize: int, depth: int,
                 row_block: int | None = None) -> tuple[int, ...]:
    """Chunk shape for `depth` stacked values of `shape`, split along dim 0 to stay small;
    with `row_block`, a divisor of it, so each block of rows (a rank's examples) has its own
    chunks."""
    if not shape:
        return ()
    row_bytes = math.prod(shape[1:]) * itemsize * depth
    rows = max(1, min(shape[0], CHUNK_TARGET_BYTES // max(1, row_bytes)))
    rows = -(-shape[0] // -(-shape[0] // rows))  # as many chunks, evenly filled: the edge
    # chunk is stored padded to the full chunk shape, which uncompressed costs its empty rows
    if row_block is not None:
        rows = max(d for d in range(1, min(rows, row_block) + 1) if row_block % d == 0)
    return (rows, *shape[1:])


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunStore:
    """Write side of one run directory. Not thread-safe: one writer thread owns it."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], checkpoint: list[ArraySpec],
                 codecs: Codecs) -> None:
        self._setup(run_dir, meta, codecs)
        run_dir.mkdir(parents=True, exist_ok=True)
        fmt.write_json_atomic(run_dir / fmt.META_FILE, meta)
        self.group = zarr.open_group(run_dir / fmt.STORE_DIR, mode="w", zarr_format=3)
        self.checkpoint_arrays = self._create_all(  # one row per checkpoint: θ, optimizer state
            [(spec, INITIAL_ROWS, 1, None) for spec in checkpoint])
        self.manifest: dict[str, Any] = {
            "status": fmt.Status.RECORDING.value,
            "committed_steps": 0,
            "n_checkpoints": 0,
            "tables": {name: [] for name in fmt.TABLES},
            "error": None,
            "warnings": [],
            "resumes": [],
        }
        self._claim()
        self.commit(0)  # the run opens (as `recording`, or `crashed`) from the first moment

    def _setup(self, run_dir: Path, meta: dict[str, Any], codecs: Codecs) -> None:
        self.dir = run_dir
        self.meta = meta
        self.steps_per_chunk = meta.get("steps_per_chunk") or 0  # set with the step arrays
        self.step_arrays: dict[str, zarr.Array] = {}
        self._chunk_writers: dict[str, ChunkWriter | None] = {}
        self.codecs = codecs
        self._sequence = 0
        self._pending_checkpoints = 0  # appended since the last commit
        self._obsolete: list[str] = []  # parts to delete once a commit no longer lists them
        self._retired: list[tuple[float, str]] = []  # (when, part) unlisted, kept for readers
        self.example_rows: slice | None = None  # this rank's rows of per-example arrays

    def _claim(self) -> None:
        """Name this process as the run's writer (readers call a run whose writer died
        `crashed`)."""
        self.manifest.update(pid=os.getpid(), host=platform.node(), updated=now_iso())

    @classmethod
    def reopen(cls, run_dir: Path, meta: dict[str, Any], manifest: dict[str, Any],
               checkpoint_paths: list[str]) -> RunStore:
        """Open an existing run to append to it (`Recorder(resume=...)`), with its own codec."""
        store = cls.__new__(cls)
        store._setup(run_dir, meta, Codecs.from_meta(meta))
        store.manifest = manifest
        store.manifest.setdefault("resumes", [])
        store.group = zarr.open_group(run_dir / fmt.STORE_DIR, mode="r+", zarr_format=3)
        store.checkpoint_arrays = {p: array_docs.writable(store.group[p])
                                   for p in checkpoint_paths}
        store._sequence = _last_sequence(run_dir, 0)
        store._claim()
        return store

    @classmethod
    def join(cls, run_dir: Path, rank: int) -> RunStore:
        """Another rank's side of a distributed run that rank 0 created: it writes only its
        per-example rows and its own table parts (listed in its marker, not the manifest)."""
        meta = fmt.read_json(run_dir / fmt.META_FILE)
        store = cls.__new__(cls)
        store._setup(run_dir, meta, Codecs.from_meta(meta))
        store.manifest = {"tables": {name: [] for name in fmt.TABLES}}
        store.group = zarr.open_group(run_dir / fmt.STORE_DIR, mode="r+", zarr_format=3)
        store.checkpoint_arrays = {}
        store._sequence = _last_sequence(run_dir, rank)
        return store

    def open_step_arrays(self, specs: list[ArraySpec]) -> None:
        """Open the step arrays of a resumed run, refusing any whose layout differs."""
        for spec in specs:
            try:
                array = self.group[spec.path]
            except KeyError:
                raise fmt.FormatError(f"{self.dir}: the run has no array {spec.path!r}; the "
                                      "recorder is set up differently from the recorded run"
                                      ) from None
            if tuple(array.shape[1:]) != spec.step_shape or array.dtype != np.dtype(spec.dtype):
                raise fmt.FormatError(
                    f"{self.dir}: {spec.path!r} holds {array.dtype} values of shape "
                    f"{tuple(array.shape[1:])} per step; the recorder would write {spec.dtype} "
                    f"of shape {spec.step_shape}")
            self.step_arrays[spec.path] = array_docs.writable(array)

    def create_step_arrays(self, specs: list[ArraySpec], steps_per_chunk: int,
                           meta: dict[str, Any], rank_rows: int | None = None) -> None:
        """Create the step-indexed arrays once the first step has shown their sizes.

        `rank_rows` (distributed runs): each rank's examples per step. Per-example arrays are
        then chunked so no chunk spans two ranks, and created PRESIZED steps long, because
        other ranks write into them without resizing (readers trust `committed_steps`)."""
        self.steps_per_chunk = steps_per_chunk
        self.step_arrays = self._create_all(
            [(spec, PRESIZED if rank_rows and fmt.per_example(spec.path) else INITIAL_ROWS,
              steps_per_chunk, rank_rows if fmt.per_example(spec.path) else None)
             for spec in specs])
        self.meta.update(meta)
        fmt.write_json_atomic(self.dir / fmt.META_FILE, self.meta)

    def finish_widening(self) -> None:
        """A widening cut short (some arrays resized, attrib.json not yet rewritten): finish
        it at the widest array's width, so a resume sizes its buffers to the arrays."""
        arrays = {path: node for path, node in self.group.members(max_depth=None)
                  if isinstance(node, zarr.Array) and fmt.per_example(path)}
        width = max((a.shape[1] for a in arrays.values()), default=0)
        if width > (self.meta.get("examples_per_step") or 0):
            self._widen(arrays, width)

    def widen_examples(self, rows: int) -> None:
        """Per-example arrays take `rows` examples per step (single process: a later batch
        larger than the first). Their example axis grows; the rows earlier steps did not fill
        read as the fill value, as a short batch's do, and the examples table says which
        rows hold examples."""
        self._widen(self.step_arrays, rows)

    def _widen(self, arrays: dict[str, zarr.Array], rows: int) -> None:
        """Give the per-example ones of `arrays` `rows` examples per step, then say so in
        attrib.json (in that order: a kill in between is what finish_widening repairs)."""
        array_docs.resize([(a, (a.shape[0], rows, *a.shape[2:])) for path, a in arrays.items()
                           if fmt.per_example(path) and a.shape[1] < rows])
        self.meta["examples_per_step"] = rows
        fmt.write_json_atomic(self.dir / fmt.META_FILE, self.meta)

    def _create_all(self, arrays: list[tuple[ArraySpec, int, int, int | None]]
                    ) -> dict[str, zarr.Array]:
        """Create arrays (spec, rows, chunk depth, row block), their documents written in one
        pass (see array_docs)."""
        created = array_docs.create_arrays(self.group.store_path, [dict(
            name=spec.path, shape=(rows, *spec.step_shape), dtype=spec.dtype,
            chunks=chunk_shape(spec.step_shape, np.dtype(spec.dtype).itemsize, depth,
                               row_block),
            fill_value=spec.fill_value,
            chunk_key_encoding=CHUNK_KEYS,
            compressors=self.codecs.for_path(spec.path).compressor())
            for spec, rows, depth, row_block in arrays])
        return {spec.path: a for (spec, *_), a in zip(arrays, created)}

    # -- dense data -------------------------------------------------------------------------
    def append_steps(self, first_step: int, values: dict[str, np.ndarray]) -> int:
        """Write a block of consecutive steps; arrays without values in `values` (dropped
        per-example rows) grow with the others and read as their fill value there. Returns
        the bytes its chunks take on disk."""
        if not values:  # a rank other than 0 that captures nothing per example
            return 0
        n = next(iter(values.values())).shape[0]
        steps = slice(first_step, first_step + n)
        return self._write([(p, a, (steps, self.example_rows)
                      if self.example_rows is not None and fmt.per_example(p) else steps,
                      values.get(p))
                     for p, a in self.step_arrays.items()], first_step + n)

    def append_checkpoint(self, values: dict[str, np.ndarray]) -> int:
        """Append a checkpoint (array path → value: θ and the optimizer's state); returns its
        checkpoint index."""
        index = self.manifest["n_checkpoints"] + self._pending_checkpoints
        self._write([(p, a, slice(index, index + 1), values[p][None])
                     for p, a in self.checkpoint_arrays.items()], index + 1)
        self._pending_checkpoints += 1
        return index

    def _write(self, writes: list[tuple[str, zarr.Array, Any, np.ndarray | None]],
               stop: int) -> int:
        """Grow the arrays to hold `stop` rows, then write each value: whole chunks directly
        (recorder/chunks.py), anything else through zarr. Returns the bytes of the chunks
        written (those zarr wrote: of every chunk of their rows, as found on disk)."""
        _grow([a for _, a, _, _ in writes], stop)  # dropped rows too: they read as fill
        rest, jobs = [], []
        for path, array, where, value in writes:
            if value is None:
                continue
            if path not in self._chunk_writers:
                self._chunk_writers[path] = ChunkWriter.for_array(array, self.dir / fmt.STORE_DIR)
            writer = self._chunk_writers[path]
            chunks = (writer.encode(where.start, value)
                      if isinstance(where, slice) and writer is not None else None)
            if chunks is None:
                rest.append((array, where, value))
            else:
                jobs += chunks
        written = put_all(jobs, _pool()) if jobs else 0
        if rest:
            _gather([a.async_array.setitem(w, v) for a, w, v in rest])
            written += sum(_chunk_bytes(a, self.dir / fmt.STORE_DIR / a.path, w)
                           for a, w, _ in rest)
        return written

    def trim(self) -> None:
        """Cut the arrays to their committed rows: growth runs ahead of the steps (see _grow),
        and a closed run's arrays should say exactly how many steps they hold."""
        rows = [(a, self.manifest["committed_steps"]) for a in self.step_arrays.values()]
        rows += [(a, self.manifest["n_checkpoints"]) for a in self.checkpoint_arrays.values()]
        self._cut([(a, n) for a, n in rows if n < a.shape[0] < PRESIZED])
        # a checkpoint appended but never committed (the writer failed between the two) was
        # just cut: the final commit must not count it
        self._pending_checkpoints = 0

    def _cut(self, cuts: list[tuple[zarr.Array, int]]) -> None:
        """Shorten arrays to their rows, deleting the chunk files wholly past them. zarr's own
        resize visits every chunk key of the cut region, written or not: seconds for arrays
        grown ahead (see _grow); only the chunk files (or folders) that exist are looked at
        here."""
        array_docs.resize([(a, (n, *a.shape[1:])) for a, n in cuts])
        for array, rows in cuts:
            first = -(-rows // array.chunks[0])  # the first chunk index wholly past `rows`
            for entry in _chunks_from(self.dir / fmt.STORE_DIR / array.path, first):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    # -- tables -----------------------------------------------------------------------------
    def write_table_part(self, table: str, data: pa.Table, first: int, last: int) -> int:
        """Write an immutable Parquet part (listed in the manifest at the next commit)."""
        relative = self._write_part(table, data, first, last)
        self.manifest["tables"][table].append(relative)
        return (self.dir / relative).stat().st_size

    def _write_part(self, table: str, data: pa.Table, first: int, last: int) -> str:
        self._sequence += 1
        relative = fmt.table_part_name(table, first, last, self._sequence)
        path = self.dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data.cast(fmt.TABLES[table]), path, compression="zstd")
        return relative

    def replace_table(self, table: str, data: pa.Table) -> None:
        """Swap a small table whole: new part now, the old parts are deleted after commit."""
        old = list(self.manifest["tables"][table])
        self.manifest["tables"][table] = []
        self.write_table_part(table, data, 0, 0)
        self._obsolete.extend(old)

    # -- commits ----------------------------------------------------------------------------
    def commit(self, committed_steps: int, status: fmt.Status | None = None) -> None:
        """Make everything written so far visible to readers, atomically."""
        self.manifest["committed_steps"] = committed_steps
        self.manifest["n_checkpoints"] += self._pending_checkpoints
        self._pending_checkpoints = 0
        if status is not None:
            self.manifest["status"] = status.value
        self.manifest["updated"] = now_iso()
        fmt.write_json_atomic(self.dir / fmt.MANIFEST_FILE, self.manifest)
        self._retire(final=status is not None and status is not fmt.Status.RECORDING)

    def _retire(self, final: bool) -> None:
        """Delete the parts earlier commits stopped listing, once RETIRE_SECONDS have passed:
        a reader that read an earlier manifest (`attrib info`, `sql`, `verify` while the run
        is recorded) still finds every file it lists. The final commit deletes them all."""
        now = time.monotonic()
        self._retired += [(now, part) for part in self._obsolete]
        self._obsolete = []
        fresh = [] if final else [(t, p) for t, p in self._retired if now - t < RETIRE_SECONDS]
        for _, part in self._retired[: len(self._retired) - len(fresh)]:  # oldest first
            (self.dir / part).unlink(missing_ok=True)
        self._retired = fresh

    def truncate(self, steps: int, n_checkpoints: int, whole: dict[str, pa.Table]) -> None:
        """Keep steps [0, steps) and the first `n_checkpoints` checkpoints, drop the rest
        (resuming from an earlier step, or from a crash that left uncommitted data behind).

        Step-keyed parts are cut at `steps`, `whole` replaces the whole-run tables (stages,
        checkpoints), and the manifest commits before any array shrinks or file goes, so a
        crash in between leaves a run whose manifest lists only what still exists.
        """
        for table in (*STEP_TABLES, "tokens"):
            kept = []
            for part in self.manifest["tables"][table]:
                first, last = _part_steps([part])
                if last < steps or (table == "tokens" and first < steps):
                    kept.append(part)  # token rows are per example, harmless to keep
                    continue
                self._obsolete.append(part)
                if first < steps:
                    rows = pq.read_table(self.dir / part, schema=fmt.TABLES[table])
                    kept.append(self._write_part(table, rows.filter(pc.field("step") < steps),
                                                 first, steps - 1))
            self.manifest["tables"][table] = kept
        for table, data in whole.items():
            self.replace_table(table, data)
        self.manifest["n_checkpoints"] = n_checkpoints
        self._pending_checkpoints = 0  # any past the cut are cut with it
        self.commit(steps)
        for array in self.step_arrays.values():
            if steps < array.shape[0] < PRESIZED:  # presized arrays keep their length
                # clear the rest of the chunk the cut falls in: rows that grow back into it
                # unwritten (dropped per-example rows) must read as the fill value, not as
                # the discarded steps
                end = min(array.shape[0], -(-steps // array.chunks[0]) * array.chunks[0])
                if end > steps:
                    array[steps:end] = array.fill_value
        self._cut([(a, steps) for a in self.step_arrays.values() if steps < a.shape[0] < PRESIZED]
                  + [(a, n_checkpoints) for a in self.checkpoint_arrays.values()
                     if a.shape[0] > n_checkpoints])
        listed = {p for parts in self.manifest["tables"].values() for p in parts}
        for file in (self.dir / fmt.TABLES_DIR).glob("*/part-*.parquet"):
            if file.relative_to(self.dir).as_posix() not in listed:
                file.unlink()  # left unreferenced by a crash or by the cut above

    def compact(self, table: str, rows_per_file: int = COMPACT_ROWS) -> None:
        """Merge a table's parts into files of about `rows_per_file` rows, so queries open a
        few files, not hundreds, and memory holds one merged file at a time. Parts are in step
        order, so each file covers a step range that Parquet statistics let readers skip."""
        parts = self.manifest["tables"][table]
        if len(parts) <= 1:
            return
        groups: list[list[str]] = [[]]
        rows = 0
        for part in parts:
            n = pq.ParquetFile(self.dir / part).metadata.num_rows
            if groups[-1] and rows + n > rows_per_file:
                groups.append([])
                rows = 0
            groups[-1].append(part)
            rows += n
        self.manifest["tables"][table] = []
        for group in groups:
            merged = pa.concat_tables([pq.read_table(self.dir / p) for p in group])
            steps = _part_steps(group)
            self.write_table_part(table, merged, steps[0], steps[1])
        self._obsolete.extend(parts)


def _last_sequence(run_dir: Path, rank: int) -> int:
    """The last part number `rank` used: each rank numbers its parts in its own range, so
    names never collide across ranks, and a resumed rank goes on past every part it wrote
    (a crash may have left one unreferenced, which must not be overwritten)."""
    first = rank * RANK_SEQUENCES
    used = (fmt.part_fields(f.name)[0]
            for f in (run_dir / fmt.TABLES_DIR).glob("*/part-*.parquet"))
    return max((n for n in used if first <= n < first + RANK_SEQUENCES), default=first)


def _part_steps(parts: list[str]) -> tuple[int, int]:
    """First and last step covered by consecutive parts (from their names)."""
    return fmt.part_fields(parts[0])[1], fmt.part_fields(parts[-1])[2]


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """The chunk-writing threads, shared by every run of the process (never more than two
    writing at once on these machines' two cores)."""
    return ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="attrib-chunks")


def _grow(arrays: list[zarr.Array], stop: int) -> None:
    """Make each array at least `stop` rows long, doubling it when it must grow: rewriting every
    array's zarr.json for each block cost ~1 ms per array (30 ms per block of a small
    transformer), while doubling rewrites it O(log steps) times. Rows past the committed ones
    are never read (readers trust the manifest) and `trim` cuts them at close."""
    short = [a for a in arrays if a.shape[0] < stop]
    if short:
        array_docs.resize([(a, (max(stop, 2 * a.shape[0]), *a.shape[1:])) for a in short])


def _gather(coroutines: list) -> None:
    """Run zarr's coroutines concurrently in its event loop: one round trip for all arrays."""
    async def run() -> None:
        await asyncio.gather(*coroutines)

    sync(run())


def _chunks_from(folder: Path, first: int) -> list[Path]:
    """An array's chunk files (or, in the "/" layout of earlier runs, chunk folders) whose
    step-chunk index is `first` or later: c.<i>.… files or c/<i> folders; also the temporary
    files a write through zarr left when killed (c.<uuid>.partial beside a 1-d array's
    chunks), which no reader ever looks at."""
    found = []
    for directory, flat in ((folder, True), (folder / "c", False)):
        if not directory.is_dir():
            continue
        with os.scandir(directory) as entries:
            for entry in entries:
                head, _, rest = entry.name.partition(".")
                if flat and head != "c":
                    continue  # zarr.json, or another array's folder
                index = rest.split(".")[0] if flat else head
                if (index.isdigit() and int(index) >= first) or entry.name.endswith(".partial"):
                    found.append(Path(entry.path))
    return found


def _chunk_bytes(array: zarr.Array, folder: Path, where: slice | tuple[slice, slice]) -> int:
    """Bytes on disk of the array's chunks that hold `where` (steps, or steps and this rank's
    example rows: zarr skips no chunk, see array_docs.writable), found by their keys in the
    array's own chunk key encoding."""
    steps, rows = where if isinstance(where, tuple) else (where, None)
    spans = [range(-(-n // c)) for n, c in zip(array.shape[1:], array.chunks[1:])]
    if rows is not None:  # another rank's chunks along the example axis are not this write's
        spans[0] = range(rows.start // array.chunks[1], -(-rows.stop // array.chunks[1]))
    depth = array.chunks[0]
    total = 0
    for index in itertools.product(range(steps.start // depth, -(-steps.stop // depth)),
                                   *spans):
        with contextlib.suppress(FileNotFoundError):
            total += (folder / array.metadata.encode_chunk_key(index)).stat().st_size
    return total


def remove_run(run_dir: Path) -> None:
    """Delete a previous run in `run_dir` (only when the user asked to overwrite)."""
    if (run_dir / fmt.META_FILE).exists():
        shutil.rmtree(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"{run_dir} exists and is not an attrib run; refusing to delete it. "
            "Pick an empty or new directory."
        )
