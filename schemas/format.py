"""On-disk format of a recorded run (v2; v1 stays readable): names, Arrow schemas, metadata.

This module is the single contract between the recorder (writer) and the analyzer (reader):
both import every path, array name and table schema from here, so the two can't drift.
See FORMAT.md beside this file for the prose description.
"""

from __future__ import annotations

import enum
import json
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa

FORMAT_NAME = "attrib-run"
FORMAT_VERSION = 2
# v1 stored Δθ and the per-step optimizer state; v2 stores the consumed gradient and derives
# them by replaying torch.optim from checkpoints of θ and the full optimizer state.
READABLE_VERSIONS = (1, 2)

# Files and folders inside a run directory.
META_FILE = "attrib.json"  # static metadata, written once at creation
MANIFEST_FILE = "manifest.json"  # commit record, atomically replaced at every commit
STORE_DIR = "store.zarr"  # Zarr v3 group with every dense tensor
TABLES_DIR = "tables"  # Parquet parts, one folder per table


class Status(str, enum.Enum):
    """Life cycle of a run, as stored in the manifest."""

    RECORDING = "recording"  # a recorder is (or was, if its process died) writing
    COMPLETE = "complete"  # closed normally: every step is committed
    CRASHED = "crashed"  # training raised or the process died; committed steps are intact
    INCOMPLETE = "incomplete"  # recording stopped early (write error, recorder never closed)


# Zarr node names. Step-indexed arrays have shape (steps, *param_shape).
CHECKPOINTS = "checkpoints"  # checkpoints/<key>: (n_checkpoints, *shape), θ at checkpoint steps
DELTAS = "deltas"  # v1 only: deltas/<key>: (steps, *shape), Δθ_s (v2 derives it by replay)
GRADS = "grads"  # grads/<key>: (steps, *shape), the gradient the optimizer consumed (G̃_s)
STATE = "state"  # v1 only: state/<key>/<state_name>: (steps, *shape), state after step s
# v2: checkpoint_state/<key>: (n_checkpoints, len(meta checkpoint_state), *shape), the
# optimizer's whole state at each checkpoint (zeros where absent), and whether the optimizer
# held state for each parameter: (n_checkpoints, n_params) bool
CHECKPOINT_STATE = "checkpoint_state"
CHECKPOINT_STATE_PRESENT = "checkpoint_state_present"
# v2: (steps, 2, n_params) float64, Σ θ ⊙ r per tensor (r a fixed pseudo-random vector) of θ_s
# before step s and θ_{s+1} after it: parameters changed outside the optimizer show up as a
# jump between a step's "after" and the next one's "before", or as a replay that misses them
FINGERPRINT = "fingerprint"
INITIAL_STATE = "initial_state"  # v1 only: initial_state/<key>/<name>: (*shape), carry-in state
# (v2: checkpoint 0 holds the optimizer state at step 0)
HPARAMS = "hparams"  # hparams/<name>: (steps, n_groups) float64, NaN where not applicable
CLIP_FACTOR = "clip_factor"  # (steps,) float64, α_s = ‖G̃_s‖ / ‖G_s‖ (G_s: .grad before clipping)
STEP_COUNT = "step_count"  # (steps, n_params) int64, optimizer's own step count t_s (0: none)
ACTIVE = "active"  # (steps, n_params) bool, whether the parameter had a gradient at step s
CONTRIB = "contrib"  # contrib/<key>: (steps, examples_per_step, *shape), Full capture c_{s,i}
PROJ = "proj"  # proj/<key>: (steps, examples_per_step, k), Project capture R c_{s,i}
# Factored capture: c_{s,i} = Σ_t left[s, i, t] ⊗ right[s, i, t], reshaped to the tensor's shape
# (its matrix view (dim 0, the rest)); unused token slots are zero
FACTOR_LEFT = "factor_left"  # factor_left/<key>: (steps, examples_per_step, tokens, dim 0)
FACTOR_RIGHT = "factor_right"  # factor_right/<key>: (steps, examples_per_step, tokens, the rest)
RESIDUAL_NORM = "residual_norm"  # (steps, n_params) float64, ‖G_s − Σ_i c_{s,i}‖ / ‖G_s‖

# How closely θ rebuilt from a checkpoint and float32 deltas agrees with θ stored or live (verify,
# resume): the deltas' own rounding stays far inside it.
THETA_RTOL, THETA_ATOL = 1e-5, 1e-6

