"""Per-example capture engine: module hooks that turn each backward into per-example data.

A forward hook remembers a module call's inputs and puts a hook on its output; when backward
reaches that output, the call's per-example contributions are computed (recorder/per_example.py)
and transformed by each parameter's policy (full rows, a projection, or kept for TopK) into the
rows of the examples that micro-batch declared with `rec.examples(ids)`.
"""

from __future__ import annotations

import fnmatch
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from attrib.recorder import per_example as pe
from attrib.recorder import recurrent
from attrib.recorder.coupling import NORMS, BatchNormCoupling
from attrib.recorder.policies import TensorCapture


class UnsupportedModuleError(TypeError):
    pass


@dataclass
class ModuleGroup:
    """A module whose calls produce contributions for some tracked parameters."""

    module: nn.Module
    path: str
    params: dict[str, int]  # module-relative parameter name → tracked parameter index
    rule: pe.Rule | None  # None: generic vmap fallback
    failed: str | None = None  # why capture stopped for this module (its gradient is residual)


@dataclass
class StepData:
    """What one step's backward passes produced, per tracked parameter index."""

    rows: int  # examples declared this step
    full: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    projected: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    topk: dict[int, list[tuple[int, pe.PerExample]]] = field(default_factory=dict)  # factored
    factors: dict[int, list[tuple[int, pe.Outer]]] = field(default_factory=dict)  # Factored
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # Σ_i c_i per parameter
    seconds: float = 0.0  # time spent computing contributions during backward
    checked: bool = True  # whether this step's Σ_i c_i = G is checked (Recorder(check_every))
    reached: set[int] = field(default_factory=set)  # parameters some call gave rows to


def assign_modules(model: nn.Module, names: list[str], captures: list[TensorCapture],
                   strict: bool) -> tuple[list[ModuleGroup], list[int]]:
    """Which module computes each captured parameter's contributions.

    Returns the groups and the indices of parameters no path can handle (their gradient is the
    run's residual); in strict mode those raise instead.
    """
    index = {n: i for i, n in enumerate(names) if captures[i].any}
    # a tensor is tracked under its first owner's name (model.named_parameters()); every module
    # holding it (tied embedding and output weights) contributes, matched by identity
    canonical: dict[int, str] = {}
    for path, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            canonical.setdefault(id(p), f"{path}.{local}" if path else local)
    inside_attention: set[int] = set()  # out_proj is called functionally inside MHA
    groups: list[ModuleGroup] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            own = {local: index[canonical[id(p)]] for local, p in module.named_parameters()
                   if canonical[id(p)] in index}
            if own:
                groups.append(ModuleGroup(module, path, own, pe.mha_rule
                                          if pe.mha_supported(module) else None))
                inside_attention.update(own.values())
    unsupported: list[int] = []
    refused: dict[str, tuple[nn.Module, list[str]]] = {}  # module path → (module, names)
    by_module: dict[str, ModuleGroup] = {}
    for path, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            full = canonical[id(p)]
            i = index.get(full)
            if i is None or i in inside_attention:
                continue
            if _refusal(module) is not None:
                refused.setdefault(path, (module, []))[1].append(full)
                unsupported.append(i)
                continue
            group = by_module.get(path)
            if group is None:
                group = ModuleGroup(module, path, {}, recurrent.rule
                                    if isinstance(module, nn.RNNBase)
                                    else pe.closed_form_rule(module))
                by_module[path] = group
                groups.append(group)
            group.params[local] = i
    for module, refused_names in refused.values():  # one message per module
        message = (f"{refused_names} belong to {type(module).__name__}, {_refusal(module)} or "
                   "exclude it from capture (its gradient is then recorded as residual)")
        if strict:
            raise UnsupportedModuleError(message)
        warnings.warn(f"attrib: {message}", stacklevel=3)
    return groups, unsupported


def _refusal(module: nn.Module) -> str | None:
    """Why no per-example path handles `module`'s parameters, or None."""
    if isinstance(module, NORMS):  # batch statistics couple the examples
        return ("whose batch statistics make per-example gradients undefined; freeze it, use "
                "LayerNorm/GroupNorm,")
    problem = recurrent.unsupported(module) if isinstance(module, nn.RNNBase) else None
    if problem is not None:
        return f"whose per-example capture does not cover it: {problem};"
    return None


def _scaled(g: torch.Tensor, scale: float) -> torch.Tensor:
    return g.detach() if scale == 1.0 else g.detach() * scale


def _tensors(value) -> list[torch.Tensor]:
    """A recurrent layer's final state: h_n, or (h_n, c_n)."""
    return list(value) if isinstance(value, tuple) else [value]


