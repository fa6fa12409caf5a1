"""Recording under torch.distributed (DistributedDataParallel): who writes what, and when a
step commits.

Every rank holds the same θ and takes the same optimizer step, so rank 0 alone writes the
trajectory, optimizer state, checkpoints and the steps table. Each rank writes the per-example
rows of its own examples, rows [rank·B, (rank+1)·B) of each step, into chunks no other rank
touches, plus its own Parquet parts, and then says how far it got in `ranks/rank-<r>.json`.
Rank 0 commits a block only when every rank's marker has reached it, so a reader never sees a
step that some rank has not finished. Files, not collectives, carry this: the writer threads
never issue a collective that could interleave with DDP's own. The only collectives run on the
training thread while the Recorder sets up (rank 0 creating the run or cutting it back for a
resume; the step arrays at step 0), where every rank calls them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from attrib.schemas import format as fmt

T = TypeVar("T")
RANKS_DIR = "ranks"
WAIT_SECONDS = 600.0  # how long rank 0 waits for another rank's block before giving up
POLL_SECONDS = 0.005


class DistributedError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int
    world: int

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def lead(self, action: Callable[[], T]) -> T | None:
        """Rank 0 runs `action` (creating the run, or cutting it back to a resume step) while
        the other ranks wait; returns its result on rank 0, None elsewhere. If it raises, rank
        0 raises that and every other rank a DistributedError, where a plain barrier would
        leave them waiting for rank 0."""
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
        done, error, result = torch.zeros(1, dtype=torch.int32, device=device), None, None
        if self.primary:
            try:
                result = action()
                done += 1
            except BaseException as e:  # re-raised below, once the others know
                error = e
        dist.broadcast(done, src=0)
        if error is not None:
            raise error
        if not done.item():
            raise DistributedError("rank 0 could not open the run (its error says why), so "
                                   f"rank {self.rank} does not record either")
        return result

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "backend": str(dist.get_backend())}


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, Ranks | None]:
    """The module to hook (DDP's `.module`) and the ranks when a multi-process job is running.

    FSDP is refused: it shards θ, the gradient and the optimizer state across ranks, so no
    rank holds the step whole, and the per-example capture would see only local shards.
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules()):
        raise DistributedError(
            "attrib can't record FSDP (FullyShardedDataParallel / fully_shard) yet: each rank "
            "holds a shard of θ, the gradient and the optimizer state, so no rank sees a step "
            "whole. Record with DistributedDataParallel, or open an issue for FSDP support "
            "(README, 'Scaling up')")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model, None
    return model, Ranks(dist.get_rank(), dist.get_world_size())


def marker(run_dir: Path, rank: int) -> Path:
    return run_dir / RANKS_DIR / f"rank-{rank}.json"


def clear_markers(run_dir: Path) -> None:
    """Forget the ranks' progress (a resumed run): their markers counted the discarded steps
    and listed parts the cut removed; each rank writes a fresh one as it goes on."""
    for path in (run_dir / RANKS_DIR).glob("rank-*.json"):
        path.unlink()


def publish(run_dir: Path, rank: int, committed_steps: int, tables: dict[str, list[str]],
            closed: bool = False, error: str | None = None,
            dropped: list[list[int]] | None = None) -> None:
    """A non-primary rank's progress: every step below `committed_steps` is on disk, except
    the per-example rows of the `dropped` [first, last] step ranges (backpressure)."""
    path = marker(run_dir, rank)
    path.parent.mkdir(exist_ok=True)
    fmt.write_json_atomic(path, {"committed_steps": committed_steps, "tables": tables,
                                 "closed": closed, "error": error, "dropped": dropped or []})


def wait_for(run_dir: Path, world: int, steps: int, closed: bool = False) -> list[dict]:
    """Block (on rank 0's writer thread) until every other rank has written `steps` steps
    (and closed, at the end); returns their markers. A rank that stopped recording before
    `steps` raises at once; at the end its marker is returned with its `error`."""
    deadline = time.monotonic() + WAIT_SECONDS
    pending = set(range(1, world))
    markers: dict[int, dict] = {}
    while pending:
        for rank in list(pending):
            path = marker(run_dir, rank)
            if path.exists():
                document = fmt.read_json(path)
                reached = document["committed_steps"] >= steps
                if document.get("error") and not reached and not closed:
                    raise DistributedError(f"rank {rank} stopped recording: "
                                           f"{document['error']}")
                if (reached or document.get("error")) and (document["closed"] or not closed):
                    markers[rank] = document
                    pending.discard(rank)
        if pending:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"ranks {sorted(pending)} did not write step {steps - 1} within "
                    f"{WAIT_SECONDS:.0f} s; a rank died or stopped recording")
            time.sleep(POLL_SECONDS)
    return [markers[r] for r in sorted(markers)]


def after_backward(callback: Callable[[], None]) -> None:
    """Run `callback` once, at the end of the backward pass now running; call it from a
    gradient hook."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def after_reduction(callback: Callable[[], None]) -> None:
    """Run `callback` once this backward's gradients are all-reduced into `.grad`; call it
    from a gradient hook. DDP writes the averaged gradients at the end of the backward, from
    a callback it queues on the autograd engine during the backward; a callback queued now
    runs before that one, so it queues `callback` again, behind it (the engine runs callbacks
    that callbacks queue). No comm hook is needed, so the user's own stays as it is, and the
    module works as well as its DDP wrapper."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(callback))
