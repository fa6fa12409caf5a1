"""Which steps make a stage (METHODS.md §4): recorded `rec.stage()` names or step ranges."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from attrib.analyzer.run import Run

STAGE_EFFECTS = pa.schema([
    pa.field("stage", pa.string()), pa.field("start", pa.int64()),
    pa.field("end", pa.int64()),  # inclusive, as in the stages table
    pa.field("test_id", pa.int32()), pa.field("effect", pa.float64()),
    pa.field("method", pa.string()),
])


@dataclass(frozen=True)
class Stage:
    """Consecutive steps start … end (inclusive) whose skipping is the counterfactual."""

    name: str
    start: int
    end: int

    @property
    def stop(self) -> int:
        """The first step after the stage: METHODS.md's end(S)."""
        return self.end + 1

    def __len__(self) -> int:
        return self.stop - self.start


def resolve(run: Run, stages: Sequence[str] | Mapping[str, range | tuple[int, int]] | None
            ) -> list[Stage]:
    """None: every recorded stage (a name that recurs gives one stage per run of steps, named
    `name[start-end]`); names: those recorded stages; {name: range(a, b) or (first, last)}:
    step ranges (a tuple's last step is included, like the stages table's end_step)."""
    recorded = run.stages
    runs = list(zip(*(recorded.column(c).to_pylist() for c in
                      ("stage", "start_step", "end_step"))))
    counts: dict[str, int] = {}
    for name, _, _ in runs:
        counts[name] = counts.get(name, 0) + 1
    named = [Stage(name if counts[name] == 1 else f"{name}[{a}-{b}]", a, b)
             for name, a, b in runs if b is not None]
    if stages is None:
        chosen = named
    elif all(isinstance(s, Stage) for s in stages):
        chosen = list(stages)
    elif isinstance(stages, Mapping):
        chosen = [_from_range(name, value) for name, value in stages.items()]
    else:
        missing = [s for s in stages if s not in counts]
        if missing:
            raise ValueError(f"no recorded stage named {missing}; recorded: {sorted(counts)}. "
                             "Pass {name: range(first, stop)} for step ranges")
        chosen = [Stage(s.name, s.start, s.end) for s in named
                  if s.name.split("[")[0] in stages]
    for stage in chosen:
        if not 0 <= stage.start <= stage.end < run.n_steps:
            raise ValueError(f"stage {stage.name!r} covers steps {stage.start}…{stage.end}, "
                             f"outside the run's {run.n_steps} committed steps")
    if not chosen:
        raise ValueError(f"{run.dir} has no stages to analyse: mark them with rec.stage(name) "
                         "while recording, or pass stages={name: range(first, stop)}")
    return chosen


def _from_range(name: str, value: range | tuple[int, int]) -> Stage:
    if isinstance(value, range):
        if value.step != 1 or len(value) == 0:
            raise ValueError(f"stage {name!r}: {value} must be a non-empty range with step 1")
        return Stage(name, value.start, value.stop - 1)
    first, last = value
    if last < first:
        raise ValueError(f"stage {name!r}: ({first}, {last}) ends before it starts")
    return Stage(name, int(first), int(last))


def effects_table(stages: list[Stage], effects: np.ndarray, method: str) -> pa.Table:
    """Long table (stage, start, end, test_id, effect, method) from (n_stages, n_test)."""
    n_stages, n_test = effects.shape
    repeat = lambda values: np.repeat(np.asarray(values), n_test)  # noqa: E731
    return pa.table({
        "stage": repeat([s.name for s in stages]).astype(object),
        "start": repeat([s.start for s in stages]).astype(np.int64),
        "end": repeat([s.end for s in stages]).astype(np.int64),
        "test_id": np.tile(np.arange(n_test, dtype=np.int32), n_stages),
        "effect": effects.reshape(-1).astype(np.float64),
        "method": np.array([method] * effects.size, dtype=object),
    }, schema=STAGE_EFFECTS)