class ExampleCapture:
    """Hooks on the model that collect per-example contributions between optimizer steps."""

    def __init__(self, model: nn.Module, names: list[str], shapes: list[tuple[int, ...]],
                 captures: list[TensorCapture], strict: bool, scale: float = 1.0,
                 shared: Sequence[str] = ()) -> None:
        self.names, self.shapes, self.captures = names, shapes, captures
        self.scale = scale  # contributions are linear in the output gradient: scale it once
        self.groups, self.unsupported = assign_modules(model, names, captures, strict)
        self._shared = declared_shared(self.groups, shared)  # see Recorder(shared=...)
        self.enabled = True
        self.strict = strict
        self._recomputing = False
        self._batch: int | None = None
        self._offset = 0
        self._data = StepData(rows=0)
        self._mismatch: str | None = None  # a forward on a batch of another size, this step
        self._lost: str | None = None  # ... whose output backward reached: its rows are lost
        self._positions_said: set[str] = set()  # see _warn_if_positions
        self._model_batch: tuple[int, ...] = ()  # leading sizes of the model call's input
        self._handles = [g.module.register_forward_hook(self._forward_hook(g), with_kwargs=True)
                         for g in self.groups]
        self._handles.append(model.register_forward_pre_hook(self._note_model_input,
                                                             with_kwargs=True))
        self.coupling = BatchNormCoupling(model, names, strict)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.coupling.remove()
        pe.release_factors()

    def _note_model_input(self, module, args, kwargs) -> None:
        """The leading sizes of the model call's first tensor input: a call on the declared
        micro-batch has the batch among them; an auxiliary call on `x[:1]` does not."""
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self._model_batch = tuple(first.shape[:2]) if first is not None else ()

    def factorable(self, index: int) -> bool:
        """Whether every call that computes tensor `index`'s contributions hands them over as
        factors (per_example.FACTORED), so policies.Factored can store those."""
        uses = [(g.rule, local) for g in self.groups for local, i in g.params.items()
                if i == index]
        return bool(uses) and all(local in pe.FACTORED.get(rule, ()) for rule, local in uses)

    def begin_micro_batch(self, n: int) -> None:
        """The next forward/backward carries the `n` examples just declared."""
        self._batch = n
        self.coupling.start()
        self._offset = self._data.rows
        self._data.rows += n

    def expect_step(self, checked: bool) -> None:
        """Collect the first step after attaching or resuming afresh, checked or not."""
        self._data = StepData(rows=0, checked=checked)

    def end_step(self, check_next: bool = True) -> StepData:
        """Hand over this step's data and start collecting the next step's (whose sums Σ_i c_i
        are computed only when `check_next`)."""
        data, self._data = self._data, StepData(rows=0, checked=check_next)
        self._batch = None
        self.coupling.active = False
        return data

    def uncaptured(self, data: StepData, active: list[bool]) -> str | None:
        """Why a step's gradient reached parameters whose per-example rows stayed empty (its
        data influence would silently become residual), or None when nothing is missing."""
        failed = {i for g in self.groups if g.failed for i in g.params.values()}
        missing = [self.names[i] for i, (capture, on) in enumerate(zip(self.captures, active))
                   if on and capture.any and i not in data.reached and i not in failed
                   and i not in self.unsupported]
        mismatch, self._mismatch = self._mismatch, None
        lost, self._lost = self._lost, None
        if lost is not None:
            return f"{lost}; pass one id per example of the micro-batch"
        if not missing:
            return None
        if data.rows == 0:
            return ("loss.backward() ran without rec.examples(ids) before it; call "
                    "rec.examples(ids) before every backward of a training micro-batch")
        if mismatch is not None:
            return f"{mismatch}; pass one id per example of the micro-batch"
        return (f"{missing[:3]} got gradients, but their modules never ran on the declared "
                "micro-batch (parameters used outside their module's forward?)")

    def _note_lost(self, message: str) -> None:
        if self._lost is None:
            self._lost = message

    # -- hooks ---------------------------------------------------------------------------------
    def _forward_hook(self, group: ModuleGroup):
        def hook(module, args, kwargs, output):
            if (not self.enabled or group.failed or self._recomputing
                    or not torch.is_grad_enabled()):
                return
            if (isinstance(module, nn.RNNBase) and self._batch is not None
                    and isinstance(args[0], PackedSequence)):
                self._fail(group, recurrent.RecurrentCaptureError(
                    "packed sequences are not supported; pad the batch"))
                return
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            bdim = pe.batch_dim(module)
            self._warn_if_positions(group, module, args)
            if self._shared_by_batch(group, args, out):
                self.coupling.saw(group.params.values())
                expanded = self._broadcast(group, args, kwargs, out)
                return (expanded, *output[1:]) if isinstance(output, tuple) else expanded
            if self._batch is None or out.dim() <= bdim or out.shape[bdim] != self._batch:
                if self._batch is not None and out.dim() > bdim:
                    message = (f"module {group.path or '(the model)'!r} "
                               f"({type(module).__name__}) ran on a batch of "
                               f"{out.shape[bdim]}, but rec.examples() declared "
                               f"{self._batch} ids")
                    self._mismatch = message
                    # a problem once backward reaches it, even where another micro-batch of
                    # the step was captured (an evaluation pass with grad on never is)
                    out.register_hook(lambda g, m=message: self._note_lost(m))
                return  # not a declared micro-batch (an evaluation pass, say)
            data, offset, batch = self._data, self._offset, self._batch
            self.coupling.saw(group.params.values())
            if isinstance(module, nn.RNNBase):  # the loss may read h_n (and c_n) too
                outputs = [out, *_tensors(output[1])]
                torch.autograd.graph.register_multi_grad_hook(
                    outputs, lambda grads: self._on_output_grad(group, args, kwargs,
                                                                list(grads), data, offset, batch))
                return
            out.register_hook(lambda g: self._on_output_grad(group, args, kwargs, g, data,
                                                             offset, batch))
        return hook

    def _shared_by_batch(self, group: ModuleGroup, args: tuple, out: torch.Tensor) -> bool:
        """An Embedding looked up with positions the micro-batch shares: consecutive indices
        without a batch dimension (nanoGPT's `wpe(torch.arange(T))`) or with one of size 1
        (Hugging Face's `position_ids`); its output broadcasts over the batch. Nothing else is
        widened: other indices whose first dimension is not the batch's (`x[:1]`'s tokens) may
        not be broadcast, and widening them would change what the model computes; nor are the
        positions of a model call whose input does not hold the declared batch (an auxiliary
        forward on `x[:1]`). Those read as a micro-batch of another size. A 1-d index tensor
        as long as the batch reads as batched: the two can't be told apart. Modules named in
        Recorder(shared=...) are widened on any input with a batch dimension of 1."""
        module, ids = group.module, (args[0] if args else None)
        if self._batch is None or (self._model_batch and self._batch not in self._model_batch):
            return False
        if group.path in self._shared:
            bdim = pe.batch_dim(module)
            return (self._batch > 1 and isinstance(ids, torch.Tensor) and ids.dim() > bdim
                    and ids.shape[bdim] == 1 and out.dim() > bdim and out.shape[bdim] == 1)
        if (not isinstance(module, nn.Embedding)
                or not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2)
                or ids.shape[0] == self._batch or (ids.dim() == 2 and ids.shape[0] != 1)):
            return False
        row = ids.reshape(-1)
        return torch.equal(row, row[:1] + torch.arange(len(row), device=row.device))

    def _warn_if_positions(self, group: ModuleGroup, module: nn.Module, args: tuple) -> None:
        """1-d indices exactly as long as the batch read as one per example; when they are
        arange(B) they are more likely positions the batch shares (context length = batch
        size), which would then be attributed wrongly with nothing to flag it. Said once;
        checked on the CPU only (on a GPU the comparison would wait for the forward)."""
        ids = args[0] if args else None
        if (self._batch is None or group.path in self._positions_said
                or not isinstance(module, nn.Embedding) or not isinstance(ids, torch.Tensor)
                or ids.dim() != 1 or len(ids) != self._batch or ids.is_cuda
                or not torch.equal(ids, torch.arange(len(ids), device=ids.device))):
            return
        self._positions_said.add(group.path)
        warnings.warn(f"attrib: Embedding {group.path!r} was looked up with arange({len(ids)}) "
                      f"and the micro-batch has {len(ids)} examples: the indices are read as "
                      "one per example. If they are positions the whole batch shares, pass "
                      "them with a batch dimension of 1 (`torch.arange(T)[None]`) so each "
                      "example's part is captured", stacklevel=3)

    def _broadcast(self, group: ModuleGroup, args: tuple, kwargs: dict,
                   out: torch.Tensor) -> torch.Tensor:
        """Return the shared output expanded over the micro-batch (a view, equal wherever the
        model broadcasts it), so backward hands each example its own output gradient: the
        example's part of the lookup's gradient, which the broadcast would otherwise sum."""
        batch, ids = self._batch, args[0]
        if isinstance(group.module, nn.Embedding) and ids.dim() == 1:  # no batch dimension:
            expanded, args = out.expand(batch, *out.shape), (ids.expand(batch, *ids.shape),)
        else:  # a batch dimension of 1 (HF's position_ids, a declared shared input): widen it
            bdim = pe.batch_dim(group.module)
            expanded = _widen(out, bdim, batch)
            args = tuple(_widen(a, bdim, batch) for a in args)
        data, offset = self._data, self._offset
        expanded.register_hook(lambda g: self._on_output_grad(group, args, kwargs, g, data,
                                                              offset, batch))
        return expanded

    def _on_output_grad(self, group, args, kwargs, g, data: StepData, offset, batch) -> None:
        if not self.enabled:
            return
        started = time.perf_counter()
        try:
            g = (_scaled(g, self.scale) if isinstance(g, torch.Tensor)
                 else [None if t is None else _scaled(t, self.scale) for t in g])
            self._contribute(group, args, kwargs, g, data, offset, batch)
        except Exception as e:  # inside loss.backward(): never let it break training
            self._fail(group, e)
        data.seconds += time.perf_counter() - started

    def _fail(self, group: ModuleGroup, e: Exception) -> None:
        """Stop capturing a module whose per-example path failed: its gradient is residual
        from now on (said once), or raise under strict=True."""
        if self.strict:
            raise UnsupportedModuleError(
                f"per-example gradients of {group.path or 'the model'} "
                f"({type(group.module).__name__}) failed: {e}") from e
        group.failed = repr(e)
        warnings.warn(f"attrib: per-example capture of {group.path or 'the model'} "
                      f"({type(group.module).__name__}) failed ({e!r}); its gradient is "
                      "recorded as residual from now on", stacklevel=3)

    def _contribute(self, group, args, kwargs, g, data: StepData, offset, batch) -> None:
        if group.rule is not None:
            per = group.rule(group.module, args, kwargs, g)
        else:
            self._recomputing = True
            try:
                per = pe.generic_contributions(group.module, list(group.params), args, kwargs,
                                               g, batch)
            finally:
                self._recomputing = False
        for local, contribution in per.items():
            if local in group.params:
                self.consume(group.params[local], contribution, data, offset)

    def consume(self, index: int, c: pe.PerExample, data: StepData, offset: int) -> None:
        """One call's contributions to tensor `index` into the step's data, as its capture
        says (factors.settle calls it again for a tensor its first step moved off Factored)."""
        capture = self.captures[index]
        data.reached.add(index)
        projected = None
        if capture.project is not None:
            p = capture.project
            projected = pe.project(c, self.shapes[index], p.kind, p.k, p.seed, self.names[index])
            data.projected.setdefault(index, []).append((offset, projected.float()))
        if data.checked:
            self._add_sum(index, c, projected, data)
        if capture.full is not None:
            data.full.setdefault(index, []).append(
                (offset, c.dense().to(getattr(torch, capture.full_dtype))))
        if capture.factored is not None:  # an Outer (see factorable()), kept exact until the
            data.factors.setdefault(index, []).append((offset, c))  # step's end (factors.py)
        if capture.topk is not None:  # densified chunk by chunk at the step (recorder/shifts.py)
            data.topk.setdefault(index, []).append((offset, c))

    def _add_sum(self, index: int, c: pe.PerExample, projected: torch.Tensor | None,
                 data: StepData) -> None:
        """Add the call's Σ_i c_i, on the tensor's check projection, to the step's sum."""
        capture, check = self.captures[index], self.captures[index].check
        if check is None:
            total = c.total()
        elif check is capture.project:
            total = projected.sum(0)
        else:
            total = pe.project_sum(c, c.shape, check.kind, check.k, check.seed,  # c.shape: a
                                   self.names[index])  # resized weight fails at the step
        data.sums[index] = data.sums[index] + total if index in data.sums else total


