"""The Recorder: one line around a training loop that records the optimizer's trajectory.

Hooks only (optimizer step pre/post hooks and post-accumulate-grad hooks on parameters): the
user's loop is not patched. The hot path does a few batched tensor operations per step and
hands host copies to the background writer. Format v2: per step the consumed gradient, the
hyperparameters and a fingerprint of θ; θ and the optimizer's whole state at checkpoints. Δθ and
the moments are not stored: readers rebuild them by replaying the optimizer.
"""

from __future__ import annotations

import fnmatch
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from attrib.analyzer.run import Run
from attrib.recorder import allocator, distributed, factors, lifecycle, residuals
from attrib.recorder import optimizers as optim_info
from attrib.recorder import per_example as pe
from attrib.recorder.capture import ExampleCapture, StepData, scatter_rows
from attrib.recorder.policies import Policy, TensorCapture, TopK, default_policies, resolve
from attrib.recorder.resume import ResumePoint, prepare, still_recording
from attrib.recorder.rng import RngCapture, stochastic_modules
from attrib.recorder.shifts import ShiftInput, top_shifts
from attrib.recorder.store import (
    ArraySpec,
    Codec,
    Codecs,
    RunStore,
    block_steps,
    now_iso,
    remove_run,
)
from attrib.recorder.tokens import TokenBatch, token_batch, vocabulary_array, vocabulary_table
from attrib.recorder.writer import BackgroundWriter, Block, RecordingError, StepRecord
from attrib.schemas import format as fmt
from attrib.schemas import projection
from attrib.schemas.fingerprint import Fingerprint
from attrib.schemas.format import FormatError

RESIDUAL_FLOOR = 1e-5  # see _store_examples
RESIDUAL_WARN = 1e-3  # a residual norm above this is a use the capture missed (float32 sums
# of many examples round to ~1e-6; see residual_warning for half precision)
BLOCK_BUFFERS = 3  # one being filled, up to two being written: bounds host memory
# Σ_i c_i = G is checked on every step of the first CHECK_EVERY and on every check_every-th
# after: a use the hooks miss is structural (it shows at once), and on the MLP with Factored()
# the check's sketches and float64 gaps were ~2 ms of a ~14 ms recorded step (issue 18)
CHECK_EVERY = 16
DEFAULT_STAGE = "default"
# When every block buffer is being written: training waits (nothing is lost), or the next
# block keeps the trajectory and tables but drops its per-example rows (training never waits
# on them; steps.examples_dropped marks the steps, whose data influence becomes residual).
BACKPRESSURE = ("block", "drop_examples")


def residual_warning(dtype: torch.dtype) -> float:
    """The residual norm above which a tensor's rows are said to miss a use: RESIDUAL_WARN, or
    for half precision 10 ulps (bfloat16 sums of a batch's rows round to ~5e-3 of the total)."""
    return max(RESIDUAL_WARN, 10 * torch.finfo(dtype).eps) if dtype.is_floating_point \
        else RESIDUAL_WARN


@dataclass
class TrackedParam:
    """A trainable parameter with the names the format stores it under."""

    index: int
    name: str
    key: str
    param: torch.nn.Parameter
    group: int
    module: str
    layer_type: str
    layout: tuple[tuple[int, ...], torch.dtype]  # shape and dtype when the recorder attached
    trained_at_attach: bool = True  # requires_grad then: frozen ones get no hooks or capture

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.float64 if self.param.dtype == torch.float64 else torch.float32


def _host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a scalar that later in-place updates of `t` can't change; on a GPU it
    completes before the block's event, which the writer waits for."""
    t = t.detach()
    return t.to("cpu", non_blocking=True) if t.device.type != "cpu" else t.clone()