# Zarr codecs a reader decodes. Anything else (a codec that unpickles, say, were one ever
# registered) is refused before a chunk is read: a run is data, never code.
# The codecs attrib writes, and so the only ones it decodes: a run is data, and codecs such
# as gzip or zstd decode a few bytes into gigabytes with no size checked first (Blosc's
# header is checked before decoding: analyzer/guarded_store.py)
READ_CODECS = frozenset({"bytes", "blosc", "crc32c"})


def reason(error: BaseException) -> str:
    """An exception met while reading a run, as text that never echoes the file's bytes: a
    codec's message may quote them (zarr's checksum error quotes the stored CRC, the last four
    bytes of the file, which a chunk symlinked to a secret would leak)."""
    if isinstance(error, FormatError):
        return str(error)
    text = str(error).splitlines()[0] if str(error) else ""
    if "checksum" in text.lower():
        return "the chunk fails its CRC32C checksum"
    text = re.sub(r"""b(['"]).*?\1""", "<bytes>", text)
    return f"{type(error).__name__}: {text[:160]}"


def check_codecs(codecs: list[dict[str, Any]], where: str) -> None:
    """Refuse an array whose codec chain names a codec outside READ_CODECS."""
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs]
    unknown = [n for n in names if n not in READ_CODECS]
    if unknown:
        raise FormatError(f"{where} is encoded with {unknown}, which attrib does not decode "
                          f"(it reads {sorted(READ_CODECS)}); the run was not written by attrib "
                          "or was edited")


def per_example(path: str) -> bool:
    """Whether a step array holds rows per example (axis 1) rather than one value per step."""
    return path.startswith((f"{CONTRIB}/", f"{PROJ}/", f"{FACTOR_LEFT}/", f"{FACTOR_RIGHT}/"))


# How the consumed gradients are stored (Recorder(grad_dtype=)): float32 replays bit for bit;
# bfloat16 halves the trajectory, stored as its bits in an int16 array (Zarr has no bfloat16),
# and its replay drifts from training (each checkpoint's gap is reported, never hidden).
GRAD_DTYPES = ("float32", "bfloat16")
GRAD_STORAGE = {"bfloat16": "int16"}

# Per-step, per-group optimizer hyperparameters stored under hparams/.
HPARAM_NAMES = ("lr", "weight_decay", "momentum", "dampening", "beta1", "beta2", "eps")

# Optimizer kinds and the per-step state each one needs (METHODS.md §1).
OPTIMIZER_KINDS = ("sgd", "adam", "adamw")
STEP_STATE = {"sgd": (), "adam": ("exp_avg_sq",), "adamw": ("exp_avg_sq",)}
# The torch.optim state a checkpoint stores (v2) to resume a replay: everything but `step`,
# which the step_count array holds.
CHECKPOINT_STATE_NAMES = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"),
                          "adamw": ("exp_avg", "exp_avg_sq")}
AMSGRAD_STATE = "max_exp_avg_sq"


def checkpoint_state_names(kind: str, amsgrad: bool) -> tuple[str, ...]:
    return CHECKPOINT_STATE_NAMES[kind] + ((AMSGRAD_STATE,) if amsgrad else ())

STEPS = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("epoch", pa.int64()),
        pa.field("stage", pa.string()),
        pa.field("lr", pa.list_(pa.float64())),  # one entry per param group
        pa.field("loss", pa.float64()),
        pa.field("metrics", pa.map_(pa.string(), pa.float64())),  # user scalars from rec.log
        pa.field("grad_norm", pa.float64()),  # ‖G_s‖ before clipping
        pa.field("clip_factor", pa.float64()),
        pa.field("clip_uniform", pa.bool_()),  # False: .grad was not a uniform rescale of G_s
        pa.field("update_norm", pa.float64()),  # ‖Δθ_s‖ (v1; null in v2: Run.deltas has it)
        pa.field("n_examples", pa.int64()),
        pa.field("time", pa.float64()),  # seconds since the recorder started, at step end
        pa.field("record_seconds", pa.float64()),  # time the training thread spent in hooks
        pa.field("bytes_written", pa.int64()),  # compressed bytes of this step's block / steps
        pa.field("write_seconds", pa.float64()),  # writer time on this step's block / steps
        # True: the writer was behind and Recorder(backpressure="drop_examples") kept this
        # step's trajectory but not its per-example rows (they read as zeros)
        pa.field("examples_dropped", pa.bool_()),
    ]
)

