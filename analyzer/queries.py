"""Named SQL queries shipped with attrib (analyzer/queries/*.sql), for users to read and reuse.

Each file starts with comment lines: a description, then one `-- param NAME = DEFAULT  text`
per parameter. DEFAULT is an SQL literal (number or 'string'); it fixes the parameter's type.
The body uses DuckDB's named parameters ($NAME). `attrib sql RUN --query NAME --param k=v`
runs one; `attrib sql --list` shows them with their text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUERY_DIR = Path(__file__).with_name("queries")
_PARAM = re.compile(r"^--\s*param\s+(\w+)\s*=\s*('(?:[^']|'')*'|[-+0-9.eE]+)\s*(.*)$")

# The neuron views (METHODS.md §5): each TopK shift of a linear layer's weight belongs to an
# output neuron (its row) and an input feature (its column). `neurons` aggregates before it
# joins and names, and counts distinct examples with HyperLogLog (`approx_examples`, within a
# few percent): exact distinct counts cost 10x more at 10⁸ rows (benchmarks/shift_queries.py);
# the neuron_examples query counts one neuron's examples exactly.
_LINEAR = "p.layer_type = 'Linear' AND len(p.shape) = 2"
NEURON_VIEWS = {
    "neuron_shifts": """
        SELECT {run}s.step, s.epoch, s.example_id, s.param, p.module, '{kind}' AS kind,
               s.{axis} AS neuron_index, p.module || '{infix}' || s.{axis} AS neuron,
               s.flat_index, s.shift, s.grad
        FROM shifts s JOIN params p ON {on}
        WHERE """ + _LINEAR,
    "neurons": """
        SELECT {run}p.module || '{infix}' || s.neuron_index AS neuron, p.module, s.param,
               '{kind}' AS kind, s.neuron_index, s.shifts, s.mass, s.net_shift,
               s.approx_examples, s.first_step, s.last_step
        FROM (SELECT {inner_run}param, {axis} AS neuron_index, count(*) AS shifts,
                     sum(abs(shift)) AS mass, sum(shift) AS net_shift,
                     approx_count_distinct(example_id) AS approx_examples,
                     min(step) AS first_step, max(step) AS last_step
              FROM shifts GROUP BY ALL) s
        JOIN params p ON {on}
        WHERE """ + _LINEAR,
}


# neuron_rows('MODULE:INDEX' | 'MODULE:in:INDEX'): the neuron_shifts rows of one neuron.
NEURON_ROWS_MACRO = """
    CREATE MACRO neuron_rows(name) AS TABLE
    SELECT * FROM neuron_shifts
    WHERE module = split_part(name, ':', 1)
      AND kind = CASE WHEN name LIKE '%:in:%' THEN 'input' ELSE 'output' END
      AND neuron_index = TRY_CAST(split_part(name, ':', -1) AS BIGINT)"""


def neuron_view_sql(multi_run: bool) -> dict[str, str]:
    """CREATE VIEW bodies of neuron_shifts and neurons (with a `run` column for several runs)."""
    names = {"run": "s.run, " if multi_run else "", "inner_run": "run, " if multi_run else "",
             "on": "s.run = p.run AND s.param = p.name" if multi_run else "s.param = p.name"}
    axes = (("output", '"row"', ":"), ("input", "col", ":in:"))
    return {view: "\nUNION ALL".join(body.format(**names, kind=kind, axis=axis, infix=infix)
                                      for kind, axis, infix in axes)
            for view, body in NEURON_VIEWS.items()}


@dataclass
class NamedQuery:
    name: str
    description: str
    defaults: dict[str, Any]
    help: dict[str, str]
    text: str

    def bind(self, given: dict[str, str]) -> dict[str, Any]:
        """Parameter values: the defaults, overridden by `given` (strings from the command
        line, or Python values), each converted to its default's type."""
        unknown = set(given) - set(self.defaults)
        if unknown:
            raise ValueError(f"query {self.name!r} has no parameter(s) {sorted(unknown)}; "
                             f"its parameters: {', '.join(self.defaults) or 'none'}")
        values = dict(self.defaults)
        for key, value in given.items():
            kind = type(self.defaults[key])
            try:
                values[key] = kind(value)
            except ValueError:
                raise ValueError(f"query {self.name!r}: parameter {key}={value!r} must be "
                                 f"{kind.__name__}") from None
        missing = [k for k, v in values.items() if v == ""]
        if missing:
            raise ValueError(f"query {self.name!r} needs --param {missing[0]}=... "
                             f"({self.help[missing[0]]})")
        return values


def _literal(text: str) -> Any:
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    return float(text) if any(ch in text for ch in ".eE") else int(text)


def load(path: Path) -> NamedQuery:
    description, defaults, help_text = [], {}, {}
    for line in path.read_text().splitlines():
        if not line.startswith("--"):
            break
        match = _PARAM.match(line)
        if match:
            defaults[match[1]] = _literal(match[2])
            help_text[match[1]] = match[3]
        else:
            description.append(line.removeprefix("--").strip())
    return NamedQuery(path.stem, " ".join(description), defaults, help_text, path.read_text())


def named_queries() -> dict[str, NamedQuery]:
    return {p.stem: load(p) for p in sorted(QUERY_DIR.glob("*.sql"))}


def named_query(name: str) -> NamedQuery:
    queries = named_queries()
    if name not in queries:
        raise ValueError(f"no named query {name!r}; choose from {', '.join(queries)}")
    return queries[name]