def declared_shared(groups: list[ModuleGroup], patterns: Sequence[str]) -> frozenset[str]:
    """The captured modules Recorder(shared=...) names; a pattern that names none is refused
    rather than leaving a shared input unwidened."""
    paths = [g.path for g in groups]
    unmatched = [q for q in patterns if not any(fnmatch.fnmatchcase(p, q) for p in paths)]
    if unmatched:
        raise ValueError(f"shared={list(patterns)}: {unmatched} match no module whose "
                         f"parameters are captured; those modules are {paths}")
    return frozenset(p for p in paths if any(fnmatch.fnmatchcase(p, q) for q in patterns))


def _widen(value, dim: int, batch: int):
    """`value` expanded to `batch` along `dim` where it has size 1 there (a view)."""
    if not isinstance(value, torch.Tensor) or value.dim() <= dim or value.shape[dim] != 1:
        return value
    shape = list(value.shape)
    shape[dim] = batch
    return value.expand(shape)


def scatter_rows(parts: list[tuple[int, torch.Tensor]], target: torch.Tensor) -> None:
    """Write micro-batch parts into their example rows of `target` (repeat calls add up)."""
    if len(parts) == 1 and parts[0][0] == 0 and parts[0][1].shape == target.shape:
        target.copy_(parts[0][1])  # one call on the whole batch: one op, not two
        return
    target.zero_()
    for offset, values in parts:
        target[offset: offset + values.shape[0]] += values