EXAMPLES = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("micro_batch", pa.int32(), nullable=False),
        pa.field("slot", pa.int32(), nullable=False),  # row within the micro-batch
        pa.field("row", pa.int32(), nullable=False),  # row within the step (per-example arrays)
        pa.field("example_id", pa.int64(), nullable=False),
        pa.field("loss", pa.float64()),  # per-example loss, from rec.log_examples(loss=...)
        pa.field("f", pa.float64()),  # the user's per-example f, from rec.log_examples(f=...)
    ]
)

EXAMPLE_VALUES = ("loss", "f")

STAGES = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("start_step", pa.int64(), nullable=False),
        pa.field("end_step", pa.int64()),  # inclusive; null while the stage has no step yet
        pa.field("n_steps", pa.int64(), nullable=False),
    ]
)

PARAMS = pa.schema(
    [
        pa.field("index", pa.int32(), nullable=False),
        pa.field("name", pa.string(), nullable=False),  # model.named_parameters() name
        pa.field("key", pa.string(), nullable=False),  # its Zarr node name
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("layer_type", pa.string(), nullable=False),  # owning module's class name
        pa.field("module", pa.string(), nullable=False),  # owning module's path
        pa.field("group", pa.int32(), nullable=False),  # optimizer param group
    ]
)

CHECKPOINTS_TABLE = pa.schema(
    [
        pa.field("index", pa.int32(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
    ]
)

SHIFTS = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("epoch", pa.int64()),
        pa.field("example_id", pa.int64(), nullable=False),
        pa.field("param", pa.string(), nullable=False),
        pa.field("flat_index", pa.int64(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),  # output neuron (dim 0) of the tensor
        pa.field("col", pa.int64()),  # input feature (the flattened rest); null for 1-D tensors
        pa.field("shift", pa.float32(), nullable=False),  # K_{s,s} ⊙ α_s c_{s,i} at this entry
        pa.field("grad", pa.float32(), nullable=False),  # c_{s,i} at this entry (before clipping)
    ]
)

RNG = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("forward", pa.int32(), nullable=False),  # k-th training forward of the step
        pa.field("device", pa.string(), nullable=False),  # "cpu" or "cuda:N"
        pa.field("state", pa.binary(), nullable=False),  # torch.get_rng_state() bytes
        pa.field("rank", pa.int32()),  # the DDP rank whose forward it was; null (older) = 0
    ]
)