def _snapshot(params: list[TrackedParam], optimizer: torch.optim.Optimizer,
              state_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """θ and the optimizer's whole state for a checkpoint, keyed by array path: blocking host
    copies in the storage dtype (rare, off the step path). State the optimizer does not hold
    (yet) is stored as zeros and flagged absent."""
    values, present = {}, []
    for p in params:
        values[f"{fmt.CHECKPOINTS}/{p.key}"] = p.param.detach().to("cpu", p.storage_dtype,
                                                                   copy=True)
        state = optimizer.state.get(p.param, {})
        present.append(isinstance(state.get(state_names[0]), torch.Tensor))
        values[f"{fmt.CHECKPOINT_STATE}/{p.key}"] = torch.stack([
            state[name].detach().to("cpu", p.storage_dtype) if isinstance(state.get(name),
                                                                          torch.Tensor)
            else torch.zeros(p.param.shape, dtype=p.storage_dtype) for name in state_names])
    values[fmt.CHECKPOINT_STATE_PRESENT] = torch.tensor(present, dtype=torch.bool)
    return values


def tracked_params(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[TrackedParam]:
    """The optimizer's parameters in group order, named after the model's modules."""
    owner: dict[int, tuple[str, str, str]] = {}
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{local}" if module_name else local
            owner.setdefault(id(p), (full, module_name, type(module).__name__))
    params: list[TrackedParam] = []
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in owner:
                raise ValueError(
                    f"optimizer param group {g} holds a parameter of shape {tuple(p.shape)} that "
                    "is not a parameter of the model given to Recorder; pass the model that owns "
                    "every parameter the optimizer updates"
                )
            name, module, layer_type = owner[id(p)]
            params.append(TrackedParam(len(params), name, fmt.param_key(name), p, g, module,
                                       layer_type, (tuple(p.shape), p.dtype), p.requires_grad))
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        raise ValueError("two parameters map to the same storage key; rename the modules")
    return params


class Recorder:
    """Record an optimizer's trajectory into a run directory (format v2).

    Use as a context manager around the training loop; call `examples(ids)` before each
    backward, optionally `log(...)`, `stage(name)` and `epoch(n)`. With `strict=False` (the
    default) a recording failure never stops training: it warns, stops recording and marks the
    run `incomplete`. With `strict=True` it raises.

    `rng`: record the random generator state before every training forward, which replaying
    a stochastic model needs (stage accountability); None records it when the model has
    dropout (or other stochastic modules), True always, False never. `vocabulary`: token id →
    string (a list or dict) for language data, stored as the `vocabulary` table and used to
    spell the `tokens` table that `examples(ids, tokens=...)` fills.

    Memory: the recorder holds `buffers` blocks of `steps_per_chunk` steps on the host (pinned
    when the model is on a GPU), never more. When the disk falls behind, `backpressure="block"`
    (the default) makes training wait for a free block; `"drop_examples"` keeps recording the
    trajectory in small aggregate-only blocks and drops those steps' per-example rows, flagged
    in `steps.examples_dropped` (their data influence then lands in the residual term).

    `trajectory`: glob patterns (or one) of the parameter names whose consumed gradients are
    stored every step; None (the default) stores every tensor's. θ and the optimizer state of
    every tensor are still stored at each checkpoint. Between checkpoints a reader then
    rebuilds only the chosen tensors (`Run.deltas`, `Run.state`, `Run.grads` of them); what
    needs every tensor's θ there (`Run.reconstruct` off a checkpoint, the path kernel, stage
    replay) refuses and says so. For runs too large to store every gradient.

    `shared`: glob patterns of module paths whose calls may run on an input every example of
    the micro-batch shares, with a batch dimension of 1 (fixed positional features through a
    Linear, a learned query): such a call's output is handed on expanded over the micro-batch
    (a view, equal wherever the model broadcasts it) so each example's part of the gradient is
    captured. Only for modules whose output the model does broadcast over the batch: widening
    an output the model uses as one row changes what it computes. Embedding lookups of
    positions are recognised without it.

    `check_every`: the per-example rows are checked against the consumed gradient
    (Σ_i c_i = G, or its projection) on every step of the first CHECK_EVERY and then every
    `check_every`-th (default CHECK_EVERY; with strict=True, 1: every step). A gap warns, or
    raises under strict=True, and fills residual_norm; a missed use that happens only on some
    steps can go unseen between checks. Steps whose rows are missing altogether (no
    rec.examples(), a failed module, too few factor slots) read 1 on every step. The analyses'
    residual term is exact on every step either way.

    `resume=True` continues the run in `path` at its last committed step, after the training
    script restored its own checkpoint; `resume=STEP` continues from an earlier step and
    discards the steps recorded after it. The parameters and optimizer state must match the
    recorded ones at that step (checked; a mismatch is refused and names the step that does
    match).
    """

    def __init__(
        self,
        path: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        checkpoint_every: int = 100,
        steps_per_chunk: int | None = None,
        record_grads: bool = True,
        trajectory: str | Sequence[str] | None = None,
        grad_dtype: str = "float32",
        codec: Codec | None = None,
        buffers: int = BLOCK_BUFFERS,
        capture: Policy | list[Policy] | bool | None = None,
        shared: str | Sequence[str] = (),
        examples_per_step: int | None = None,
        check_every: int | None = None,
        strict: bool = False,
        rng: bool | None = None,
        vocabulary: Sequence[str] | dict[int, str] | None = None,
        overwrite: bool = False,
        resume: bool | int = False,
        backpressure: str = "block",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be ≥ 1, got {checkpoint_every}")
        if steps_per_chunk is not None and steps_per_chunk < 1:
            raise ValueError(f"steps_per_chunk must be ≥ 1 (or None to size it), got "
                             f"{steps_per_chunk}")
        if buffers < 1:
            raise ValueError(f"buffers must be ≥ 1 (block buffers held in memory), got {buffers}")
        if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
            raise ValueError(f"check_every must be an integer ≥ 1 (1 checks every step), got "
                             f"{check_every!r}")
        if backpressure not in BACKPRESSURE:
            raise ValueError(f"backpressure={backpressure!r}: choose one of {BACKPRESSURE}")
        allocator.pin_heap_thresholds()
        model, self.ranks = distributed.unwrap(model)
        self._primary = self.ranks is None or self.ranks.primary
        self.path = Path(path)
        self.strict = strict
        self.backpressure = backpressure
        self.spec = optim_info.inspect_optimizer(optimizer)
        self.optimizer = optimizer
        self.params = tracked_params(model, optimizer)
        self._model = model
        self.checkpoint_every = checkpoint_every
        self.record_grads = record_grads
        self._recorded = self._resolve_trajectory(trajectory)
        if grad_dtype not in fmt.GRAD_DTYPES:
            raise ValueError(f"grad_dtype={grad_dtype!r}: choose one of {fmt.GRAD_DTYPES}")
        self.grad_dtype = grad_dtype
        self.captures = self._resolve_capture(capture)
        self._steps_per_chunk = steps_per_chunk
        self._examples_per_step = examples_per_step
        # strict refuses a missed use wherever it happens: it checks every step by default
        self.check_every = check_every or (1 if strict else CHECK_EVERY)
        self._buffers = buffers
        self._on_gpu = any(p.param.is_cuda for p in self.params)
        self._stochastic = stochastic_modules(model)
        keep_rng = bool(self._stochastic) if rng is None else rng
        self._rng = RngCapture(model) if keep_rng else None  # DDP: every rank its own
        # DDP averages the ranks' gradients: each rank's examples carry 1/world of theirs
        self._capture = (ExampleCapture(model, [p.name for p in self.params],
                                        [tuple(p.param.shape) for p in self.params],
                                        self.captures, strict,
                                        scale=1.0 / self.ranks.world if self.ranks else 1.0,
                                        shared=(shared,) if isinstance(shared, str) else shared)
                         if any(c.any for c in self.captures) else None)
        for i, c in enumerate(self.captures):  # Factored where the calls hand over factors
            if c.factored is not None and not self._capture.factorable(i):
                c.unfactor(self.params[i].param.numel())

        self._block: Block | None = None  # created at the first step, when sizes are known
        self._example_capacity = 0  # examples per step the per-example arrays hold

        self.step = 0  # index of the next optimizer step
        self._epoch: int | None = None
        self._stage = DEFAULT_STAGE
        self._enabled = True
        self._closed = False
        self._failure: str | None = None
        self._pending: StepRecord | None = None  # last step, still accepting log() values
        self._after_step = False  # True between opt.step() and the next backward/examples()
        self._upcoming: dict[str, Any] = {"metrics": {}, "loss": None}
        self._examples: list[np.ndarray] = []
        self._example_values: list[dict[str, torch.Tensor]] = []
        self._tokens: list[TokenBatch] = []
        self._hook_seconds = 0.0
        self._started = time.perf_counter()
        self._fingerprint = Fingerprint([p.param for p in self.params])
        self._before: torch.Tensor | None = None  # fingerprint of θ_s, taken before step s
        self._after: torch.Tensor | None = None  # fingerprint of θ_s, taken after step s − 1
        self._moved: list[tuple[int, torch.Tensor]] = []  # GPU: checked once per block
        self._pre_clip_norms: list[torch.Tensor | None] = [None] * len(self.params)
        self._norms_pending = False  # the end of this backward is being watched
        self._had_buffer = [False] * len(self.params)
        self._last_checkpoint = -1
        self._dropped_before = False
        self._problems_seen: set[str] = set()
        self._created_run = False  # this constructor made the run directory (see _abandon)
        try:  # a constructor that fails leaves no thread, hook or half-made run behind
            codecs = Codecs.of(codec)
            meta = self._metadata(codecs, metadata or {})
            if self.ranks is None:
                point = self._open(meta, codecs, vocabulary, overwrite, resume)
            else:  # rank 0 creates the run (or cuts it back) while the others wait; they join
                point = self.ranks.lead(lambda: self._open(meta, codecs, vocabulary, overwrite,
                                                           resume))
                if not self._primary:
                    self._writer = BackgroundWriter(RunStore.join(self.path, self.ranks.rank),
                                                    None, self.ranks)
            if not self._primary:
                self._join_at(fmt.read_json(self.path / fmt.MANIFEST_FILE)["committed_steps"])
            elif point is not None:
                self._continue(point)
            else:
                self._checkpoint_now()
            if self._capture is not None:  # the first step follows the check schedule too
                self._capture.expect_step(self._checks(self.step))
            self._handles = [
                optimizer.register_step_pre_hook(self._pre_step),
                optimizer.register_step_post_hook(self._post_step),
                *(p.param.register_post_accumulate_grad_hook(self._grad_hook)
                  for p in self.params if p.trained_at_attach),  # frozen: never gets a .grad
            ]
        except BaseException:
            self._abandon()
            raise
        lifecycle.track(self, on_sigterm=self.ranks is None)

    # -- set-up --------------------------------------------------------------------------------
    def _abandon(self) -> None:
        """Undo a constructor that failed part-way: remove its hooks, stop its writer thread
        and, for a new run, delete the directory it created (a resumed run keeps its data)."""
        for handle in getattr(self, "_handles", []):
            handle.remove()
        if self._capture is not None:
            self._capture.remove()
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.close()
        if self._primary and self._created_run:  # a new run: it was empty or absent before
            shutil.rmtree(self.path, ignore_errors=True)

    def _check_target(self, overwrite: bool, resume: bool | int) -> None:
        if resume is not False:
            if overwrite:
                raise ValueError("pass resume= to continue a run or overwrite=True to replace "
                                 "it, not both")
            if not (self.path / fmt.META_FILE).exists():
                raise FileNotFoundError(f"resume= needs a recorded run, and {self.path} holds "
                                        "none; drop resume= to start a new run there")
            return
        if (self.path / fmt.META_FILE).exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self.path} already holds a recorded run; pass overwrite=True to replace "
                    "it, or choose another directory"
                )
            try:
                busy = still_recording(Run(self.path), "overwriting it")
            except (OSError, ValueError):  # a damaged run: nothing can be recording into it
                busy = None
            if busy is not None:
                raise FileExistsError(f"{busy}, or choose another directory")
            remove_run(self.path)
        elif self.path.exists() and any(self.path.iterdir()):
            raise FileExistsError(f"{self.path} is not empty; record into a new directory")

    def _resolve_capture(self, capture) -> list[TensorCapture]:
        if capture is False:
            policies: list[Policy] = []
        elif capture is None or capture is True:
            policies = default_policies(sum(p.param.numel() for p in self.params))
        else:
            policies = list(capture) if isinstance(capture, (list, tuple)) else [capture]
        resolved = resolve(policies, [p.name for p in self.params],
                           [tuple(p.param.shape) for p in self.params],
                           [str(p.storage_dtype).removeprefix("torch.") for p in self.params])
        # a frozen parameter (requires_grad=False) never gets a gradient: nothing to capture
        return [c if p.trained_at_attach else TensorCapture(c.storage_dtype)
                for p, c in zip(self.params, resolved)]

    @property
    def _checkpoint_state_names(self) -> tuple[str, ...]:
        return fmt.checkpoint_state_names(self.spec.kind, self.spec.amsgrad)

    def _checkpoint_specs(self) -> list[ArraySpec]:
        """The arrays a checkpoint appends to: θ, the optimizer's state, which state exists."""
        specs = []
        for p in self.params:
            shape, dtype = tuple(p.param.shape), str(p.storage_dtype).removeprefix("torch.")
            specs.append(ArraySpec(f"{fmt.CHECKPOINTS}/{p.key}", shape, dtype))
            specs.append(ArraySpec(f"{fmt.CHECKPOINT_STATE}/{p.key}",
                                   (len(self._checkpoint_state_names), *shape), dtype))
        return [*specs, ArraySpec(fmt.CHECKPOINT_STATE_PRESENT, (len(self.params),), "bool",
                                  False)]

    def _resolve_trajectory(self, trajectory: str | Sequence[str] | None) -> list[bool]:
        """Whose gradients each step stores: every tensor's (None), or those whose names match
        a glob pattern; an unmatched pattern is refused rather than recording less than meant."""
        if trajectory is None or not self.record_grads:
            return [self.record_grads] * len(self.params)
        patterns = (trajectory,) if isinstance(trajectory, str) else tuple(trajectory)
        names = [p.name for p in self.params]
        unmatched = [q for q in patterns if not any(fnmatch.fnmatchcase(n, q) for n in names)]
        if unmatched:
            raise ValueError(f"trajectory={list(patterns)}: {unmatched} match no parameter; "
                             f"the parameters are {names}")
        return [any(fnmatch.fnmatchcase(n, q) for q in patterns) for n in names]

    def _array_specs(self, examples: int) -> list[ArraySpec]:
        specs = []
        for p, capture in zip(self.params, self.captures):
            shape, dtype = tuple(p.param.shape), str(p.storage_dtype).removeprefix("torch.")
            if self._recorded[p.index]:
                specs.append(ArraySpec(f"{fmt.GRADS}/{p.key}", shape,
                                       fmt.GRAD_STORAGE.get(self.grad_dtype, dtype)))
            if capture.full is not None:
                specs.append(ArraySpec(f"{fmt.CONTRIB}/{p.key}", (examples, *shape),
                                       capture.full_dtype))
            if capture.tokens is not None:  # Factored, settled at the first step
                m, n = projection.matrix_view(shape)
                for group, width in ((fmt.FACTOR_LEFT, m), (fmt.FACTOR_RIGHT, n)):
                    specs.append(ArraySpec(f"{group}/{p.key}", (examples, capture.tokens, width),
                                           capture.full_dtype))
            if capture.project is not None:
                specs.append(ArraySpec(f"{fmt.PROJ}/{p.key}", (examples, capture.project.k),
                                       "float32"))
        groups, n = (len(self.optimizer.param_groups),), (len(self.params),)
        specs += [ArraySpec(f"{fmt.HPARAMS}/{h}", groups, "float64", math.nan)
                  for h in fmt.HPARAM_NAMES]
        specs += [
            ArraySpec(fmt.CLIP_FACTOR, (), "float64", math.nan),
            ArraySpec(fmt.STEP_COUNT, n, "int64", 0),
            ArraySpec(fmt.ACTIVE, n, "bool", False),
            ArraySpec(fmt.FINGERPRINT, (2, *n), "float64", math.nan),
        ]
        if self._capture is not None:
            specs.append(ArraySpec(fmt.RESIDUAL_NORM, n, "float64", math.nan))
        return specs

    def _initialize_storage(self, examples: int) -> None:
        """Create the step arrays and block buffers, sized by what step 0 showed.

        Distributed: `examples` is this rank's; the arrays hold every rank's (world ×), and
        each rank's buffers its own rows, of per-example arrays only on ranks other than 0."""
        world = self.ranks.world if self.ranks is not None else 1
        specs = self._array_specs(examples * world)
        per_step = sum(a.step_bytes for a in specs)
        depth = self._steps_per_chunk or block_steps(per_step)
        store = self._writer.store
        meta = {"steps_per_chunk": depth, "examples_per_step": examples * world,
                "capture": self._capture_meta()}
        if self._primary:
            store.create_step_arrays(specs, depth, meta,
                                     rank_rows=examples if self.ranks is not None else None)
        else:
            store.steps_per_chunk = depth
            store.meta.update(meta)
        if self.ranks is not None:  # a collective at step 0's hook, on every rank alike
            self.ranks.barrier()
        self._attach_step_arrays(examples)

    def _attach_step_arrays(self, examples: int) -> None:
        """Block buffers for the step arrays (which exist by now), `examples` of this rank's
        per step. Distributed: rank 0 fills every array, with its examples in rows [0, B);
        rank r only the per-example arrays, rows [r·B, (r+1)·B)."""
        specs = self._array_specs(examples)
        self._example_capacity = examples
        if self.ranks is not None:
            store = self._writer.store
            store.example_rows = slice(self.ranks.rank * examples,
                                       (self.ranks.rank + 1) * examples)
            if not self._primary:
                specs = [s for s in specs if fmt.per_example(s.path)]
                store.open_step_arrays([s for s in self._array_specs(examples * self.ranks.world)
                                        if fmt.per_example(s.path)])
        self._start_blocks(specs)

    def _start_blocks(self, specs: list[ArraySpec]) -> None:
        lean = [s for s in specs if not fmt.per_example(s.path)]
        dropping = self.backpressure == "drop_examples" and len(lean) < len(specs)
        self._writer.start_pool(specs, self._buffers, pin_memory=self._on_gpu,
                                lean=lean if dropping else None)
        self._block = self._writer.acquire(self.step)

    def _create(self, meta: dict, codecs: Codecs, vocabulary: np.ndarray | None) -> RunStore:
        """A new run directory with its static tables."""
        store = RunStore(self.path, meta, self._checkpoint_specs(), codecs)
        store.write_table_part("params", self._params_table(), 0, 0)
        if vocabulary is not None:
            store.write_table_part("vocabulary", vocabulary_table(vocabulary), 0, 0)
        return store  # state the optimizer already holds is in checkpoint 0 (the carry-in)

    def _open(self, meta: dict, codecs: Codecs, vocabulary: Sequence[str] | dict[int, str] | None,
              overwrite: bool, resume: bool | int) -> ResumePoint | None:
        """Rank 0 (or the one process): create the run, or check the live state against the
        recorded one and cut it back to the resume step (data after it, whatever a crash left
        uncommitted); starts the writer. Returns where a resumed run continues."""
        self._check_target(overwrite, resume)
        if resume is False:
            self._created_run = True
            store = self._create(meta, codecs, vocabulary_array(vocabulary))
            self._writer = BackgroundWriter(store, vocabulary_array(vocabulary), self.ranks)
            return None
        point, store = self._reopen(meta, resume)
        vocabulary = point.vocabulary if point.vocabulary is not None else vocabulary
        self._writer = BackgroundWriter(store, vocabulary_array(vocabulary), self.ranks)
        self._writer.resume(point.step, point.checkpoints, point.stage_runs, point.seen_examples)
        if self.ranks is not None:
            distributed.clear_markers(self.path)
        return point

    def _reopen(self, meta_now: dict, resume: bool | int) -> tuple[ResumePoint, RunStore]:
        """Check the live state against the recorded run and open it to append."""
        run = Run(self.path)
        if run.format_version != fmt.FORMAT_VERSION:
            raise FormatError(f"{self.path} was recorded in format v{run.format_version}; this "
                              f"attrib appends v{fmt.FORMAT_VERSION} steps only, so it can't "
                              "resume it: record the continuation into a new directory")
        factors.restore(self.captures, [p.name for p in self.params],
                        [p.param.numel() for p in self.params], run.capture)
        meta_now = {**meta_now, "capture": self._capture_meta()}
        point = prepare(run, resume, meta_now, self._params_table().to_pylist(),
                        {p.name: p.param.detach().cpu() for p in self.params}, self.optimizer,
                        self.spec, [p.param for p in self.params])
        store = RunStore.reopen(self.path, run.meta, run.manifest,
                                [s.path for s in self._checkpoint_specs()])
        if store.steps_per_chunk:
            if self.ranks is None:
                store.finish_widening()
            store.open_step_arrays(self._array_specs(store.meta["examples_per_step"]))
        store.manifest["resumes"].append({
            "step": point.step, "discarded_steps": point.discarded, "time": now_iso(),
            "previous_status": point.previous_status,
            "previous_error": store.manifest.get("error")})
        store.manifest.update(status=fmt.Status.RECORDING.value, error=None)
        if point.discarded:
            warnings.warn(f"attrib: resuming {self.path} at step {point.step}; the "
                          f"{point.discarded} steps recorded after it are discarded",
                          stacklevel=3)
        return point, store

    def _continue(self, point: ResumePoint) -> None:
        """Pick the run (cut back by `_open`) up at the resume step: θ̂ from its checkpoint
        (one is taken from the live parameters when the step has none), stage and clock."""
        self._stage = point.stage or DEFAULT_STAGE
        self._started -= point.elapsed
        self._join_at(point.step)
        if point.theta is None:
            self._checkpoint_now()
        else:
            self._last_checkpoint = point.step

    def _join_at(self, step: int) -> None:
        """Record from `step` on, into the step arrays if the run has them yet (a resumed run,
        or a rank joining rank 0's run: a new one at 0, a resumed one at its resume step)."""
        self.step = self._writer.committed_steps = step
        store = self._writer.store
        if store.steps_per_chunk:
            world = self.ranks.world if self.ranks is not None else 1
            self._attach_step_arrays(store.meta["examples_per_step"] // world)

    def _metadata(self, codecs: Codecs, user: dict[str, Any]) -> dict:
        from attrib import __version__

        return {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "created": now_iso(),
            "attrib_version": __version__,
            "torch_version": torch.__version__,
            "optimizer": optim_info.static_config(self.spec, self.optimizer),
            "n_groups": len(self.optimizer.param_groups),
            "hparam_names": list(fmt.HPARAM_NAMES),
            "step_state": list(self.spec.step_state),
            "checkpoint_state": list(self._checkpoint_state_names),
            "record_grads": self.record_grads,
            "trajectory": (None if all(self._recorded) or not self.record_grads
                           else [p.name for p in self.params if self._recorded[p.index]]),
            "grad_dtype": self.grad_dtype,
            "checkpoint_every": self.checkpoint_every,
            "check_every": self.check_every,
            "steps_per_chunk": None,  # set at the first step
            "examples_per_step": None,
            "every_chunk_stored": True,  # array_docs.writable: all-fill chunks are written too
            "capture": self._capture_meta(),
            "residual_params": ([self.params[i].name for i in self._capture.unsupported]
                                if self._capture is not None else []),
            "codec": codecs.describe(),
            "rng": self._rng is not None,
            "stochastic_modules": self._stochastic,
            "initial_step_count": [optim_info.step_count(self.optimizer.state.get(p.param, {}))
                                   for p in self.params],
            "user": user,
            "distributed": self.ranks.describe() if self.ranks is not None else None,
        }

    def _capture_meta(self) -> dict[str, dict]:
        return {p.name: c.describe() for p, c in zip(self.params, self.captures) if c.any}

    def _params_table(self):
        rows = [{"index": p.index, "name": p.name, "key": p.key, "shape": list(p.param.shape),
                 "numel": p.param.numel(), "dtype": str(p.param.dtype).removeprefix("torch."),
                 "layer_type": p.layer_type, "module": p.module, "group": p.group}
                for p in self.params]
        return pa.Table.from_pylist(rows, schema=fmt.PARAMS)

    # -- user API ------------------------------------------------------------------------------
    def examples(self, ids: Any, tokens: Any = None) -> None:
        """Declare the example ids of the micro-batch whose loss is backpropagated next.

        `tokens`: the examples' token ids ((examples, length) integer tensor, or a sequence
        per example), kept once per example in the `tokens` table for token enrichment.
        """
        if not self._enabled:
            return
        array = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise ValueError(
                f"rec.examples() takes a 1-D sequence of integer example ids, got an array of "
                f"shape {array.shape} and dtype {array.dtype}"
            )
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int64).max):
            raise ValueError(
                f"rec.examples() ids must lie in [0, 2^63) (stored as int64), got "
                f"{array.min()}…{array.max()}; number the examples from 0, e.g. by their "
                "position in the dataset")
        batch = token_batch(array, tokens) if tokens is not None else None
        self._guard(self._begin_next_step)
        if batch is not None:
            self._tokens.append(batch)
        self._examples.append(array.astype(np.int64))
        self._example_values.append({})
        if self._capture is not None:
            self._capture.begin_micro_batch(len(array))

    def log(self, **scalars: Any) -> None:
        """Attach scalars to the step table: `loss=` fills the loss column, others `metrics`.

        Called after `opt.step()`, values belong to that step; called before it (after the
        step's backward or `examples()`), to the step about to run.
        """
        if not self._enabled:
            return
        for name, value in scalars.items():
            try:  # checked here: the writer would fail on it later, steps after the fact
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"rec.log(): the metric name {name!r} is not valid Unicode "
                                 "text (a lone surrogate?); name it with plain text") from None
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 or value.is_complex():
                    raise ValueError(f"rec.log({name}=...) needs a real scalar, got "
                                     f"{value.numel()} {value.dtype} values")
                value = _host(value.reshape(()))
            elif isinstance(value, (int, float, np.integer, np.floating)):
                try:  # stored as float64: a Python int beyond int64 (10**30) is fine as one
                    value = float(value)
                except OverflowError:
                    raise ValueError(f"rec.log({name}=...) got {value}, beyond float64's "
                                     "range") from None
            else:
                raise TypeError(f"rec.log({name}=...) needs a number, got {type(value).__name__}")
            target = (self._pending.row if self._after_step and self._pending is not None
                      else self._upcoming)
            if name == "loss":
                target["loss"] = value
            else:
                target["metrics"][name] = value

    def log_examples(self, **values: Any) -> None:
        """Per-example values (`loss=`, `f=`) of the micro-batch declared last, one per id,
        for the examples table (e.g. `F.cross_entropy(logits, y, reduction="none")`)."""
        if not self._enabled:
            return
        if not self._examples:
            raise RuntimeError("rec.log_examples() needs a micro-batch: call rec.examples(ids) "
                               "first")
        for name, value in values.items():
            if name not in fmt.EXAMPLE_VALUES:
                raise ValueError(f"rec.log_examples() takes {fmt.EXAMPLE_VALUES}, got {name!r}")
            tensor = torch.as_tensor(value).detach().reshape(-1)
            if len(tensor) != len(self._examples[-1]):
                raise ValueError(f"rec.log_examples({name}=...) has {len(tensor)} values for a "
                                 f"micro-batch of {len(self._examples[-1])} examples")
            self._example_values[-1][name] = _host(tensor)

    def stage(self, name: str) -> None:
        """Mark the start of a named training stage at the next optimizer step."""
        if not isinstance(name, str) or not name:
            raise ValueError("a stage name must be a non-empty string")
        self._stage = name

    def epoch(self, epoch: int) -> None:
        """Set the epoch number stored with the following steps."""
        self._epoch = int(epoch)

    def close(self, status: fmt.Status | None = None) -> None:
        """Flush and commit every recorded step, then mark the run's status."""
        if self._closed:
            return
        self._closed = True
        lifecycle.untrack(self)
        for handle in self._handles:
            handle.remove()
        if self._capture is not None:
            self._capture.remove()
        if self._rng is not None:
            self._rng.remove()
        if self._enabled:
            self._guard(self._submit_final)
        elif self._writer.error is None and self._block is not None:
            # keep the steps recorded before the failure; θ has moved on, so no final checkpoint
            self._guard(self._writer.submit, self._block)
        self._writer.close()
        store = self._writer.store
        if self._writer.error is not None:
            if self._failure is None and not self.strict:  # found only now: say so
                warnings.warn(f"attrib: recording stopped: the background writer failed "
                              f"({self._writer.error!r}); the {self._writer.committed_steps} "
                              "steps written before it are kept and the run is marked "
                              "incomplete", stacklevel=3)
            self._failure = self._failure or f"background writer failed: {self._writer.error!r}"
            store.manifest["error_trace"] = self._writer.error_trace
        if self._failure is not None:
            store.manifest["error"] = self._failure
            if status is not fmt.Status.CRASHED:
                status = fmt.Status.INCOMPLETE
        self._guard(self._finalize, status or fmt.Status.COMPLETE)
        if self.strict and self._writer.error is not None:
            raise RecordingError(self._failure) from self._writer.error

    def _finalize(self, status: fmt.Status) -> None:
        """Merge table parts (complete runs) and write the final status (guarded: a full disk
        here must not fail the user's program after training finished)."""
        store = self._writer.store
        if not self._primary:  # rank 0 finalizes once this marker says the rank is done
            self._writer.stopped = self._writer.stopped or self._failure
            self._writer.publish(closed=True)
            return
        if self.ranks is not None:
            status = self._gather_ranks(status)
        if self._failure is None:
            for table in ("steps", "examples", "shifts", "rng", "tokens"):
                store.compact(table)
        store.trim()
        store.commit(self._writer.committed_steps, status)

    def _gather_ranks(self, status: fmt.Status) -> fmt.Status:
        """Rank 0 at close: list every rank's last parts; if any rank stopped recording
        (or this one did), keep only the steps all ranks wrote, and say why."""
        markers = self._writer.gather_ranks(closed=True)
        stopped = [f"rank {r + 1} stopped recording: {m['error']}"
                   for r, m in enumerate(markers) if m.get("error")]
        if self._failure is None and not stopped:
            return status
        self._failure = self._failure or stopped[0]
        self._writer.cut(min([self._writer.committed_steps]
                             + [m["committed_steps"] for m in markers]))
        self._writer.store.manifest["error"] = self._failure
        return status if status is fmt.Status.CRASHED else fmt.Status.INCOMPLETE

    def _submit_final(self) -> None:
        """Hand over the last (partial) block and θ_N, as a checkpoint unless one was taken."""
        self._begin_next_step()
        if self._block is not None:
            self._writer.submit(self._block)
        if self.step != self._last_checkpoint and self._primary:
            self._checkpoint_now()

    def _checkpoint_now(self) -> None:
        """θ at the next step as a checkpoint, off the step path (start, resume, close)."""
        self._writer.add_checkpoint(self.step, _snapshot(self.params, self.optimizer,
                                                         self._checkpoint_state_names))
        self._last_checkpoint = self.step

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(fmt.Status.CRASHED if exc_type is not None else None)

    def close_unfinished(self, warning: str, failure: str) -> None:
        """Close a recorder the script did not close (recorder/lifecycle.py): at exit, or on
        SIGTERM. Every step trained so far is committed; the run is marked incomplete."""
        warnings.warn(f"attrib: Recorder for {self.path} {warning}; closing it and marking "
                      "the run incomplete", stacklevel=1)
        self._failure = self._failure or failure
        try:
            self.close(fmt.Status.INCOMPLETE)
        except Exception as e:
            warnings.warn(f"attrib: closing {self.path} failed ({e!r})", stacklevel=1)

    # -- failure policy ------------------------------------------------------------------------
    def _guard(self, fn, *args):
        """Run recorder work so that its failure never breaks training unless strict."""
        try:
            return fn(*args)
        except Exception as e:
            if self.strict:
                raise RecordingError(f"attrib recording failed at step {self.step}: {e}") from e
            self._enabled = False
            if self._capture is not None:
                self._capture.enabled = False
            if self._rng is not None:
                self._rng.enabled = False
            self._failure = f"recording stopped at step {self.step}: {e!r}"
            self._writer.tell_primary(self._failure)
            warnings.warn(f"attrib: {self._failure}; training continues, the run is marked "
                          "incomplete (pass strict=True to raise instead)", stacklevel=3)
            return None

    # -- hooks -----------------------------------------------------------------------------------
    def _grad_hook(self, param: torch.Tensor) -> None:
        """A .grad was accumulated: at the end of this backward (under DDP: once .grad is
        all-reduced) note ‖.grad‖ of every tensor, the last backward before step() sees G_s
        before the user clips it. One batched norm per backward, not one per tensor."""
        if self._enabled:
            if not self._norms_pending:
                self._norms_pending = True
                (distributed.after_backward if self.ranks is None
                 else distributed.after_reduction)(self._note_norms)
            self._after_step = False

    def _note_norms(self) -> None:
        self._norms_pending = False
        present = [p for p in self.params if p.param.grad is not None]
        norms = torch._foreach_norm([p.param.grad.detach() for p in present])
        for p, norm in zip(present, norms):
            self._pre_clip_norms[p.index] = norm

    def _begin_next_step(self) -> None:
        """The last step's row is final: a full block can go to the writer."""
        self._pending = None
        self._after_step = False
        if self._block is not None and self._block.full:
            self._warn_moved()
            self._writer.submit(self._block)
            self._block = self._writer.acquire(self.step)
            if self._block.lean and not self._dropped_before:
                self._dropped_before = True
                warnings.warn(f"attrib: the disk is behind at step {self.step}; per-example "
                              "data of such steps is dropped (backpressure='drop_examples'), "
                              "the trajectory is kept and steps.examples_dropped says which",
                              stacklevel=4)

    def _warn_moved(self) -> None:
        """Warn where θ changed between a step's end and the next step's start: an in-place
        edit or `.data =` outside the optimizer, which a replay of the gradients can't see."""
        moved, self._moved = self._moved, []
        for step, changed in moved:
            if changed.any():
                names = [p.name for p, c in zip(self.params, changed.tolist()) if c]
                warnings.warn(
                    f"attrib: parameters {names} changed between step {step - 1} and step "
                    f"{step} outside the optimizer (an in-place edit or .data =): the recorded "
                    "gradients don't explain that change, so replays and influences of this run "
                    "are wrong from there on (`attrib verify` flags it). Change parameters "
                    "through the optimizer, or start a new run after the edit",
                    stacklevel=4)
                return

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if not self._enabled:
            return
        started = time.perf_counter()
        self._guard(self._before_step)
        self._hook_seconds += time.perf_counter() - started

    def _before_step(self) -> None:
        """Hand a full block to the writer, refuse a model or optimizer changed since attach
        (before anything reads its tensors), and take θ's fingerprint before the step."""
        self._begin_next_step()
        self._check_unchanged([p.param.grad for p in self.params])
        if self.spec.kind == "sgd":  # SGD's first momentum step skips dampening (K_{s,s})
            self._had_buffer = [self.optimizer.state.get(p.param, {}).get("momentum_buffer")
                                is not None for p in self.params]
        if self._primary:
            # every step: an edit through `p.data` leaves p's version counter and storage as
            # they were, so only the values tell
            self._before = self._fingerprint([p.param for p in self.params])
            if self._after is not None:
                moved = (self._before != self._after) & ~(self._before.isnan()
                                                           & self._after.isnan())
                self._moved.append((self.step, moved))
                if not self._on_gpu:  # on a GPU this would wait for the step: once per block
                    self._warn_moved()

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self._enabled:
            return
        started = time.perf_counter()
        record = self._guard(self._capture_step)
        if record is not None:
            self._hook_seconds += time.perf_counter() - started
            record.row["record_seconds"] = self._hook_seconds
            self._hook_seconds = 0.0
            self._pending = record
            self._after_step = True
            self.step += 1

    def _capture_step(self) -> StepRecord:
        """Write step `self.step` into the next row of the block buffers.

        Batched tensor ops and copies into preallocated memory; loops run over parameter
        tensors only, never over examples or coordinates.
        """
        consumed = [p.param.grad for p in self.params]
        thawed = [p.name for p, g in zip(self.params, consumed) if g is not None
                  and not p.trained_at_attach]
        if thawed:
            self._say("thawed", f"step {self.step}: parameters {thawed} were frozen when "
                      "Recorder attached and now train: their trajectory is recorded, but not "
                      "their per-example rows or their pre-clip norm (the clip factor leaves "
                      "them out); attach a new Recorder after unfreezing parameters")
        data = (self._capture.end_step(self._checks(self.step + 1))
                if self._capture is not None else None)
        if self._block is None:
            if data is not None:  # Factored: factors or full rows, by what this step used
                factors.settle(self.captures, [tuple(p.param.shape) for p in self.params],
                               data, self._capture.consume)
            rows = self._examples_per_step or (
                data.rows if data else sum(len(ids) for ids in self._examples))
            if self._capture is not None and not rows:
                raise ValueError(
                    f"per-example capture lays its rows out by the first step's examples, and "
                    f"step {self.step} declared none: call rec.examples(ids) before every "
                    "step's forward from the first one on, or record with capture=False")
            self._initialize_storage(rows)
        elif data is not None and data.rows > self._example_capacity and self.ranks is None:
            self._widen_examples(data.rows)
        row_index = len(self._block.records)
        rows = {path: buffer[row_index] for path, buffer in self._block.buffers.items()}
        live = [p.param.detach() for p in self.params]

        used = [g.detach() for g in consumed if g is not None]
        pre_norms = [n if n is not None else torch.linalg.vector_norm(g.detach())
                     for n, g in zip(self._pre_clip_norms, consumed) if g is not None]
        self._pre_clip_norms = [None] * len(self.params)
        self._norms_pending = False  # also after a backward that raised before its end
        clip_factor, uniform, grad_norm = _clip_factor(used, pre_norms)
        self._warn_if_not_finite(grad_norm)
        hparams = [optim_info.group_hparams(self.spec, g) for g in self.optimizer.param_groups]
        if self._primary:
            self._trajectory_rows(rows, live, consumed, clip_factor, hparams)
        shifts = (self._store_examples(data, rows, consumed, clip_factor, grad_norm, hparams)
                  if data is not None else None)

        row = {
            "step": self.step, "epoch": self._epoch, "stage": self._stage,
            "lr": [h["lr"] for h in hparams],
            "loss": self._upcoming["loss"], "metrics": self._upcoming["metrics"],
            "grad_norm": _host(grad_norm), "clip_factor": _host(clip_factor),
            "clip_uniform": _host(uniform), "update_norm": None,
            "n_examples": (int(sum(len(e) for e in self._examples))
                           * (self.ranks.world if self.ranks is not None else 1)
                           if self._examples else None),
            "time": time.perf_counter() - self._started,
        }
        if data is not None:
            self._hook_seconds += data.seconds
        record = StepRecord(self.step, row, self._examples, self._example_values, shifts=shifts,
                            rng=self._rng.take() if self._rng is not None else [],
                            tokens=self._tokens)
        self._upcoming = {"metrics": {}, "loss": None}
        self._examples = []
        self._example_values = []
        self._tokens = []
        if (self.step + 1) % self.checkpoint_every == 0 and self._primary:
            record.checkpoint = _snapshot(self.params, self.optimizer,
                                          self._checkpoint_state_names)
            self._last_checkpoint = self.step + 1
        self._block.records.append(record)
        return record

    def _widen_examples(self, rows: int) -> None:
        """A step with more examples than any before it (a short first batch): the steps so
        far go to the writer as they are, the per-example arrays widen to `rows` per step (the
        rows earlier steps left empty read as the fill value, as a short batch's do), and the
        next steps go into new buffers that wide."""
        self._warn_moved()
        self._writer.submit(self._block)
        self._writer.widen_examples(rows)
        self._attach_step_arrays(rows)

    def _trajectory_rows(self, rows: dict[str, torch.Tensor], live: list[torch.Tensor],
                         consumed: list[torch.Tensor | None], clip_factor: torch.Tensor,
                         hparams: list[dict[str, float]]) -> None:
        """The step's gradients, θ fingerprints and hyperparameters into the block row (rank 0
        only in a distributed run: every rank holds the same)."""
        for p, g in zip(self.params, consumed):
            if not self._recorded[p.index]:  # record_grads=False or left out by trajectory=
                continue
            target = rows[f"{fmt.GRADS}/{p.key}"]
            if g is None:
                target.zero_()
            elif self.grad_dtype == "bfloat16":  # its bits, in an int16 array
                target.copy_(g.detach().to(torch.bfloat16).view(torch.int16), non_blocking=True)
            else:
                target.copy_(g.detach(), non_blocking=True)
        fingerprint = rows[fmt.FINGERPRINT]
        fingerprint[0].copy_(self._before, non_blocking=True)
        self._after = self._fingerprint(live)
        fingerprint[1].copy_(self._after, non_blocking=True)
        for name in fmt.HPARAM_NAMES:
            rows[f"{fmt.HPARAMS}/{name}"].copy_(torch.tensor([h[name] for h in hparams],
                                                             dtype=torch.float64))
        rows[fmt.CLIP_FACTOR].copy_(clip_factor, non_blocking=True)
        rows[fmt.STEP_COUNT].copy_(torch.tensor(
            [optim_info.step_count(self.optimizer.state.get(p.param, {})) for p in self.params]))
        rows[fmt.ACTIVE].copy_(torch.tensor([g is not None for g in consumed]))

    def _check_unchanged(self, consumed: list[torch.Tensor | None]) -> None:
        """Refuse to record a model or optimizer changed since the recorder attached: the
        stored arrays and the analysis assume the same tensors throughout."""
        fix = ("attach a new Recorder (a new run) after changing the model or optimizer, and "
               "keep each run's model as it was")
        if sum(len(g["params"]) for g in self.optimizer.param_groups) != len(self.params):
            raise RecordingError("the optimizer's parameters changed after Recorder was attached "
                                 f"(add_param_group()?); {fix}")
        for p in self.params:
            if (tuple(p.param.shape), p.param.dtype) != p.layout:
                raise RecordingError(
                    f"parameter {p.name} is now {p.param.dtype} of shape "
                    f"{tuple(p.param.shape)}, not {p.layout[1]} of shape {p.layout[0]} as when "
                    f"Recorder was attached; {fix}")
        if any(g is None for g in consumed):  # cheap trigger: a replaced module leaves its
            owned = {id(q) for q in self._model.parameters()}  # old parameters without grads
            gone = [p.name for p in self.params if id(p.param) not in owned]
            if gone:
                raise RecordingError(f"parameters {gone} are no longer part of the model (a "
                                     f"module was replaced after Recorder was attached); {fix}")

    def _store_examples(self, data: StepData, rows: dict[str, torch.Tensor],
                        consumed: list[torch.Tensor | None], clip_factor: torch.Tensor,
                        grad_norm: torch.Tensor, hparams: list[dict[str, float]]):
        """Per-example rows of this step, the invariant Σ_i c_i = G checked per tensor, and
        the step's TopK shifts (per policy; None without one), whose table the writer makes."""
        problem = self._capture.uncaptured(data, [g is not None for g in consumed])
        if problem is not None:
            self._say(problem, f"step {self.step}: {problem}. The step's per-example data is "
                      "missing and its gradient is recorded as residual")
        if data.rows > self._example_capacity:  # distributed: other ranks write beside ours
            raise RecordingError(
                f"step {self.step} declared {data.rows} examples, but the per-example arrays "
                f"hold {self._example_capacity} per step (the first step's count); pass "
                f"examples_per_step={data.rows} (or more) to Recorder; in a distributed run "
                "every rank needs the same batch size")
        short: set[int] = set()
        initial: list[float] = []  # NaN where not checked at all, 0 where no gradient came
        checked, befores, sums = [], [], []  # the tensors whose Σ_i c_i = G is checked
        for p, capture, g in zip(self.params, self.captures, consumed):
            if capture.full is not None and not self._block.lean:
                scatter_rows(data.full.get(p.index, []), rows[f"{fmt.CONTRIB}/{p.key}"])
            if capture.project is not None and not self._block.lean:
                scatter_rows(data.projected.get(p.index, []), rows[f"{fmt.PROJ}/{p.key}"])
            if (capture.tokens is not None and not self._block.lean
                    and not self._store_factors(p, capture.tokens, data, rows)):
                short.add(p.index)
            unchecked = not capture.any or not data.checked
            # rows missing altogether read 1 checked or not: no sums needed to know that
            lost = (capture.any and self.ranks is None and g is not None
                    and (p.index not in data.reached or p.index in short))
            initial.append(1.0 if lost and unchecked else math.nan if unchecked else 0.0)
            if unchecked or g is None:
                continue
            check = capture.check  # Σ_i R c_i against R G (see TensorCapture)
            checked.append(p.index)
            befores.append(g.detach() if check is None else pe.project_tensor(
                g.detach(), check.kind, check.k, check.seed, p.name))
            sums.append(data.sums.get(p.index))
        # relative to the tensor's gradient, or to RESIDUAL_FLOOR of the whole step's when the
        # tensor's is smaller: a gradient that is zero in exact arithmetic (attention's key
        # bias; a bias whose every example's terms cancel) is float32 rounding of thousands of
        # cancelling token terms, ~1e-7 of the step's norm, which would read as a large residual
        floor = (RESIDUAL_FLOOR * grad_norm.double()).clamp_min(1e-300)
        norms = torch.tensor(initial, dtype=torch.float64, device=clip_factor.device)
        if checked:
            norms[torch.tensor(checked, device=norms.device)] = residuals.relative_gaps(
                befores, sums, clip_factor, floor)
        if fmt.RESIDUAL_NORM in rows:
            rows[fmt.RESIDUAL_NORM].copy_(norms, non_blocking=True)
        if problem is None and checked and not self._on_gpu:  # on a GPU it would wait
            self._check_explained(norms, short)
        return self._top_shifts(data, clip_factor, hparams)

    def _checks(self, step: int) -> bool:
        """Whether step `step` checks Σ_i c_i = G: every step of the first CHECK_EVERY, then
        every `check_every`-th; never in a distributed run, where each rank sees its own
        examples of the averaged G."""
        return self.ranks is None and (step < CHECK_EVERY or step % self.check_every == 0)

    def _store_factors(self, p: TrackedParam, slots: int, data: StepData,
                       rows: dict[str, torch.Tensor]) -> bool:
        """The step's factor pairs into their buffers; an example that needs more token slots
        than the run keeps loses its rows of this tensor (its gradient becomes residual, said
        here): returns whether the rows were stored."""
        needed = factors.scatter(data.factors.get(p.index, []),
                                 rows[f"{fmt.FACTOR_LEFT}/{p.key}"],
                                 rows[f"{fmt.FACTOR_RIGHT}/{p.key}"],
                                 self.captures[p.index].factored.rank)
        if needed > slots:
            data.sums.pop(p.index, None)
            self._say(f"tokens {p.name}", (
                f"step {self.step}: {p.name!r} needs {needed} factor slots per example, and the "
                f"run keeps {slots} (what its first step used): its rows of this step are "
                f"recorded as residual; pass Factored(tokens={needed}) or more"))
            return False
        return True

    def _warn_if_not_finite(self, grad_norm: torch.Tensor) -> None:
        """Say (once) at the step where the gradient turns NaN or inf: the training diverged,
        and every θ after it is non-finite by construction, which verify and the analyses
        would otherwise be the first to show. On the CPU only (on a GPU it would wait)."""
        if self._on_gpu or "not finite" in self._problems_seen or bool(torch.isfinite(grad_norm)):
            return
        self._problems_seen.add("not finite")
        warnings.warn(f"attrib: step {self.step}: the gradient is not finite (NaN or inf: the "
                      "loss diverged or overflowed); it is recorded as the optimizer consumed "
                      "it, so θ after this step is not finite either", stacklevel=6)

    def _check_explained(self, norms: torch.Tensor, said: set[int]) -> None:
        """Say where captured rows explain only part of a tensor's gradient: a use the hooks
        do not see (`h @ emb.weight.T` in plain code, say) leaves it in the residual."""
        known = set(self._capture.unsupported) | said | {
            i for g in self._capture.groups if g.failed for i in g.params.values()}
        partial = [p.name for p, r in zip(self.params, norms.tolist())
                   if r > residual_warning(p.param.dtype) and p.index not in known]
        if partial:
            self._say(f"partial {partial}", (
                f"step {self.step}: the per-example rows of {partial} explain only part of "
                f"their gradient (residual up to {float(norms.nan_to_num(0).max()):.2g}): a "
                "use outside any module's forward (e.g. `h @ emb.weight.T`) or by a module "
                "the capture does not see. The rest is recorded as residual; use the tensor "
                "through a module (an nn.Linear whose weight is tied to it) to capture it"))

    def _say(self, kind: str, message: str) -> None:
        """A capture problem: raised under strict=True, else warned once per kind."""
        if self.strict:
            raise RecordingError(message)
        if kind not in self._problems_seen:  # once per kind of problem, not per step
            self._problems_seen.add(kind)
            warnings.warn(f"attrib: {message}", stacklevel=6)

    def _top_shifts(self, data: StepData, clip_factor: torch.Tensor,
                    hparams: list[dict[str, float]]):
        groups: dict[TopK, list[ShiftInput]] = {}
        for p, capture in zip(self.params, self.captures):
            if capture.topk is None or p.index not in data.topk:
                continue
            group = self.optimizer.param_groups[p.group]
            coefficient = optim_info.immediate_coefficient(
                self.spec, hparams[p.group], bool(group.get("nesterov", False)),
                self.optimizer.state.get(p.param, {}), not self._had_buffer[p.index])
            groups.setdefault(capture.topk, []).append(ShiftInput(
                p.name, tuple(p.param.shape), data.topk[p.index], coefficient,
                capture.topk.k))
        if not groups:
            return None
        ids = np.concatenate(self._examples) if self._examples else np.zeros(0, np.int64)
        return [top_shifts(items, policy.scope, policy.k, clip_factor, self.step, self._epoch,
                           ids) for policy, items in groups.items()]


def _clip_factor(consumed: list[torch.Tensor], pre_norms: list[torch.Tensor]):
    """α = ‖G̃‖/‖G‖ and whether .grad was a uniform rescale of G (per-tensor norm ratios)."""
    if not consumed:
        one = torch.ones((), dtype=torch.float64)
        return one, torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.float64)
    after = torch.stack(torch._foreach_norm(consumed)).double()
    before = torch.stack(pre_norms).double().to(after.device)
    grad_norm = torch.linalg.vector_norm(before)
    factor = torch.where(grad_norm > 0, torch.linalg.vector_norm(after) / grad_norm,
                         torch.ones_like(grad_norm))
    uniform = ((after - factor * before).abs() <= 1e-4 * after.abs() + 1e-30).all()
    return factor, uniform, grad_norm