TOKENS = pa.schema(
    [
        pa.field("example_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # index in the example's sequence
        pa.field("token_id", pa.int64(), nullable=False),
        pa.field("token", pa.string()),  # from the vocabulary; null without one
    ]
)

VOCABULARY = pa.schema(
    [
        pa.field("token_id", pa.int64(), nullable=False),
        pa.field("token", pa.string()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "steps": STEPS,
    "examples": EXAMPLES,
    "stages": STAGES,
    "params": PARAMS,
    "checkpoints": CHECKPOINTS_TABLE,
    "shifts": SHIFTS,
    "rng": RNG,
    "tokens": TOKENS,
    "vocabulary": VOCABULARY,
}

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


class FormatError(ValueError):
    """A run directory that is missing, damaged, or of a format this version can't read."""


class RunChanged(FormatError):
    """A file the run listed when it was opened is gone because the recorder committed again
    since (it compacts or rewrites table parts): the reader opens the run again."""


def vanished(error: BaseException) -> bool:
    """Whether a read failed because a file is not there (Python, pyarrow and DuckDB say so
    differently)."""
    return isinstance(error, FileNotFoundError) or any(
        text in str(error) for text in ("No such file", "No files found", "does not exist",
                                        "Cannot access file"))  # DuckDB's, for a listed file


def param_key(name: str) -> str:
    """Zarr node name for a parameter name: the name itself when it is a safe path segment."""
    if _SAFE_KEY.match(name) and not set(name) <= {"."} and not name.startswith("__"):
        return name
    return "p_" + name.encode().hex()


def table_part_name(table: str, first_step: int, last_step: int, sequence: int) -> str:
    """Relative path of one immutable Parquet part of a table."""
    return f"{TABLES_DIR}/{table}/part-{sequence:06d}-{first_step:09d}-{last_step:09d}.parquet"


def part_fields(relative: str) -> tuple[int, int, int]:
    """(sequence, first step, last step) of a part path: table_part_name's inverse."""
    _, sequence, first, last = Path(relative).stem.split("-")
    return int(sequence), int(first), int(last)


def inside(run_dir: Path, relative: str) -> Path:
    """Resolve a path stored in a run's metadata, refusing any that escapes the run directory
    or passes through a symbolic link inside it (a link could make one run read another's
    files, or any file on the machine)."""
    root = run_dir.resolve()
    path = root
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            raise FormatError(f"{path} is a symbolic link; attrib reads no links inside a run "
                              "(copy the file in instead)")
    target = (root / relative).resolve()
    if root != target and root not in target.parents:
        raise FormatError(f"{run_dir}: stored path {relative!r} points outside the run directory")
    if target.exists() and not (target.is_file() or target.is_dir()):  # a FIFO, a device
        raise FormatError(f"{target} is not a regular file; the run is damaged or was edited")
    return target


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write JSON so that readers see either the old or the new document, never a mix, and
    the new one survives a crash of the machine (fsync)."""
    write_bytes_atomic(path, json.dumps(document, indent=1, sort_keys=True).encode(),
                       durable=True)


def write_bytes_atomic(path: Path, data: bytes, durable: bool) -> None:
    """Write a file through a temporary one and a rename, so readers see the old or the new
    content, never a mix; `durable` also fsyncs it. The temporary name is per process and
    thread: two threads writing one file must not share it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


JSON_LIMIT = 64 << 20  # bytes of a run's JSON document (a long run's manifest: a few MB)


def read_untrusted(path: Path, limit: int) -> bytes | None:
    """At most limit + 1 bytes of a file inside a run, None when there is none. Refused with
    a FormatError: a symbolic link (O_NOFOLLOW) and anything but a regular file (opened
    without blocking: a FIFO would wait for a writer forever). The caller compares the
    length with `limit`, so a device or an oversized file is never read whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if os.path.islink(path):
            raise FormatError(f"{path} is a symbolic link; attrib reads no links inside a run "
                              "(copy the file in instead)") from None
        raise FormatError(f"{path} can't be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise FormatError(f"{path} is not a regular file; the run is damaged or was edited")
        return f.read(limit + 1)


def read_json(path: Path) -> dict[str, Any]:
    """A run's JSON document, read as untrusted input (read_untrusted): at most JSON_LIMIT
    bytes, nesting within Python's recursion limit; else a FormatError."""
    data = read_untrusted(path, JSON_LIMIT)
    if data is None:
        raise FormatError(f"{path} is missing: is {path.parent} an attrib run directory?")
    if len(data) > JSON_LIMIT:
        raise FormatError(f"{path} is larger than {JSON_LIMIT} bytes; the run metadata is "
                          "damaged")
    try:
        document = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e}); the run metadata is damaged") from None
    except (RecursionError, ValueError):  # nesting too deep, an integer of 10^4300 digits
        raise FormatError(f"{path} nests too deeply or holds a number too long to read; the "
                          "run metadata is damaged") from None
    if not isinstance(document, dict):
        raise FormatError(f"{path} must hold a JSON object, found {type(document).__name__}")
    return document


def check_version(meta: dict[str, Any], path: Path) -> None:
    """Refuse runs of another format, or of a newer version than this code understands."""
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path} is not an attrib run (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise FormatError(f"{path}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{path} was written in attrib format v{version}, newer than this attrib "
            f"(reads up to v{FORMAT_VERSION}); upgrade attrib to read it"
        )
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{path}: format v{version} is not one attrib reads "
                          f"({READABLE_VERSIONS})")


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _strings(value: Any, allowed: Any = None) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, str) and (allowed is None or v in allowed) for v in value)


def _optimizer(value: Any) -> bool:
    return (isinstance(value, dict) and value.get("kind") in OPTIMIZER_KINDS
            and isinstance(value.get("groups"), list)
            and all(isinstance(g, dict) for g in value["groups"]))


def _capture(value: Any) -> bool:
    """{param: {"full": {dtype}, "factored": {dtype, tokens, rank}, "project": {k, seed, kind,
    split}, "topk": {k, scope}}}"""
    if not isinstance(value, dict):
        return False
    for policies in value.values():
        if not isinstance(policies, dict) or not set(policies) <= {"full", "factored", "project",
                                                                    "topk"}:
            return False
        factored = policies.get("factored")
        if factored is not None and not (isinstance(factored, dict) and all(
                factored.get(key) is None or _is_int(factored.get(key), 1)
                for key in ("tokens", "rank"))):
            return False
        project = policies.get("project")
        if project is not None and not (isinstance(project, dict) and _is_int(project.get("k"), 1)
                                        and _is_int(project.get("seed"))
                                        and isinstance(project.get("kind"), str)
                                        and _split(project.get("split"), project.get("k"))):
            return False
        if not all(isinstance(p, dict) for p in policies.values()):
            return False
    return True


def _split(value: Any, k: Any) -> bool:
    """A Project capture's kron split: absent/null, or [k_l, k_r] with k_l · k_r = k."""
    return value is None or (isinstance(value, list) and len(value) == 2
                             and all(_is_int(v, 1) for v in value) and value[0] * value[1] == k)


def _tables(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _strings(v)
                                           for k, v in value.items())


# What readers rely on in each document: key → (test, what it should be). Optional keys may be
# absent; present ones are checked all the same.
_STATE_NAMES = {name for names in STEP_STATE.values() for name in names}
_CHECKPOINT_STATE_NAMES = {AMSGRAD_STATE, *(n for names in CHECKPOINT_STATE_NAMES.values()
                                           for n in names)}
META_FIELDS: dict[str, tuple[Any, str]] = {
    "optimizer": (_optimizer, f"an object with kind in {OPTIMIZER_KINDS} and a list of groups"),
    "step_state": (lambda v: _strings(v, _STATE_NAMES), f"a list of {sorted(_STATE_NAMES)}"),
    "hparam_names": (lambda v: _strings(v, HPARAM_NAMES), f"a list of {HPARAM_NAMES}"),
    "record_grads": (lambda v: isinstance(v, bool), "true or false"),
    "checkpoint_every": (lambda v: _is_int(v, 1), "an integer ≥ 1"),
    "steps_per_chunk": (lambda v: v is None or _is_int(v, 1), "null or an integer ≥ 1"),
    "examples_per_step": (lambda v: v is None or _is_int(v), "null or an integer ≥ 0"),
}
META_OPTIONAL: dict[str, tuple[Any, str]] = {
    "checkpoint_state": (lambda v: _strings(v, _CHECKPOINT_STATE_NAMES),  # v2
                         f"a list of {sorted(_CHECKPOINT_STATE_NAMES)}"),
    "capture": (_capture, "an object of capture policies per parameter"),
    "residual_params": (_strings, "a list of parameter names"),
    "grad_dtype": (lambda v: v in GRAD_DTYPES, f"one of {GRAD_DTYPES}"),  # v2
    "trajectory": (lambda v: v is None or _strings(v),  # v2: whose gradients are stored
                   "null (every tensor's gradients stored) or a list of parameter names"),
    "initial_step_count": (lambda v: isinstance(v, list) and all(_is_int(c) for c in v),
                           "a list of integers ≥ 0"),
    "every_chunk_stored": (lambda v: isinstance(v, bool), "true or false"),
}
MANIFEST_FIELDS: dict[str, tuple[Any, str]] = {
    "status": (lambda v: isinstance(v, str) and v in {s.value for s in Status},
               f"one of {[s.value for s in Status]}"),
    "committed_steps": (_is_int, "an integer ≥ 0"),
    "n_checkpoints": (_is_int, "an integer ≥ 0"),
    "tables": (_tables, "an object of table name → list of part paths"),
}
MANIFEST_OPTIONAL: dict[str, tuple[Any, str]] = {
    "pid": (lambda v: v is None or _is_int(v), "null or a process id"),
    "host": (lambda v: v is None or isinstance(v, str), "null or a host name"),
    "error": (lambda v: v is None or isinstance(v, str), "null or a message"),
}


def check_fields(document: dict[str, Any], path: Path) -> None:
    """Refuse a metadata document whose fields readers rely on are missing or malformed (a
    hand-edited or damaged file), naming the field, instead of failing deep in an analysis."""
    required, optional = ((MANIFEST_FIELDS, MANIFEST_OPTIONAL) if path.name == MANIFEST_FILE
                          else (META_FIELDS, META_OPTIONAL))
    for key, (test, expected) in {**required, **optional}.items():
        if key not in document:
            if key in required:
                raise FormatError(f"{path}: the field {key!r} is missing; the run's metadata is "
                                  "damaged (restore the file, or record the run again)")
            continue
        if not test(document[key]):
            value = repr(document[key])
            raise FormatError(f"{path}: {key} should be {expected}, found "
                              f"{value[:80] + '…' if len(value) > 80 else value}; the run's "
                              "metadata is damaged (restore the file, or record the run again)")

